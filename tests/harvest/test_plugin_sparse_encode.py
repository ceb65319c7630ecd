"""The plugins' direct sparse encode and blocked LM head against brute-force references.

References are written here from the definitions: activations from their formulas, firings
by thresholding the dense result, the sparse contract by looking for non-zeros off the
firings, next-token top-k from a full ``torch.softmax``. The fast routes must give exactly
what the dense route gives (same entries, same order, same bits).
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from spd_adapters._dictionary import Activation
from spd_adapters._next_token import HarvestForward
from spd_adapters._sparse_encode import BlockedEncode, SiteEncoder, row_blocks, sparse_encode
from spd_host.adapter import (
    DeferredNextTokenTopK,
    HarvestOptions,
    NextTokenTopK,
    sparse_activity_of,
)
from spd_host.models import no_cache_kwargs
from spd_host.plugins import get_host

torch.set_num_threads(1)
N, D, C = 300, 16, 96


def reference_acts(pre: Tensor, act: Activation) -> Tensor:
    """Each activation from its definition (``_dictionary.Activation``'s docstring)."""
    if act.kind == "relu":
        return torch.where(pre > 0, pre, torch.zeros_like(pre))
    if act.kind == "jumprelu":
        assert act.threshold is not None
        base = torch.where(pre > 0, pre, torch.zeros_like(pre)) if act.rectify else pre
        return torch.where(pre > act.threshold, base, torch.zeros_like(pre))
    assert act.kind == "topk" and act.k is not None
    order = pre.argsort(dim=-1, descending=True)[:, : act.k]  # continuous values: no ties
    out = torch.zeros_like(pre)
    for r in range(pre.shape[0]):
        for c in order[r].tolist():
            v = float(pre[r, c])
            out[r, c] = max(v, 0.0) if act.rectify else v
    return out


def reference_entries(acts: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """Firings in (position, component) order, or None when a non-firing value is non-zero."""
    fired = acts > threshold
    if bool(((acts != 0) & ~fired).any()):
        return None
    rows, cols = [], []
    for r in range(acts.shape[0]):
        for c in range(acts.shape[1]):
            if bool(fired[r, c]):
                rows.append(r)
                cols.append(c)
    p, c = torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)
    return p, c, acts[p, c]


def encoder(act: Activation, seed: int = 0) -> SiteEncoder:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    W = torch.randn(C, D, generator=g) / D**0.5
    b = torch.randn(C, generator=g) * 0.3 - 0.5

    def pre(t: Tensor) -> Tensor:
        return t @ W.T + b

    return SiteEncoder(x.view(3, 100, D), pre, act, C)


def activations() -> list[Activation]:
    g = torch.Generator().manual_seed(5)
    pos_thr = torch.rand(C, generator=g) * 0.4
    mixed_thr = torch.randn(C, generator=g) * 0.2  # some negative: the contract can break
    return [
        Activation("relu"),
        Activation("jumprelu", rectify=True, threshold=pos_thr),
        Activation("jumprelu", rectify=False, threshold=pos_thr),
        Activation("jumprelu", rectify=False, threshold=mixed_thr),
        Activation("jumprelu", rectify=True, threshold=mixed_thr),
        Activation("topk", k=7, rectify=True),
        Activation("topk", k=7, rectify=False),
    ]


@pytest.mark.parametrize("threshold", [0.0, 0.2])
@pytest.mark.parametrize("act", activations(), ids=lambda a: f"{a.kind}-{a.rectify}")
def test_sparse_encode_matches_brute_force(act: Activation, threshold: float) -> None:
    enc = encoder(act)
    pre = enc.pre(enc.x.reshape(-1, D))
    want = reference_entries(reference_acts(pre, act), threshold)
    for blocks in ([(0, N)], row_blocks(N, C, 64 * C), [(0, 64), (64, 128), (128, N)]):
        got = sparse_encode(enc, threshold, blocks=blocks)
        if want is None:
            assert got is None, blocks
            continue
        assert got is not None, blocks
        assert torch.equal(got.position, want[0]) and torch.equal(got.component, want[1])
        assert torch.allclose(got.values["activation"], want[2], atol=1e-6, rtol=0)
        # bit for bit what the dense route hands the host
        dense = enc.dense().float()
        ref = sparse_activity_of(dense > threshold, {"activation": dense})
        assert ref is not None
        assert torch.equal(got.position, ref.position)
        assert torch.equal(got.component, ref.component)
        assert torch.equal(got.values["activation"], ref.values["activation"])


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_pre_activations_go_the_dense_route(bad: float) -> None:
    act = Activation("jumprelu", rectify=False, threshold=torch.full((C,), 0.1))
    base = encoder(act)

    def pre(t: Tensor) -> Tensor:
        out = base.pre(t)
        out[:, 3] = bad  # never fires, but NaN * 0 (dense route) is a non-zero activation
        return out

    enc = SiteEncoder(base.x, pre, act, C)
    dense = enc.dense().float()
    assert sparse_activity_of(dense > 0, {"activation": dense}) is None
    assert sparse_encode(enc, 0.0, blocks=row_blocks(N, C, 64 * C)) is None


def test_negative_threshold_and_unsupported_kinds_have_no_sparse_route() -> None:
    assert sparse_encode(encoder(Activation("relu")), -0.1) is None
    assert sparse_encode(encoder(Activation("groupmax", k=8)), 0.0) is None
    assert sparse_encode(encoder(Activation("batchtopk", k=8)), 0.0) is None


def test_row_blocks_cover_in_multiples_of_64() -> None:
    assert row_blocks(100, 10, 10_000) == [(0, 100)]
    blocks = row_blocks(1000, 100, 64 * 100)
    assert blocks[0] == (0, 64) and blocks[-1][1] == 1000
    assert all(a == prev[1] for prev, (a, _) in itertools.pairwise(blocks))
    assert all((b - a) % 64 == 0 for a, b in blocks[:-1]) and blocks[-1][1] - blocks[-1][0] >= 64
    assert row_blocks(1000, 10**6, 1) == [(i, i + 64) for i in range(0, 896, 64)] + [(896, 1000)]


def test_blocked_encode_checks_once_and_keeps_blocks() -> None:
    enc = encoder(Activation("topk", k=5))
    blocked = BlockedEncode(elements=64 * C)
    first = blocked.encode("s", enc, 0.0)
    assert blocked.blocked_ok == {"s": True}  # blocked products are the whole one's rows here
    again = blocked.encode("s", enc, 0.0)
    assert first is not None and again is not None
    assert torch.equal(first.position, again.position)


def tiny_lm(seed: int = 0, vocab: int = 300) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=16, n_head=2, n_layer=2, vocab_size=vocab, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


class ScaledLogits(GPT2LMHeadModel):
    """A causal LM whose logits are not ``lm_head(base(tokens))`` (a soft-cap-like rescale)."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out


def capture_none():  # type: ignore[no-untyped-def]
    from contextlib import nullcontext

    return nullcontext({})


@pytest.mark.parametrize("k", [1, 5, 300, 400])
def test_blocked_head_top_k_matches_full_softmax(k: int) -> None:
    model = tiny_lm()
    tokens = torch.randint(0, 300, (3, 50), generator=torch.Generator().manual_seed(1))
    fwd = HarvestForward(model, capture_none, next_token=True, top_k=k, block_elements=64 * 300)
    first = fwd(tokens)[2]
    assert fwd.split_ok is True
    got = fwd(tokens)[2]  # the blocked route now
    assert first is not None and got is not None
    for f in ("values", "indices", "logsumexp"):
        assert torch.equal(getattr(got, f), getattr(first, f)), f
    with torch.no_grad():
        logits = model(tokens).logits
    probs = torch.softmax(logits.double(), dim=-1)
    kk = min(k, 300)
    ref_p, ref_i = probs.topk(kk, dim=-1)
    assert got.vocab_size == 300 and got.values.shape == (3, 50, kk)
    order = got.values.argsort(dim=-1, descending=True)
    idx = got.indices.gather(-1, order)
    assert torch.equal(idx.sort(-1).values, ref_i.sort(-1).values)
    p = torch.exp(got.values.double() - got.logsumexp.double()[..., None]).gather(-1, order)
    assert torch.allclose(p, ref_p, rtol=1e-5, atol=1e-7)
    assert torch.equal(got.values, logits.gather(-1, got.indices))


def test_deferred_head_top_k_is_the_immediate_one_resolved_later_on_another_thread() -> None:
    """``defer=True``: the split route hands the head's top-k over as work; resolved on another
    thread (grad on there) after the next batch's forward, it is the immediate top-k, bit for
    bit, and carries no autograd graph."""
    model = tiny_lm()
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 300, (3, 50), generator=gen) for _ in range(3)]
    now = HarvestForward(model, capture_none, next_token=True, top_k=5, block_elements=64 * 300)
    later = HarvestForward(
        model, capture_none, next_token=True, top_k=5, block_elements=64 * 300, defer=True
    )
    immediate = [now(t)[2] for t in batches]
    deferred = [later(t)[2] for t in batches]  # every forward first, as a pipelined harvest
    assert later.split_ok is True
    resolved: list[NextTokenTopK] = []

    def resolve_all() -> None:
        with torch.enable_grad():
            for d in deferred:
                assert isinstance(d, DeferredNextTokenTopK) and d.vocab_size == 300
                resolved.append(d.resolve())

    worker = threading.Thread(target=resolve_all)
    worker.start()
    worker.join()
    assert len(resolved) == 3
    for got, ref in zip(resolved, immediate, strict=True):
        assert isinstance(ref, NextTokenTopK) and got.vocab_size == ref.vocab_size
        for f in ("values", "indices", "logsumexp"):
            assert torch.equal(getattr(got, f), getattr(ref, f)), f
            assert not getattr(got, f).requires_grad
    assert deferred[0].resolve() is resolved[0]  # computed once


def test_model_whose_logits_are_not_the_head_keeps_the_ordinary_forward() -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_head=2, n_layer=2, vocab_size=300, n_positions=64)
    model = ScaledLogits(cfg).eval()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    fwd = HarvestForward(model, capture_none, next_token=True, top_k=4, block_elements=64 * 300)
    fwd(tokens)
    assert fwd.split_ok is False
    got = fwd(tokens)[2]
    with torch.no_grad():
        logits = model(tokens).logits
    assert got is not None
    assert torch.equal(got.logsumexp, torch.logsumexp(logits, -1))
    assert torch.equal(got.values, logits.gather(-1, got.indices))


@pytest.mark.parametrize("model_cls", [GPT2LMHeadModel, ScaledLogits])
def test_harvest_forward_builds_no_kv_cache(model_cls: type[GPT2LMHeadModel]) -> None:
    """Both routes (split and ordinary) run the transformer with ``use_cache=False``: the cache
    is never read and would be 2 x layers x [B, heads, S, d_head] of live memory per batch."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_head=2, n_layer=2, vocab_size=300, n_positions=64)
    model = model_cls(cfg).eval()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    fwd = HarvestForward(model, capture_none, next_token=True, top_k=4, block_elements=64 * 300)
    seen: list[object] = []
    inner = model.transformer.forward

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("use_cache"))
        return inner(*args, **kwargs)

    model.transformer.forward = recording  # type: ignore[method-assign]
    first = fwd(tokens)[2]
    again = fwd(tokens)[2]
    assert fwd.split_ok is (model_cls is GPT2LMHeadModel)
    assert seen and all(u is False for u in seen), seen
    with torch.no_grad():
        logits = model(tokens).logits  # default: with a cache; the logits are the same
    for got in (first, again):
        assert got is not None
        assert torch.equal(got.values, logits.gather(-1, got.indices))
        assert torch.equal(got.logsumexp, torch.logsumexp(logits, -1))
    assert no_cache_kwargs(model) == {"use_cache": False}
    assert no_cache_kwargs(torch.nn.Linear(2, 2)) == {}


