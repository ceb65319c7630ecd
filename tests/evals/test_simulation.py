"""The simulation suite end to end: toy harvest -> windows -> the real OpenAI SDK -> the local
127.0.0.1 server -> correlations. An oracle judge (answers the true activations) scores 1, a
random judge near 0; logprobs mode reads expected values off top_logprobs; correlations are
recomputed here with numpy."""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

import numpy as np
import pytest
from llm_server import LLMServer, Reply, Request

from spd_host.evals import run_suite
from spd_host.evals.llm.scorer_configs import SimulationConfig
from spd_host.evals.llm.simulation import build_trials
from spd_host.plugins import get_host
from tests.evals.test_judge_suites import _write_labels

TRIAL = re.compile(r"Trial (\S+)")
ACT = "activation"  # the toy plugin's activation type


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")


def _config(server: LLMServer, **kw: Any) -> SimulationConfig:
    base: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "base_url": server.openai_url,
        "n_components": 12,
        "backoff_base_s": 0.01,
        "max_concurrent": 4,
    }
    base.update(kw)
    return SimulationConfig(**base)


def _truths(did: str, config: SimulationConfig) -> dict[str, list[list[int]]]:
    trials, _, _ = build_trials(get_host().load_adapter(did), config)
    return {t.trial_id: t.truth for t in trials}


def _answer(windows: list[list[int]]) -> str:
    return json.dumps(
        {"windows": [{"window": i, "activations": w} for i, w in enumerate(windows, 1)]}
    )


def _brute_pearson(x: list[float], y: list[float]) -> float:
    return float(np.corrcoef(np.array(x, dtype=np.float64), np.array(y, dtype=np.float64))[0, 1])


def _check_scores_against_numpy(result: Any) -> None:
    for comp in result.components:
        wins = [w for t in result.trials if t.component_key == comp.key for w in t.windows]
        truth = [float(x) for w in wins for x in w.truth]
        pred = [x for w in wins for x in w.predicted]
        if np.std(pred) > 0:
            assert comp.correlation == pytest.approx(_brute_pearson(truth, pred), abs=1e-9)
        for w in wins:
            if np.std(w.truth) > 0 and np.std(w.predicted) > 0:
                assert w.correlation == pytest.approx(
                    _brute_pearson([float(x) for x in w.truth], w.predicted), abs=1e-9
                )
    scored = [c.correlation for c in result.components if c.correlation is not None]
    assert result.score == pytest.approx(sum(scored) / len(scored), abs=1e-12)


def test_truth_is_delphis_0_to_10_scale(harvested: str) -> None:
    from spd_host.harvest import HarvestRepo

    _write_labels(harvested)
    config = SimulationConfig(provider="offline", n_components=6)
    trials, _, _ = build_trials(get_host().load_adapter(harvested), config)
    repo = HarvestRepo.open(harvested)
    assert trials
    for t in trials:
        d = repo.component(t.key)
        top = max(max(e.activations[ACT]) for e in [*d.top_examples, *d.reservoir_examples])
        kinds = [w.kind for w in t.windows]
        assert "non-activating" in kinds and ("top" in kinds or "quantile" in kinds)
        for w, truth in zip(t.windows, t.truth, strict=True):
            if w.kind == "non-activating":
                assert set(truth) == {0}
            else:  # ceil(10 a / max) clamped to [0, 10], as delphi's normalize_activations
                want = [min(10, max(0, math.ceil(10 * a / top))) for a in w.activations]
                assert truth == want and max(truth) >= 1


def test_oracle_json_judge_scores_one_and_random_near_zero(harvested: str) -> None:
    _write_labels(harvested)
    with LLMServer() as server:
        config = _config(server)
        truths = _truths(harvested, config)
        assert len(truths) >= 10
        server.plan = lambda req: Reply(answer=_answer(truths[TRIAL.search(req.prompt).group(1)]))  # type: ignore[union-attr]
        oracle = run_suite("simulation", harvested, config)
        assert len(server.requests) == len(truths)
        assert server.requests[0].body["response_format"]["type"] == "json_schema"
        assert "logprobs" not in server.requests[0].body
    assert oracle.score == pytest.approx(1.0) and oracle.n_trials_ok == len(truths)
    assert oracle.score_window_mean == pytest.approx(1.0)
    assert not oracle.baseline and oracle.mode == "json"
    _check_scores_against_numpy(oracle)

    rng = random.Random(3)

    def rand(req: Request) -> Reply:
        truth = truths[TRIAL.search(req.prompt).group(1)]  # type: ignore[union-attr]
        return Reply(answer=_answer([[rng.randint(0, 10) for _ in w] for w in truth]))

    with LLMServer(plan=rand) as server:
        result = run_suite("simulation", harvested, _config(server, force=True))
    assert result.score is not None and abs(result.score) < 0.15  # 12 components x ~240 tokens
    _check_scores_against_numpy(result)


