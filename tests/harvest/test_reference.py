"""Every harvest statistic against a brute-force reference over the same HarvestBatches."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from spd_host.harvest import HarvestRepo
from tests.harvest.conftest import BATCH, SEQ
from tests.harvest.reference import Reference, build_reference, input_pair_counts, keys

N_BATCHES = 50  # 2400 tokens / (4 * 12)
K = 5
W = 3


@pytest.fixture(scope="module")
def ref() -> Reference:
    return build_reference(N_BATCHES, BATCH, SEQ)


def test_scalar_statistics(toy_repo: HarvestRepo, ref: Reference) -> None:
    assert toy_repo.n_tokens == ref.n == 2400
    summ = toy_repo.summary()
    assert [s.key for s in summ] == keys()
    fc = ref.fired.sum(0)
    for c, s in enumerate(summ):
        assert s.firing_count == int(fc[c])
        assert s.density == pytest.approx(int(fc[c]) / ref.n, rel=1e-15)
        for t, a in ref.acts.items():
            assert s.mean_all[t] == pytest.approx(
                float(a[:, c].double().sum()) / ref.n, rel=1e-12, abs=1e-12
            )
            on = a[ref.fired[:, c], c]
            if on.numel():
                assert s.mean_firing[t] == pytest.approx(float(on.double().mean()), rel=1e-12)
                assert s.max_firing[t] == float(on.max())
            else:
                assert s.mean_firing[t] is None and s.max_firing[t] is None
    assert any(s.firing_count == 0 for s in summ) or all(s.firing_count > 0 for s in summ)


def test_histogram(toy_repo: HarvestRepo, ref: Reference) -> None:
    cfg = toy_repo.config
    for c, key in enumerate(keys()):
        d = toy_repo.component(key)
        edges = torch.tensor(d.histogram_edges)
        assert len(edges) == cfg.histogram_bins + 1
        assert edges[0] == pytest.approx(cfg.histogram_min) and edges[-1] == pytest.approx(
            cfg.histogram_max, rel=1e-6
        )
        v = ref.acts["act"][ref.fired[:, c], c].abs()
        expected = [0] * (cfg.histogram_bins + 2)
        for x in v.tolist():
            expected[sum(1 for e in edges.tolist() if e <= x)] += 1
        assert d.histogram_counts == expected
        assert sum(d.histogram_counts) == d.firing_count


def test_input_token_counts_exact(toy_repo: HarvestRepo, ref: Reference) -> None:
    stats = load_file(str(toy_repo.path / "stats.safetensors"))
    assert torch.equal(
        stats["token_count"], torch.bincount(ref.tokens, minlength=ref.probs.shape[1])
    )
    counts = input_pair_counts(ref)
    indptr, cols, vals = stats["input_indptr"], stats["input_cols"], stats["input_values"]
    got = {}
    for c in range(len(keys())):
        for t, v in zip(
            cols[indptr[c] : indptr[c + 1]].tolist(),
            vals[indptr[c] : indptr[c + 1]].tolist(),
            strict=True,
        ):
            got[(c, t)] = v
    assert got == dict(counts)
    assert vals.dtype == torch.int64


def _ref_lists(
    n_ct: torch.Tensor, n_t: torch.Tensor, n_c: float, N: int, top: int, support: int
) -> dict[str, list[tuple[int, float]]]:
    out = {}
    # the support floor applies to every list; ties: larger count, then smaller token id
    co = [t for t in range(len(n_t)) if n_ct[t] > 0 and n_t[t] > 0 and n_t[t] >= support]

    def rank(score: dict[int, float], largest: bool) -> list[tuple[int, float]]:
        items = sorted(
            score.items(),
            key=lambda kv: (-kv[1] if largest else kv[1], -float(n_ct[kv[0]]), kv[0]),
        )
        return items[:top]

    out["top_pmi"] = rank({t: math.log(n_ct[t] * N / (n_c * n_t[t])) for t in co}, True)
    out["top_precision"] = rank({t: float(n_ct[t] / n_t[t]) for t in co}, True)
    out["top_recall"] = rank({t: float(n_ct[t] / n_c) for t in co}, True)
    sup = [t for t in range(len(n_t)) if n_t[t] >= support]
    out["bottom_pmi"] = rank(
        {t: math.log((n_ct[t] + 0.5) * N / (n_c * n_t[t])) for t in sup}, False
    )
    return out


@pytest.mark.parametrize("kind", ["input", "output"])
def test_token_stats_lists(toy_repo: HarvestRepo, ref: Reference, kind: str) -> None:
    V = ref.probs.shape[1]
    k = toy_repo.config.output_top_k
    if kind == "input":
        n_t = torch.bincount(ref.tokens, minlength=V).double()
    else:  # top-k truncated probabilities, summed (the documented approximation)
        pv, pi = torch.topk(ref.probs.float(), k, dim=-1)
        floor = toy_repo.config.output_min_prob
        assert floor > 0
        pv = torch.where(pv >= floor, pv, torch.zeros_like(pv))  # documented floor
        trunc = torch.zeros_like(ref.probs).scatter_(1, pi, pv.double())
        n_t = trunc.sum(0)
    for c, key in enumerate(keys()):
        n_c = float(ref.fired[:, c].sum())
        if kind == "input":
            n_ct = torch.zeros(V, dtype=torch.float64)
            n_ct.index_add_(
                0, ref.tokens[ref.fired[:, c]], torch.ones(int(n_c), dtype=torch.float64)
            )
        else:
            n_ct = trunc[ref.fired[:, c]].sum(0)
        got = toy_repo.token_stats(key, kind, top=4)  # type: ignore[arg-type]
        assert got.firing_count == n_c
        if n_c == 0:
            assert got.top_pmi == [] and got.bottom_pmi == []
            continue
        exp = _ref_lists(n_ct, n_t, n_c, ref.n, 4, toy_repo.config.min_token_support)
        for name, lst in exp.items():
            mine = getattr(got, name)
            assert [s.token for s in mine] == [t for t, _ in lst], (key, kind, name)
            for s, (t, v) in zip(mine, lst, strict=True):
                # output masses are quantised to 2**-30 per position (documented): relative 1e-6
                tol = 1e-12 if kind == "input" else 1e-6
                assert s.value == pytest.approx(v, rel=tol, abs=tol)
                if kind == "input":
                    assert s.count == n_ct[t] and s.token_total == n_t[t]
        assert len(got.bottom_pmi) == 4  # never empty merely because most tokens never co-occur
        if kind == "output":
            # the documented bound: exact mass - stored mass lies in [0, bound] for every token
            exact = ref.probs[ref.fired[:, c]].sum(0)
            quant = n_c * 2.0**-30
            assert float((exact - n_ct).min()) >= -quant
            assert float((exact - n_ct).max()) <= got.approximation_bound + quant
            assert got.approximation_bound == pytest.approx(
                float((1 - pv.double().sum(1))[ref.fired[:, c]].sum()), rel=1e-6
            )


@pytest.mark.parametrize("metric", ["precision", "recall", "jaccard", "pmi"])
def test_cooccurrence(toy_repo: HarvestRepo, ref: Reference, metric: str) -> None:
    F = ref.fired.double()
    both = F.T @ F  # dense brute force, fine for 12 components
    n = both.diagonal()
    ks = keys()
    for i, key in enumerate(ks):
        exp: dict[str, float] = {}
        for j in range(len(ks)):
            if j == i or both[i, j] == 0:
                continue
            nij, ni, nj = float(both[i, j]), float(n[i]), float(n[j])
            exp[ks[j]] = {
                "precision": nij / ni,
                "recall": nij / nj,
                "jaccard": nij / (ni + nj - nij),
                "pmi": math.log(nij * ref.n / (ni * nj)),
            }[metric]
        got = toy_repo.correlated(key, metric=metric, top=100)  # type: ignore[arg-type]
        assert dict(got) == pytest.approx(exp, rel=1e-12)
        assert [v for _, v in got] == sorted((v for _, v in got), reverse=True)


def _window(ref: Reference, pos: int, c: int) -> tuple[list[int], list[float], list[bool], int]:
    seq, s = divmod(pos, SEQ)
    lo, hi = max(0, s - W), min(SEQ, s + W + 1)
    base = seq * SEQ
    rng = range(base + lo, base + hi)
    return (
        [int(ref.tokens[p]) for p in rng],
        [float(ref.acts["act"][p, c]) for p in rng],
        [bool(ref.fired[p, c]) for p in rng],
        s - lo,
    )


def test_top_examples(toy_repo: HarvestRepo, ref: Reference) -> None:
    saw_edge = False
    for c, key in enumerate(keys()):
        d = toy_repo.component(key)
        on = ref.fired[:, c].nonzero().flatten()
        vals = ref.acts["act"][on, c]
        order = torch.argsort(vals, descending=True, stable=True)[
            :K
        ]  # ties: earlier position first
        assert [e.position for e in d.top_examples] == on[order].tolist()
        assert [e.score for e in d.top_examples] == vals[order].tolist()
        for e in d.top_examples:
            toks, acts, fired, centre = _window(ref, e.position, c)
            assert (e.tokens, e.activations["act"], e.firings, e.centre) == (
                toks,
                acts,
                fired,
                centre,
            )
            assert e.firings[e.centre] and e.activations["act"][e.centre] == e.score
            saw_edge |= len(e.tokens) < 2 * W + 1
    assert saw_edge, "fixture should include windows truncated at a sequence edge"


def test_reservoir_examples_are_real_firings(toy_repo: HarvestRepo, ref: Reference) -> None:
    for c, key in enumerate(keys()):
        d = toy_repo.component(key)
        n_c = int(ref.fired[:, c].sum())
        assert len(d.reservoir_examples) == min(K, n_c)
        positions = [e.position for e in d.reservoir_examples]
        assert len(set(positions)) == len(positions)  # without replacement
        for e in d.reservoir_examples:
            assert bool(ref.fired[e.position, c])
            toks, acts, fired, centre = _window(ref, e.position, c)
            assert (e.tokens, e.activations["act"], e.firings, e.centre) == (
                toks,
                acts,
                fired,
                centre,
            )


def test_render_example(toy_repo: HarvestRepo, toy_host: object) -> None:
    d = toy_repo.component("0.mlp:1")
    e = d.top_examples[0]
    text = toy_repo.render_example(e)
    assert f"<<t{e.tokens[e.centre]} >>" in text
    assert text.count("[[") == sum(e.firings) - 1


def test_unknown_component_is_a_clear_error(toy_repo: HarvestRepo) -> None:
    from spd_host.errors import ResultsNotFoundError

    with pytest.raises(ResultsNotFoundError, match="nope:3"):
        toy_repo.component("nope:3")


def test_sampled_cooccurrence_is_exact_on_its_sample(
    toy_host: object, tmp_path, ref: Reference
) -> None:
    """With cooccurrence_fraction < 1 the counts are exact over the documented position sample:
    positions where ``rand(N, generator=batch_generator(seed + 0x5EED, g)) < fraction``."""
    from spd_host.harvest.accumulator import batch_generator
    from tests.harvest.conftest import harvest_toy, toy_config

    frac = 0.3
    repo = harvest_toy(tmp_path / "sampled", toy_config(cooccurrence_fraction=frac))
    N = BATCH * SEQ
    mask = torch.cat(
        [torch.rand(N, generator=batch_generator(0x5EED, g)) < frac for g in range(N_BATCHES)]
    )
    F = ref.fired[mask].double()
    M = int(mask.sum())
    assert repo.meta["cooc_n_tokens"] == M
    assert 0.2 * ref.n < M < 0.4 * ref.n
    _assert_pmi_over(repo, F)


def test_cooccurrence_stops_after_the_batch_that_passes_the_pair_cap(
    toy_host: object, tmp_path, ref: Reference
) -> None:
    """``cooccurrence_max_pairs``: counting stops after the first batch whose distinct pairs
    (so far) exceed the cap; the counts are exact over the batches up to and including it."""
    from tests.harvest.conftest import harvest_toy, toy_config

    N = BATCH * SEQ
    F = ref.fired.double()
    cum = []
    for b in range(N_BATCHES):
        both = F[: (b + 1) * N].T @ F[: (b + 1) * N]
        cum.append(int((torch.triu(both, diagonal=1) > 0).sum()))
    stop = next(b for b in range(1, N_BATCHES - 1) if cum[b] > cum[b - 1])
    config = toy_config(
        cooccurrence_fraction=1.0, cooccurrence_max_pairs=cum[stop - 1], dense_table_bytes=0
    )
    repo = harvest_toy(tmp_path / "capped", config)
    M = (stop + 1) * N
    assert repo.meta["cooc_n_tokens"] == M
    _assert_pmi_over(repo, F[:M])


def _assert_pmi_over(repo: HarvestRepo, F: torch.Tensor) -> None:
    """Every component's PMI partners are those of a brute-force count over the positions
    ``F`` (``[M, C]`` firings, float) holds: ``log(n_ij * M / (n_i * n_j))``."""
    M = F.shape[0]
    both = F.T @ F
    ks = keys()
    for i, key in enumerate(ks):
        exp = {
            ks[j]: math.log(float(both[i, j]) * M / (float(both[i, i]) * float(both[j, j])))
            for j in range(len(ks))
            if j != i and both[i, j] > 0
        }
        assert dict(repo.correlated(key, metric="pmi", top=100)) == pytest.approx(exp, rel=1e-12)