@pytest.mark.parametrize("did", ["transcoder:demo", "clt:demo"])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_demo_harvest_fn_sparse_is_the_dense_route(did: str, threshold: float) -> None:
    host = get_host()
    adapter = host.load_adapter(did)
    tokens = torch.randint(0, 2048, (2, 96), generator=torch.Generator().manual_seed(3))
    dense = host.harvest_fn(adapter, HarvestOptions(threshold=threshold))(tokens)
    opts = HarvestOptions(threshold=threshold, sparse=True, next_token_top_k=16)
    sparse = host.harvest_fn(adapter, opts)(tokens)
    assert set(sparse.sparse) | set(sparse.firings) == set(dense.firings)
    for site, fired in dense.firings.items():
        acts = dense.activations[site]["activation"]
        ref = sparse_activity_of(fired, {"activation": acts})
        if ref is None:
            assert torch.equal(sparse.firings[site], fired)
            assert torch.equal(sparse.activations[site]["activation"], acts)
            continue
        got = sparse.sparse[site]
        assert torch.equal(got.position, ref.position)
        assert torch.equal(got.component, ref.component)
        assert torch.equal(got.values["activation"], ref.values["activation"])
    logits = dense.next_token_logits
    assert logits is not None and sparse.next_token_topk is not None
    tk = sparse.next_token_topk
    assert torch.equal(tk.logsumexp, torch.logsumexp(logits, -1))
    assert torch.equal(tk.values, logits.gather(-1, tk.indices))
    assert torch.equal(tk.values.sort(-1).values, logits.topk(16, -1).values.sort(-1).values)
    deferred = host.harvest_fn(adapter, opts.model_copy(update={"defer_next_token": True}))
    d = deferred(tokens).next_token_topk
    assert isinstance(d, DeferredNextTokenTopK) and d.vocab_size == tk.vocab_size
    got = d.resolve()
    for f in ("values", "indices", "logsumexp"):
        assert torch.equal(getattr(got, f), getattr(tk, f)), f


