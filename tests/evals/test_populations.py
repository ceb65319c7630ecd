"""Example populations of the detection/fuzzing suites, against references written here.

- a synthetic harvest whose whole firing population is known: positives drawn by quantile sit
  uniformly over the population's quantiles (the pre-#15 rule leans to the top);
- the toy harvest: negatives never fire (brute force), ``similar_density`` ones come from
  components of similar density, the window-alone record and the ceiling match a brute-force
  firing check, ``prefer_alone`` and ``widen`` do what they say.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from spd_host.evals import run_suite
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.populations import PopulationOptions, draw_positives
from spd_host.evals.llm.suites import build_trials
from spd_host.evals.llm.trials import Pool
from spd_host.harvest.models import ActivationExample
from spd_host.plugins import get_host
from tests.evals.conftest import SEQ, THRESHOLD, toy_batches
from tests.evals.test_judge_suites import _write_labels

M, K, N_BINS = 20_000, 1_000, 10


def _example(kind: str, rank: int, pos: int, value: float) -> ActivationExample:
    return ActivationExample(
        key="s:0",
        kind=kind,  # type: ignore[arg-type]
        rank=rank,
        score=value,
        position=pos,
        tokens=[pos % 97, pos % 89, pos % 83],
        activations={"act": [0.0, value, 0.0]},
        firings=[False, True, False],
        centre=1,
    )


@pytest.fixture(scope="module")
def synthetic() -> tuple[list[float], Pool]:
    """M firings with lognormal activations; a uniform reservoir of K and the top K, as the
    harvest stores them."""
    rng = random.Random(0)
    values = [rng.lognormvariate(0.0, 1.0) for _ in range(M)]
    res_pos = rng.sample(range(M), K)
    top_pos = sorted(range(M), key=lambda p: -values[p])[:K]
    examples = [_example("top", r, p, values[p]) for r, p in enumerate(top_pos)]
    examples += [_example("reservoir", r, p, values[p]) for r, p in enumerate(res_pos)]
    pool = Pool(
        density={"s:0": 0.1, "s:1": 0.1},
        site={"s:0": "s", "s:1": "s"},
        fires=lambda key, tokens: [True] * len(tokens),
        act_type="act",
        load_examples=lambda key: examples if key == "s:0" else [],
    )
    return values, pool


def _mid_rank(values: list[float]) -> dict[float, float]:
    ranked = sorted(values)
    return {v: (i + 0.5) / len(ranked) for i, v in enumerate(ranked)}  # values are distinct


def _draws(pool: Pool, mode: str, n_trials: int = 400, n: int = 5) -> list[list[Any]]:
    rng = random.Random(1)
    opts = PopulationOptions(positives=mode, n_quantiles=N_BINS)  # type: ignore[arg-type]
    return [draw_positives(pool, "s:0", n, rng, options=opts) for _ in range(n_trials)]


def test_quantile_positives_spread_uniformly_over_the_whole_population(synthetic: Any) -> None:
    values, pool = synthetic
    q_of = _mid_rank(values)
    trials = _draws(pool, "quantiles")
    q = sorted(q_of[d.origin.activation] for t in trials for d in t)
    assert len(q) == 2000
    # uniform over [0, 1]: each population decile holds 1/10 of the picks (sd ~0.012 from the
    # reservoir's own sampling and the draws), the p-th percentile of the picks is p
    for dec in range(10):
        share = sum(dec / 10 <= x < (dec + 1) / 10 for x in q) / len(q)
        assert abs(share - 0.1) < 0.04, (dec, share)
    for p in (0.05, 0.5, 0.95):
        assert abs(q[int(p * len(q))] - p) < 0.03
    # bin i of N holds population quantiles [i/N, (i+1)/N): its picks average (i + 0.5)/N,
    # i.e. the bins' means run from 0.05 to 0.95 (the top bin also holds the top-K, so >=)
    by_bin: dict[int, list[float]] = {}
    for t in trials:
        for d in t:
            by_bin.setdefault(d.origin.bin, []).append(q_of[d.origin.activation])
    assert sorted(by_bin) == list(range(N_BINS))
    for b, qs in by_bin.items():
        mean = sum(qs) / len(qs)
        if b < N_BINS - 1:
            assert abs(mean - (b + 0.5) / N_BINS) < 0.03, (b, mean)
        else:
            assert mean >= (b + 0.5) / N_BINS - 0.03 and min(qs) >= 0.85


def test_the_pre_15_rule_leans_to_the_top(synthetic: Any) -> None:
    values, pool = synthetic
    q_of = _mid_rank(values)
    q = [q_of[d.origin.activation] for t in _draws(pool, "top_and_reservoir") for d in t]
    # half the pooled examples are the top 5%: about 0.5 + 0.5 * 0.1 of the picks are >= 0.9
    assert sum(x >= 0.9 for x in q) / len(q) > 0.45


def test_bins_and_quantiles_follow_the_written_rule(synthetic: Any) -> None:
    _, pool = synthetic
    examples = pool.examples["s:0"]
    reservoir = sorted(e.score for e in examples if e.kind == "reservoir")
    rank = {v: i for i, v in enumerate(reservoir)}
    for t in _draws(pool, "quantiles", n_trials=60):
        bins = [d.origin.bin for d in t]
        # stratified: the k-th of 5 picks falls in bin 2k or 2k+1 (q_k in [k/5, (k+1)/5))
        assert [b // 2 for b in bins] == [0, 1, 2, 3, 4]
        assert len({d.origin.position for d in t}) == len(t)
        for d in t:
            v = d.origin.activation
            expected_bin = math.floor(rank[v] * N_BINS / K) if v in rank else N_BINS - 1
            if d.origin.source == "reservoir":
                assert d.origin.bin == expected_bin
            else:
                assert d.origin.bin == N_BINS - 1 and d.origin.source == "top"
            below = sum(x < v for x in reservoir) + 0.5 * sum(x == v for x in reservoir)
            assert d.origin.population_quantile == pytest.approx(below / K)


# -- the toy harvest -----------------------------------------------------------------------------
def _brute_fires(model: Any, key: str, tokens: Any) -> list[bool]:
    from tests.evals.toy_plugin import pre_acts

    site, idx = key.rsplit(":", 1)
    layer = int(site.split(".")[0])
    seen = {}
    h = model.transformer.h[layer].mlp.register_forward_pre_hook(
        lambda _m, a: seen.__setitem__("x", a[0])
    )
    with torch.no_grad():
        model(torch.tensor([list(tokens)]))
    h.remove()
    return (pre_acts(model, layer, seen["x"])[0, :, int(idx)] > THRESHOLD).tolist()


def test_negatives_and_window_alone_records_match_brute_force(harvested: str) -> None:
    from spd_host.harvest import HarvestRepo

    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    model = adapter.load_base_model()
    density = {c.key: c.density for c in HarvestRepo.open(harvested).summary()}
    config = JudgeSuiteConfig(provider="offline", n_components=8, n_trials=2)
    n_pos = n_alone = 0
    for negatives in ("random", "similar_density"):
        cfg = config.model_copy(update={"negatives": negatives})
        trials, _, _ = build_trials("detection", adapter, cfg)
        assert trials
        for t in trials:
            origins = t.extras["examples"]
            assert [o.item for o in origins] == list(range(1, len(t.items) + 1))
            for item, o in zip(t.items, origins, strict=True):
                fired = _brute_fires(model, t.key, item.tokens)
                assert (o.role == "positive") == (o.item in t.truth)
                if o.role == "negative":
                    assert not any(fired) and o.component != t.key
                    if o.source == "similar_density":
                        assert abs(density[o.component] - density[t.key]) <= 0.5 * density[t.key]
                    else:
                        assert o.source == "random"
                else:
                    assert o.fires_alone == any(fired)
                    n_pos += 1
                    n_alone += any(fired)
        if negatives == "similar_density":
            assert any(o.source == "similar_density" for t in trials for o in t.extras["examples"])
    assert 0 < n_alone <= n_pos


def test_results_record_the_options_and_the_ceiling(harvested: str) -> None:
    _write_labels(harvested)
    config = JudgeSuiteConfig(
        provider="offline", n_components=6, n_trials=2, negatives="similar_density"
    )
    result = run_suite("detection", harvested, config)
    assert result.config["positives"] == "quantiles" and result.config["n_quantiles"] == 10
    assert result.config["negatives"] == "similar_density"
    assert result.config["window"] == "as_recorded"
    # the ceiling by hand: per trial (share of positives visible + 1) / 2, per component the
    # mean, then the mean over components
    per: dict[str, list[float]] = {}
    vis: list[bool] = []
    for rec in result.trials:
        pos = [o for o in rec.examples if o.role == "positive"]
        assert pos and len(rec.examples) == len(rec.truth) + sum(
            o.role == "negative" for o in rec.examples
        )
        v = [bool(o.fires_alone) for o in pos]
        vis += v
        per.setdefault(rec.component_key, []).append((sum(v) / len(v) + 1) / 2)
    means = [sum(x) / len(x) for x in per.values()]
    assert result.ceiling == pytest.approx(sum(means) / len(means))
    assert result.positives_visible == pytest.approx(sum(vis) / len(vis))
    fuzz = run_suite("fuzzing", harvested, config)
    assert fuzz.ceiling is not None and all(r.examples for r in fuzz.trials)


def test_prefer_alone_and_widen(harvested: str) -> None:
    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    model = adapter.load_base_model()
    base = JudgeSuiteConfig(provider="offline", n_components=8, n_trials=2)

    def share(trials: list[Any]) -> float:
        pos = [o for t in trials for o in t.extras["examples"] if o.role == "positive"]
        return sum(bool(o.centre_fires_alone) for o in pos) / len(pos)

    recorded, _, _ = build_trials("fuzzing", adapter, base)
    preferred, _, _ = build_trials(
        "fuzzing", adapter, base.model_copy(update={"window": "prefer_alone"})
    )
    assert share(preferred) >= share(recorded)
    assert share(recorded) < 1.0  # the toy has context-dependent firings to begin with

    # widen, with the harvest's own token source: the left context grows until the firing
    # reproduces alone or the sequence starts (bound 64 > SEQ), so every firing reproduces
    stream = torch.cat(list(toy_batches(0, 1, 0))).flatten().tolist()
    n_widened = 0
    for bound in (64, 2):
        cfg = base.model_copy(update={"window": "widen", "max_widen_tokens": bound})
        widened, _, _ = build_trials("fuzzing", adapter, cfg, batches=toy_batches)
        if bound == 64:
            assert share(widened) == 1.0
        for t in widened:
            for item, o in zip(t.items, t.extras["examples"], strict=True):
                if o.widened_by == 0:
                    continue
                assert o.widened_by <= bound
                n_widened += 1
                p = o.position
                seq_start = p - p % SEQ
                # the window is a slice of the true sequence, ending where the stored one
                # ended, marked where the target fires in context (the sequence from its start)
                n = len(item.tokens)
                starts = [
                    s
                    for s in range(seq_start, p + 1)
                    if stream[s : s + n] == list(item.tokens) and s + n > p
                ]
                assert starts
                start = starts[0]
                assert _brute_fires(model, t.key, item.tokens)[p - start] == o.centre_fires_alone
                if bound == 64:
                    assert o.centre_fires_alone
                if o.item in t.truth:
                    in_context = _brute_fires(model, t.key, stream[seq_start : start + n])
                    assert list(item.marks) == in_context[start - seq_start :]
    assert n_widened > 0


def test_cli_flags_reach_the_result_and_a_bad_value_is_one_line(harvested: str) -> None:
    import json

    from typer.testing import CliRunner

    from spd_host.cli.app import app

    _write_labels(harvested)
    args = ["eval", "detection", harvested, "--provider", "offline", "--n-components", "3"]
    out = CliRunner().invoke(
        app, [*args, "--n-trials", "1", "--negatives", "similar_density", "--json"]
    )
    assert out.exit_code == 0, out.output
    (result,) = json.loads(out.stdout)["results"]
    assert result["config"]["negatives"] == "similar_density"
    assert result["ceiling"] is not None
    bad = CliRunner().invoke(app, [*args, "--window", "sideways"])
    assert bad.exit_code != 0 and "--window" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("fuzz_type", ["default", "active"])
def test_delphi_batched_fuzzing_keeps_each_items_origin(harvested: str, fuzz_type: str) -> None:
    """Under delphi's convention items are re-batched across trials: each item must still
    carry its own origin (a correctly marked item is a positive, every other a negative)."""
    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    model = adapter.load_base_model()
    config = JudgeSuiteConfig(
        provider="offline", n_components=4, n_trials=2, convention="delphi", fuzz_type=fuzz_type
    )
    trials, _, _ = build_trials("fuzzing", adapter, config)
    assert trials and all(":b" in t.trial_id for t in trials)
    for t in trials:
        origins = t.extras["examples"]
        assert len(origins) == len(t.items)
        for i, (item, o) in enumerate(zip(t.items, origins, strict=True), 1):
            assert o.item == i and (o.role == "positive") == (i in t.truth)
            fired = _brute_fires(model, t.key, item.tokens)
            if o.role == "negative" and o.source in ("random", "similar_density"):
                assert not any(fired) and o.component != t.key  # delphi default: never fires
            if o.role == "positive":
                assert o.component == t.key and o.centre_fires_alone is not None


def test_widen_without_or_with_a_changed_token_stream_is_a_clear_error(harvested: str) -> None:
    from spd_host.errors import ConfigError

    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    cfg = JudgeSuiteConfig(provider="offline", n_components=8, n_trials=1, window="widen")
    with pytest.raises(ConfigError, match="token stream"):  # toy tokens were passed in
        build_trials("fuzzing", adapter, cfg)

    def changed(rank: int, world: int, start: int) -> Any:
        for b in toy_batches(rank, world, start):
            yield (b + 1) % 61

    with pytest.raises(ConfigError, match="no longer holds"):
        build_trials("fuzzing", adapter, cfg, batches=changed)