def _logprob_tokens(
    content: str, truth_flat: list[int]
) -> tuple[list[dict[str, Any]], list[float]]:
    """Tokens spelling ``content`` (each number its own token, followed by its alternatives:
    the true value at p=0.7, true+1 (or 9) at 0.2, and a non-number at 0.1) and the
    expected values a reader must get: (0.7 v + 0.2 w) / 0.9."""
    pieces = re.findall(r"\d+|[^\d]+", content)
    out, evs = [], []
    it = iter(truth_flat)
    in_acts = False
    for p in pieces:
        if '"activations"' in p:
            in_acts = True
        if p.isdigit() and in_acts:
            v = next(it)
            w = v + 1 if v < 10 else 9
            top = [
                {"token": str(v), "logprob": math.log(0.7), "bytes": None},
                {"token": str(w), "logprob": math.log(0.2), "bytes": None},
                {"token": "x", "logprob": math.log(0.1), "bytes": None},
            ]
            evs.append((0.7 * v + 0.2 * w) / 0.9)
            out.append({"token": p, "logprob": math.log(0.7), "bytes": None, "top_logprobs": top})
        else:
            if "]" in p:
                in_acts = False
            out.append({"token": p, "logprob": 0.0, "bytes": None, "top_logprobs": []})
    return out, evs


def test_logprobs_mode_reads_expected_values(harvested: str) -> None:
    _write_labels(harvested)
    expected: dict[str, list[float]] = {}
    with LLMServer() as server:
        config = _config(server, mode="logprobs", n_components=6, top_logprobs=5)
        truths = _truths(harvested, config)

        def plan(req: Request) -> Reply:
            tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
            content = _answer(truths[tid])
            tokens, evs = _logprob_tokens(content, [x for w in truths[tid] for x in w])
            expected[tid] = evs
            return Reply(answer=content, logprobs=tokens)

        server.plan = plan
        result = run_suite("simulation", harvested, config)
        body = server.requests[0].body
        assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert result.mode == "logprobs" and result.n_trials_ok == len(truths)
    for t in result.trials:
        got = [x for w in t.windows for x in w.predicted]
        assert got == pytest.approx(expected[t.trial_id], abs=1e-9)
        assert t.n_values_from_text == 0
    assert result.score is not None and result.score > 0.95
    _check_scores_against_numpy(result)


def test_bad_answers_are_failed_trials_and_resume_retries_them(harvested: str) -> None:
    _write_labels(harvested)
    with LLMServer() as server:
        config = _config(server, max_attempts=1, n_components=6)
        truths = _truths(harvested, config)
        ids = sorted(truths)
        bad = set(ids[::2])

        def plan(req: Request) -> Reply:
            tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
            windows = truths[tid]
            if tid in bad:  # one activation short
                windows = [windows[0][:-1], *windows[1:]]
            return Reply(answer=_answer(windows))

        server.plan = plan
        first = run_suite("simulation", harvested, config)
        assert first.n_trials_failed == len(bad) and first.n_trials_ok == len(ids) - len(bad)
        assert all("malformed" in (t.error or "") for t in first.trials if t.status == "failed")
        assert all(c.correlation is None for c in first.components if c.n_ok == 0)
        n = len(server.requests)
        bad.clear()
        second = run_suite("simulation", harvested, config)
        assert len(server.requests) - n == first.n_trials_failed  # only the failed ones again
        assert second.n_trials_failed == 0 and second.score == pytest.approx(1.0)


