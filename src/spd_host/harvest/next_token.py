"""The top-k next-token probabilities of a batch, on the harvest device, without a softmax.

Three input forms (see ``HarvestBatch``): full logits, full probabilities, or the plugin's own
``NextTokenTopK`` (top-k logits, their indices and the logsumexp of the full logits; a
``DeferredNextTokenTopK`` is computed here, on the thread that accumulates the batch). For
logits, ``p_i = exp(l_i - logsumexp(l))`` for the k largest logits only: ``topk`` plus one
``logsumexp`` over the vocabulary instead of a ``[N, V]`` softmax. Probabilities are computed
in float64 from the float32 logits, on the CPU (the same formula in every form and on every
device, so a plugin's top-k and the host's top-k of the same logits, on any device, give the
same bits). The logsumexp of full logits handed to the host is computed on the harvest
device in float32; a plugin's ``NextTokenTopK`` carries its own.
"""

from __future__ import annotations

import torch

from spd_host.adapter import DeferredNextTokenTopK, HarvestBatch
from spd_host.errors import HarvestBatchError


def next_token_topk(
    batch: HarvestBatch, N: int, k: int, V: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [N, k'] float64, token ids [N, k'] int64)``; ``k' = 0`` without next-token data.

    Raises ``HarvestBatchError`` when the vocabulary does not match ``V``.
    """
    k = min(k, V)
    tk = batch.next_token_topk
    if isinstance(tk, DeferredNextTokenTopK):
        tk = tk.resolve()  # the plugin's LM head and top-k, here on the accumulation thread
    if tk is not None:
        if int(tk.vocab_size) != V:
            raise _vocab_error(
                f"next-token top-k is over {tk.vocab_size} classes, expected vocab {V}"
            )
        lv = tk.values.to(device).reshape(N, -1).to(torch.float32)
        li = tk.indices.to(device).reshape(N, -1).to(torch.int64)
        lse = tk.logsumexp.to(device).reshape(N).to(torch.float32)
        if lv.shape[1] > k:
            lv, sel = torch.topk(lv, k, dim=-1, sorted=False)
            li = torch.gather(li, 1, sel)
        return _probs(lv, lse), li
    if batch.next_token_logits is not None:
        logits = batch.next_token_logits.to(device).reshape(N, -1)
        if logits.shape[1] != V:
            raise _vocab_error(
                f"next-token tensor has {logits.shape[1]} classes, expected vocab {V}"
            )
        lv, li = torch.topk(logits, k, dim=-1, sorted=False)
        lse = torch.logsumexp(logits.to(torch.float32), dim=-1)
        return _probs(lv.to(torch.float32), lse), li
    if batch.next_token_probs is not None:
        p = batch.next_token_probs.to(device).reshape(N, -1).to(torch.float32)
        if p.shape[1] != V:
            raise _vocab_error(f"next-token tensor has {p.shape[1]} classes, expected vocab {V}")
        pv, pi = torch.topk(p, k, dim=-1, sorted=False)
        return pv.to(torch.float64), pi
    empty = torch.zeros(N, 0, dtype=torch.float64, device=device)
    return empty, torch.zeros(N, 0, dtype=torch.int64, device=device)


def _probs(values: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(value - logsumexp)`` in float64, evaluated on the CPU whatever the device.

    Why the CPU: ``exp`` differs in the last bit between device libraries, and one bit can
    move a probability across a ``2**-30`` rounding step; only ``[N, k]`` values cross (a few
    MB per batch), so every device gets the CPU's bits.
    """
    dev = values.device
    v = values.to("cpu", torch.float64)
    p = torch.exp(v - lse.to("cpu", torch.float64)[:, None])
    return p.to(dev)


def _vocab_error(message: str) -> HarvestBatchError:
    return HarvestBatchError(
        message, hint="every batch's next-token data must cover the same vocabulary"
    )
