"""The harvest tests' toy method (``bad:demo``) told to misbehave: ``MODE`` names one way a
plugin's HarvestFn can break the HarvestBatch contract (tests set it). A real plugin
registered through ``temporary_plugins``; the harvest treats it like any method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spd_host.adapter import DeferredNextTokenTopK, HarvestBatch, MethodInfo, next_token_topk_of
from spd_host.hookspecs import hookimpl
from tests.harvest import toy_plugin

METHOD = MethodInfo(name="bad", description="The toy method, misbehaving on purpose.")
MODE = "none"
BAD_ACT = 2.0e9  # past the 2**30 that exact fixed-point sums at 2**-32 can hold per value


def _misbehave(mode: str, call: int, tokens: torch.Tensor, b: HarvestBatch, k: int) -> Any:
    logits = b.next_token_logits
    assert logits is not None
    if mode == "none":
        return None
    if mode == "substituted_tokens":
        b.tokens = (tokens + 1) % toy_plugin.V
    elif mode == "nan_logits":
        logits[0, 1, 3] = float("nan")
    elif mode == "inf_logits":
        logits[1, 0, 2] = float("inf")
    elif mode in ("probs_not_summing_to_1", "negative_probs"):
        p = torch.softmax(logits, -1)
        if mode == "negative_probs":  # still sums to 1
            p[0, 0, 1] += p[0, 0, 0] + 0.25
            p[0, 0, 0] = -0.25
        else:
            p = 0.5 * p
        b.next_token_logits, b.next_token_probs = None, p
    elif mode in ("topk_over_1", "topk_nan", "deferred_topk_over_1", "deferred_vocab_lies"):
        tk = next_token_topk_of(logits, k)
        if mode.endswith("topk_over_1"):  # a logsumexp too small: the kept probabilities > 1
            tk.logsumexp = tk.logsumexp - 2.0
        elif mode == "topk_nan":
            tk.values[0, 0, 0] = float("nan")
        b.next_token_logits, b.next_token_topk = None, tk
        if mode.startswith("deferred"):  # the same, found when the host resolves it
            announced = toy_plugin.V + (mode == "deferred_vocab_lies")
            b.next_token_topk = DeferredNextTokenTopK(lambda: tk, announced)
    elif mode == "deferred_fails":

        def fails() -> Any:
            raise RuntimeError("the LM head ran out of memory")

        b.next_token_logits, b.next_token_topk = None, DeferredNextTokenTopK(fails, toy_plugin.V)
    elif mode == "vocab_smaller_than_token_ids":
        b.next_token_logits = logits[..., : toy_plugin.V - 5].contiguous()
    elif mode == "vocab_changes" and call == 1:
        b.next_token_logits = torch.cat([logits, torch.zeros_like(logits[..., :1])], -1)
    elif mode in ("huge_activation", "large_batch_sum"):
        site = toy_plugin.SITES[0][0]
        fired = b.firings[site]
        act = b.activations[site]["act"]
        if mode == "huge_activation":
            b_, s_, c_ = (int(i) for i in fired.nonzero()[0])
            act[b_, s_, c_] = BAD_ACT
        else:  # every value representable, the batch's sum far past 1e9
            act[..., 0] = torch.where(fired[..., 0], torch.tensor(5.0e8), act[..., 0])
    return b


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: Any) -> Any:
    if decomposition_id.method != "bad":
        return None
    return toy_plugin.ToyAdapter(decomposition_id="bad:demo", method=METHOD)


@hookimpl
def harvest_fn(adapter: Any, options: Any) -> Any:
    if adapter.method.name != "bad":
        return None
    inner = toy_plugin.toy_harvest_fn(options.threshold)  # dense form, full logits
    mode, calls = MODE, [0]
    k = int(options.next_token_top_k or 5)

    def fn(tokens: torch.Tensor) -> Any:
        out = _misbehave(mode, calls[0], tokens, inner(tokens), k)
        calls[0] += 1
        return out

    return fn
