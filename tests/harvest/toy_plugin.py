"""A throwaway method plugin for harvest tests: a tiny, deterministic torch "decomposition".

It is a test fixture (a real plugin registered through ``temporary_plugins``), not a mock of
the harvest code: the harvest treats it exactly like any method.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from spd_host.adapter import (
    DecompositionDefaults,
    DeferredNextTokenTopK,
    HarvestBatch,
    HarvestOptions,
    MethodInfo,
    NextTokenTopK,
    Site,
    SparseActivity,
    next_token_topk_of,
)
from spd_host.hookspecs import hookimpl

V = 23
D = 8
SITES = (("0.mlp", 7), ("1.mlp", 5))
ACT_TYPES = ("act", "pre")
FORM = "dense"
"""How the toy plugin hands its batches over (tests set it):

- ``dense``: ``[B, S, C]`` firings and activations and full logits (the original contract);
- ``masked``: the same, with ``pre`` zeroed where the component does not fire, so that the
  sparse contract holds;
- ``sparse``: ``masked`` as ``SparseActivity`` entries in a shuffled order (when the host
  accepts the sparse form);
- ``topk``: ``sparse`` plus ``NextTokenTopK`` with 3 more tokens than the host asked for;
- ``deferred``: ``topk`` as a ``DeferredNextTokenTopK`` when the host allows it (the top-k of
  the logits computed when the host accumulates the batch; it records the thread).
"""
DEFERRED_THREADS: list[str] = []
"""The threads that computed a deferred top-k (``deferred`` form), in order."""
METHOD = MethodInfo(
    name="toy", description="A toy decomposition for tests: components are random directions."
)


class ToyTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"t{i} " for i in ids)

    def __len__(self) -> int:
        return V


@dataclass
class ToyAdapter:
    decomposition_id: str = "toy:demo"
    method: MethodInfo = METHOD
    sites: list[Site] = field(
        default_factory=lambda: [
            Site(
                name=n, n_components=c, reads_from=f"{n[0]}.mlp_in", writes_to=(f"{n[0]}.mlp_out",)
            )
            for n, c in SITES
        ]
    )
    activation_types: tuple[str, ...] = ACT_TYPES
    base_model_name: str = "toy"
    defaults: DecompositionDefaults = field(
        default_factory=lambda: DecompositionDefaults(seq_len=12, dataset="toy")
    )

    def load_base_model(self) -> Any:
        return torch.nn.Identity()

    def load_tokenizer(self) -> Any:
        return ToyTokenizer()


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    w = {"emb": torch.randn(V, D, generator=g), "unembed": torch.randn(D, V, generator=g)}
    for name, c in SITES:
        w[name] = torch.randn(D, c, generator=g)
    return w


def toy_harvest_fn(
    threshold: float, options: HarvestOptions | None = None
) -> Callable[[torch.Tensor], HarvestBatch]:
    w = _weights()
    sleep = float(os.environ.get("TOY_SLEEP", "0"))
    form = FORM
    options = options or HarvestOptions(threshold=threshold)

    def fn(tokens: torch.Tensor) -> HarvestBatch:
        if sleep:
            time.sleep(sleep)
        x = w["emb"][tokens]
        # mix in the previous token so activations depend on context
        x = x + 0.5 * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        firings, acts = {}, {}
        for name, _ in SITES:
            pre = x @ w[name] - 0.8
            act = torch.relu(pre)
            firings[name] = act > threshold
            if form != "dense":
                pre = torch.where(firings[name], pre, torch.zeros_like(pre))
            acts[name] = {"act": act, "pre": pre}
        logits = x @ w["unembed"]
        if form in ("dense", "masked") or not options.sparse:
            return HarvestBatch(
                tokens=tokens, firings=firings, activations=acts, next_token_logits=logits
            )
        sparse = {}
        for i, (name, C) in enumerate(SITES):
            pos, comp = firings[name].reshape(-1, C).nonzero().unbind(1)
            perm = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(i))
            pos, comp = pos[perm], comp[perm]
            values = {t: a.reshape(-1, C)[pos, comp] for t, a in acts[name].items()}
            sparse[name] = SparseActivity(pos, comp, values)
        top_k = options.next_token_top_k
        if form == "deferred" and top_k is not None and options.defer_next_token:
            k = top_k + 3

            def later() -> NextTokenTopK:
                DEFERRED_THREADS.append(threading.current_thread().name)
                return next_token_topk_of(logits, k)

            return HarvestBatch(
                tokens=tokens,
                firings={},
                activations={},
                sparse=sparse,
                next_token_topk=DeferredNextTokenTopK(later, V),
            )
        if form in ("topk", "deferred") and top_k is not None:
            return HarvestBatch(
                tokens=tokens,
                firings={},
                activations={},
                sparse=sparse,
                next_token_topk=next_token_topk_of(logits, top_k + 3),
            )
        return HarvestBatch(
            tokens=tokens, firings={}, activations={}, sparse=sparse, next_token_logits=logits
        )

    return fn


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: Any) -> Any:
    return ToyAdapter()


@hookimpl
def harvest_fn(adapter: Any, options: HarvestOptions) -> Any:
    return toy_harvest_fn(options.threshold, options)


def toy_batch(g: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Global batch ``g`` of the toy dataset (a pure function of ``g``)."""
    gen = torch.Generator().manual_seed(10_000 + g)
    # skewed token distribution so some tokens are common and some rare
    probs = torch.linspace(1.0, 0.05, V) ** 2
    return torch.multinomial(probs, batch_size * seq_len, replacement=True, generator=gen).reshape(
        batch_size, seq_len
    )


def toy_source(batch_size: int, seq_len: int) -> Callable[[int, int, int], Iterator[torch.Tensor]]:
    def source(rank: int, world_size: int, start_batch: int) -> Iterator[torch.Tensor]:
        i = start_batch
        while True:
            yield toy_batch(rank + i * world_size, batch_size, seq_len)
            i += 1

    return source
