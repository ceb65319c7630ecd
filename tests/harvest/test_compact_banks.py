"""The compact example-bank layout against a plain dense store kept by the test.

The reference is what the dense layout held: per slot a score, a position, ``2W + 1`` token
ids, ``[2W + 1, T]`` activations and ``2W + 1`` fired flags, written with plain indexing. The
bank must give back exactly those bits (``-0.0`` and NaN payloads included), through pool and
heap compactions, checkpoints of either layout, and a harvest with a window wider than one
flag word.
"""

from __future__ import annotations

import pytest
import torch

from spd_host.adapter import HarvestBatch, Site
from spd_host.errors import ConfigError
from spd_host.harvest import HarvestConfig
from spd_host.harvest.accumulator import HarvestAccumulator, Layout
from spd_host.harvest.examples import ExampleBank, pack_bits, popcount, ranked_slots, unpack_bits
from spd_host.harvest.windows import Windows


@pytest.mark.parametrize("w", [1, 17, 31, 32, 41, 63, 65])
def test_bit_masks_round_trip(w: int) -> None:
    g = torch.Generator().manual_seed(w)
    flags = torch.rand(50, 3, w, generator=g) < 0.4
    words = pack_bits(flags)
    assert words.dtype == torch.int32 and words.shape == (50, 3, -(-w // 31))
    # bit i lives in word i // 31 at bit i % 31 (a hand-written reference)
    for i in range(w):
        bit = (words[..., i // 31].to(torch.int64) >> (i % 31)) & 1
        assert torch.equal(bit.bool(), flags[..., i])
    assert torch.equal(unpack_bits(words, w), flags)
    assert torch.equal(popcount(words), flags.sum(-1))


class DenseStore:
    """The dense layout, as a reference: every field of every slot in a plain array."""

    def __init__(self, rows: int, k: int, w: int, t: int) -> None:
        self.score = torch.full((rows, k), float("-inf"))
        self.pos = torch.full((rows, k), -1, dtype=torch.int64)
        self.tokens = torch.full((rows, k, w), -1, dtype=torch.int32)
        self.acts = torch.zeros(rows, k, w, t)
        self.fired = torch.zeros(rows, k, w, dtype=torch.bool)
        self.written = torch.zeros(rows, k, dtype=torch.bool)

    def write(self, r: torch.Tensor, s: torch.Tensor, d: dict[str, torch.Tensor]) -> None:
        for f, v in d.items():
            getattr(self, f)[r, s] = v
        self.written[r, s] = True


def _random_windows(
    g: torch.Generator, n: int, w: int, t: int, positions: torch.Tensor, dense_site: bool
) -> dict[str, torch.Tensor]:
    """Windows whose tokens are a function of the position (as in a harvest)."""
    pos = positions[torch.randint(0, positions.numel(), (n,), generator=g)]
    tokens = ((pos[:, None] * 31 + torch.arange(w)) % 97).to(torch.int32)
    fired = torch.rand(n, w, generator=g) < 0.3
    fired[:, w // 2] = True
    acts = torch.randn(n, w, t, generator=g)
    if not dense_site:  # zero off the firings, as the sparse contract says
        acts = torch.where(fired[..., None], acts, torch.zeros_like(acts))
    # awkward bits: -0.0 off a firing (dense sites), an exact zero at a firing, a NaN payload
    if dense_site:
        acts[0, 0, 0] = -0.0
    acts[1, w // 2, :] = 0.0
    acts[2, w // 2, 0] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)
    return {"score": acts[:, w // 2, 0], "pos": pos, "tokens": tokens, "acts": acts, "fired": fired}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def _assert_same_as_reference(bank: ExampleBank, ref: DenseStore) -> None:
    rows, slots = ref.written.nonzero().unbind(1)
    for f in ("score", "pos", "tokens", "acts", "fired"):
        got = bank.field(f, rows, slots)
        assert _bitwise_equal(got, getattr(ref, f)[rows, slots]), f


@pytest.mark.parametrize("dense_site", [False, True])
@pytest.mark.parametrize("context", [3, 20])
def test_overwrites_and_compactions_keep_every_bit(dense_site: bool, context: int) -> None:
    C, K, T = 40, 4, 2
    w = 2 * context + 1
    g = torch.Generator().manual_seed(context + dense_site)
    bank = ExampleBank(C, K, w, T)
    bank.POOL_MIN, bank.HEAP_MIN = 8, 16  # compact often
    ref = DenseStore(C, K, w, T)
    bank.rows_for(torch.arange(C))
    bank.filled[:] = K
    pool_compactions = heap_compactions = 0
    for step in range(60):
        n = 30
        # each call writes distinct slots, referring to positions of its own "batch"
        flat = torch.randperm(C * K, generator=g)[:n]
        r, s = flat // K, flat % K
        d = _random_windows(g, n, w, T, torch.arange(step * 10, step * 10 + 10), dense_site)
        pool_before, heap_before = bank.pool_pos.shape[0], bank.heap.shape[0]
        pool_used, heap_used = bank.pool_used, bank.heap_used
        bank.write(r, s, d["score"], d["pos"], Windows(d["tokens"], d["acts"], d["fired"]))
        ref.write(r, s, d)
        pool_compactions += bank.pool_used < pool_used or bank.pool_pos.shape[0] != pool_before
        heap_compactions += bank.heap_used < heap_used or bank.heap.shape[0] != heap_before
        _assert_same_as_reference(bank, ref)
    assert pool_compactions >= 5 and heap_compactions >= 5
    assert bank.heap_live == int(
        bank._referenced_values(bank.hoff.reshape(-1), bank.sbits.reshape(-1, bank.n_words))
    )
    # bounded by what the slots refer to: distinct positions and stored values (times 2, plus
    # one call's appends), however many windows were written
    rows, slots = ref.written.nonzero().unbind(1)
    live_rows = torch.unique(ref.pos[rows, slots]).numel()
    assert bank.pool_pos.shape[0] <= max(8, 2 * (live_rows + 30))
    stored = ref.fired | (ref.acts.view(torch.int32) != 0).any(-1)
    live_values = int(stored[rows, slots].sum()) * T
    assert bank.heap.shape[0] <= max(16, 2 * (live_values + 30 * w * T))
    if not dense_site:  # a sparse site's window costs one value per firing and type
        assert live_values == int(ref.fired[rows, slots].sum()) * T


def test_layout_bytes_per_alive_component() -> None:
    """Per row: filled 8 + per slot score 4 + pool row 4 + two 17-bit masks 4 + 4 + heap
    offset 4 bytes (the token pool and the value heap are counted apart)."""
    bank = ExampleBank(1000, 20, 17, 1)
    assert bank.nbytes()["row"] == 8 + 20 * (4 + 4 + 4 + 4 + 4)
    dense = 8 + 20 * (4 + 8 + 17 * 4 + 17 * 4 * 1 + 17)  # the dense layout, per bank row
    assert dense == 3308 and bank.nbytes()["row"] * 8 < dense


def _acc(context: int = 2, k: int = 3, seq: int = 7) -> HarvestAccumulator:
    layout = Layout.of(
        [Site(name="s", n_components=9, reads_from="0.mlp_in", writes_to=("0.mlp_out",))],
        ["a", "b"],
    )
    cfg = HarvestConfig(examples_per_component=k, context_tokens=context, batch_size=2, seq_len=seq)
    return HarvestAccumulator(layout, cfg, 11)


def _batch(g: int, seq: int = 7) -> HarvestBatch:
    gen = torch.Generator().manual_seed(g)
    a = torch.relu(torch.randn(2, seq, 9, generator=gen))
    b = torch.randn(2, seq, 9, generator=gen)  # non-zero off the firings: a dense site
    return HarvestBatch(
        tokens=torch.randint(0, 11, (2, seq), generator=gen),
        firings={"s": a > 0},
        activations={"s": {"a": a, "b": b}},
        next_token_logits=torch.randn(2, seq, 11, generator=gen),
    )


def _dense_layout_state(acc: HarvestAccumulator) -> dict[str, torch.Tensor]:
    """``acc.state()`` with both banks in the dense layout of the earlier versions (keys
    ``<bank>.filled/score/pos/tokens/acts/fired``; unfilled slots -inf, -1, -1, 0, False)."""
    tensors, _ = acc.state()
    out = {k: v for k, v in tensors.items() if not k.startswith(("top.", "reservoir."))}
    for name, bank in (("top", acc.top), ("reservoir", acc.reservoir)):
        n, K, w, T = bank.n_rows, bank.k, bank.width, bank.n_types
        ref = DenseStore(n, K, w, T)
        rows, slots = bank.filled_slots(torch.arange(n))
        ref.write(rows, slots, bank.dense(rows, slots))
        out[f"{name}.component"] = bank.component.clone()
        out[f"{name}.filled"] = bank.filled[:n].clone()
        for f in ("score", "pos", "tokens", "acts", "fired"):
            out[f"{name}.{f}"] = getattr(ref, f)
    return out


def _logical(acc: HarvestAccumulator) -> dict[str, torch.Tensor]:
    out = {}
    for name, bank in (("top", acc.top), ("reservoir", acc.reservoir)):
        rows, slots = bank.filled_slots(torch.arange(bank.n_rows))
        out[f"{name}.component"] = bank.component
        out[f"{name}.filled"] = bank.filled[: bank.n_rows]
        for f, v in bank.dense(rows, slots).items():
            out[f"{name}.{f}"] = v
    return out


def test_dense_layout_checkpoint_converts_and_resumes_exactly() -> None:
    acc = _acc()
    for g in range(6):
        acc.update(_batch(g), g)
    _, meta = acc.state()
    old = _dense_layout_state(acc)
    assert "top.tokens" in old and "top.heap" not in old
    resumed = HarvestAccumulator.from_state(old, meta)
    assert {k: v.shape for k, v in _logical(resumed).items()} == {
        k: v.shape for k, v in _logical(acc).items()
    }
    for k, v in _logical(acc).items():
        assert _bitwise_equal(_logical(resumed)[k], v), k
    for g in range(6, 12):
        acc.update(_batch(g), g)
        resumed.update(_batch(g), g)
    for k, v in _logical(acc).items():
        assert _bitwise_equal(_logical(resumed)[k], v), k


def test_compact_checkpoint_resumes_bit_for_bit() -> None:
    acc = _acc()
    for g in range(5):
        acc.update(_batch(g), g)
    resumed = HarvestAccumulator.from_state(*acc.state())
    for g in range(5, 12):
        acc.update(_batch(g), g)
        resumed.update(_batch(g), g)
    a, b = acc.state()[0], resumed.state()[0]
    assert a.keys() == b.keys() and "top.heap" in a
    for k in a:  # the internal layout too: the same compactions at the same moments
        assert _bitwise_equal(a[k], b[k]), k


def test_checkpoint_in_no_known_layout_is_refused() -> None:
    acc = _acc()
    acc.update(_batch(0), 0)
    tensors, meta = acc.state()
    del tensors["top.heap"]
    with pytest.raises(ConfigError, match="no known layout"):
        HarvestAccumulator.from_state(tensors, meta)
    tensors, meta = acc.state()
    meta = {**meta, "config": {**meta["config"], "context_tokens": 20}}
    with pytest.raises(ConfigError, match="window"):
        HarvestAccumulator.from_state(tensors, meta)


def test_wide_windows_against_brute_force() -> None:
    """A 2W + 1 = 35-token window (two flag words): the top examples of a brute-force pass."""
    W, S, K = 17, 40, 3
    acc = _acc(context=W, k=K, seq=S)
    batches = [_batch(g, S) for g in range(4)]
    for g, b in enumerate(batches):
        acc.update(b, g)
    tokens = torch.cat([b.tokens.reshape(-1) for b in batches])
    fired = torch.cat([b.firings["s"].reshape(-1, 9) for b in batches])
    acts = {t: torch.cat([b.activations["s"][t].reshape(-1, 9) for b in batches]) for t in "ab"}
    bank = acc.top
    for c in range(9):
        on = fired[:, c].nonzero().flatten()
        order = torch.argsort(acts["a"][on, c], descending=True, stable=True)[:K]
        row = int(bank.row_of[c])
        # slots are unordered (topk_plan); ranked_slots gives the rank order
        slots = ranked_slots(bank, torch.tensor([row]))[0, : int(bank.filled[row])]
        rows = torch.full_like(slots, row)
        got = bank.dense(rows, slots)
        assert got["pos"].tolist() == on[order].tolist()
        for j, p in enumerate(on[order].tolist()):
            seq, s = divmod(p, S)
            for i, q in enumerate(range(s - W, s + W + 1)):
                inside = 0 <= q < S
                at = seq * S + q
                assert int(got["tokens"][j, i]) == (int(tokens[at]) if inside else -1)
                assert bool(got["fired"][j, i]) == (inside and bool(fired[at, c]))
                for t, name in enumerate("ab"):
                    want = float(acts[name][at, c]) if inside else 0.0
                    assert float(got["acts"][j, i, t]) == want


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("density", [0.8, 0.07])
def test_unordered_top_k_with_many_ties_is_the_brute_force_ranking(k: int, density: float) -> None:
    """Scores from four values (ties everywhere). Dense: several firings per component per
    batch, rows that fill, overflow and evict within one batch. Sparse: full rows that get one
    candidate (the worst entry's slot, unless the worst score is shared). Ranked by
    ``ranked_slots``, each row is the brute-force top-K (score descending, earlier position
    first), and the slots ``0..filled-1`` are what is filled."""
    seq, n_batches = 9, 12 if density > 0.5 else 60
    acc = _acc(context=1, k=k, seq=seq)
    gen = torch.Generator().manual_seed(k)
    scores, positions = [], []
    for g in range(n_batches):
        a = torch.randint(1, 5, (2, seq, 9), generator=gen).float() * 0.5
        a = a * (torch.rand(2, seq, 9, generator=gen) < density)  # 0 = not firing
        batch = HarvestBatch(
            tokens=torch.randint(0, 11, (2, seq), generator=gen),
            firings={"s": a > 0},
            activations={"s": {"a": a, "b": a.clone()}},
            next_token_logits=torch.randn(2, seq, 11, generator=gen),
        )
        acc.update(batch, g)
        scores.append(a.reshape(-1, 9))
        positions.append(torch.arange(2 * seq) + g * 2 * seq)
        _assert_top_k_is(acc.top, torch.cat(scores), torch.cat(positions), k)  # every batch


def _assert_top_k_is(bank: ExampleBank, score: torch.Tensor, pos: torch.Tensor, k: int) -> None:
    for c in range(score.shape[1]):
        on = torch.nonzero(score[:, c] > 0).flatten()
        if on.numel() == 0:
            continue
        want = sorted(zip((-score[on, c]).tolist(), pos[on].tolist(), strict=True))[:k]
        row = int(bank.row_of[c])
        n = int(bank.filled[row])
        assert n == min(k, on.numel())
        slots = ranked_slots(bank, torch.tensor([row]))[0]
        assert sorted(slots[:n].tolist()) == list(range(n))  # the filled prefix
        got = bank.dense(torch.full((n,), row), slots[:n])
        assert list(zip((-got["score"]).tolist(), got["pos"].tolist(), strict=True)) == want