def test_cost_cap_holds_across_resumes(harvested: str) -> None:
    """Input free, output $1/token, 300 max output tokens: each call's worst case is $300 and
    the server bills 40 tokens ($40). At a $400 cap calls go out while 40 (k - 1) + 300 <= 400:
    k <= 3; a resume at the same cap starts from the $120 spent and sends nothing."""
    _write_labels(harvested)
    prices = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 1e6, "max_concurrent": 1}
    with LLMServer() as server:
        truths = _truths(harvested, _config(server))
        server.plan = lambda req: Reply(answer=_answer(truths[TRIAL.search(req.prompt).group(1)]))  # type: ignore[union-attr]
        cfg = _config(server, cost_cap_usd=400, max_output_tokens=300, **prices)
        first = run_suite("simulation", harvested, cfg)
        assert len(server.requests) == 3 and first.spent_usd == pytest.approx(120)
        assert first.stopped_by_cost_cap and first.n_trials_not_sent == len(truths) - 3
        again = run_suite("simulation", harvested, cfg)
        assert len(server.requests) == 3 and again.stopped_by_cost_cap


def test_offline_baseline_judge_predicts_top_pmi_tokens(harvested: str) -> None:
    from spd_host.harvest import HarvestRepo

    _write_labels(harvested)
    result = run_suite(
        "simulation", harvested, SimulationConfig(provider="offline", n_components=8)
    )
    assert result.baseline and any("BASELINE" in n for n in result.notes)
    repo = HarvestRepo.open(harvested)
    config = SimulationConfig(provider="offline", n_components=8)
    trials = {t.trial_id: t for t in build_trials(get_host().load_adapter(harvested), config)[0]}
    for rec in result.trials:
        top = {s.token for s in repo.token_stats(rec.component_key, "input", top=10).top_pmi}
        for w, shown in zip(rec.windows, trials[rec.trial_id].windows, strict=True):
            assert w.predicted == [10.0 if t in top else 0.0 for t in shown.tokens]
    _check_scores_against_numpy(result)


def test_logprobs_mode_needs_a_provider_with_logprobs(harvested: str) -> None:
    from spd_host.errors import ConfigError

    _write_labels(harvested)
    with pytest.raises(ConfigError, match="logprobs"):
        run_suite("simulation", harvested, SimulationConfig(provider="anthropic", mode="logprobs"))


def test_expected_values_from_tokens_with_a_prefix_and_split_numbers() -> None:
    """A number inside a token (":3") is read against alternatives with the same prefix; a
    number split over two tokens ("1" "0") is not read (None); alternatives outside 0-10 and
    non-numbers are ignored and the rest renormalised."""
    from spd_host.autointerp.providers.base import TokenLogprob
    from spd_host.evals.llm.logprobs import values_at
    from spd_host.evals.llm.simulation import number_spans

    content = '{"activations":[3,1' + "0]}"
    lp = math.log
    tokens = [
        TokenLogprob('{"activations', 0.0),
        TokenLogprob('":[', 0.0),
        TokenLogprob(
            "3", lp(0.5), (("3", lp(0.5)), ("4", lp(0.25)), ("12", lp(0.1)), ("x", lp(0.15)))
        ),
        TokenLogprob(",1", lp(0.6), ((",1", lp(0.6)), (",2", lp(0.2)), ("1", lp(0.2)))),
        TokenLogprob("0", 0.0),
        TokenLogprob("]}", 0.0),
    ]
    spans = number_spans(content)
    assert spans == [[(16, 17), (18, 20)]]
    got = values_at(tokens, content, spans[0], 0, 10)
    assert got[0] == pytest.approx((3 * 0.5 + 4 * 0.25) / 0.75, abs=1e-12)
    assert got[1] is None  # "10" spans ",1" + "0"
    one = values_at(
        [*tokens[:4], TokenLogprob("]}", 0.0)], '{"activations":[3,1]}', [(18, 19)], 0, 10
    )
    assert one[0] == pytest.approx((1 * 0.6 + 2 * 0.2) / 0.8, abs=1e-12)  # prefix "," kept


def test_a_relabelled_component_is_simulated_again(harvested: str) -> None:
    from tests.evals.test_local_scorers import _write

    _write_labels(harvested)
    config = SimulationConfig(provider="offline", n_components=3)
    first = run_suite("simulation", harvested, config)
    _write(harvested, {first.components[0].key: "a new label"})
    second = run_suite("simulation", harvested, config)
    relabelled = [t for t in second.trials if t.component_key == first.components[0].key]
    assert relabelled and all(t.label == "a new label" for t in relabelled)
    assert all(t.label != "a new label" for t in second.trials if t not in relabelled)