def _encoder_halves(tmp_path, kind: str):  # type: ignore[no-untyped-def]
    from tests.transcoder.test_formats import write_circuit_tracer, write_saelens, write_sparsify

    gen = torch.Generator().manual_seed(0)
    if kind == "sparsify":
        write_sparsify(
            tmp_path / "r",
            "layers.1.mlp",
            transcode=True,
            activation="topk",
            k=3,
            skip=True,
            gen=gen,
        )
        return f"transcoder:{tmp_path / 'r'}"
    if kind == "saelens":
        write_saelens(tmp_path / "r", "jumprelu_transcoder", gen=gen)
        return f"transcoder:{tmp_path / 'r'}"
    if kind == "saelens-rescaled":  # the decoder norms scale the pre-activations
        extra = {"k": 6, "rescale_acts_by_decoder_norm": True}
        write_saelens(tmp_path / "r", "topk", gen=gen, extra=extra)
        return f"transcoder:{tmp_path / 'r'}"
    write_circuit_tracer(tmp_path / "r", 2, gen=gen, threshold=True, skip=True)
    return f"transcoder:{tmp_path / 'r'}"


@pytest.mark.parametrize("kind", ["sparsify", "saelens", "saelens-rescaled", "circuit_tracer"])
def test_harvest_encoder_half_encodes_as_the_whole_dictionary(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    adapter = get_host().load_adapter(_encoder_halves(tmp_path, kind))
    for site in adapter.sites:
        half = adapter.encoder_dictionary(site.name)
        assert half.W_dec is None and half.W_skip is None  # a harvest never decodes
        whole = adapter.dictionary(site.name)
        assert whole.W_dec is not None
        x = torch.randn(5, whole.W_enc.shape[1], generator=torch.Generator().manual_seed(1))
        assert torch.equal(half.encode(x), whole.encode(x))
        assert adapter.encoder_dictionary(site.name) is whole  # the loaded whole is reused
