"""Running the base model with decomposed modules replaced by their masked components.

Inside :func:`splice`, every forward of ``model`` replaces each chosen module's output by
``((x V) * m) U + b`` where the mask ``m`` is:

- ``ci_masked``: the causal importances;
- ``rounded_ci``: the causal importances rounded to 0/1 (``torch.round``: 0.5 -> 0);
- ``all_ones``: ones (the full reconstruction ``x (V U) + b``);
- ``zero_mask``: zeros (the module outputs only its bias).

As in the reference evaluation, the causal importances are computed from the *unmodified*
forward: the CI variants first run the model once without replacement (capturing every
decomposed module's input, which a global CI function needs), then run the spliced forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from spd_adapters.spd.capture import capture_inputs, replace_outputs
from spd_adapters.spd.model import SpdModel
from spd_host.errors import ConfigError

SPLICE_VARIANTS = ("ci_masked", "all_ones", "rounded_ci", "zero_mask")
_NEEDS_CI = ("ci_masked", "rounded_ci")


@contextmanager
def splice(
    model: nn.Module,
    spd: SpdModel,
    paths: Sequence[str],
    variant: str,
) -> Iterator[None]:
    if variant not in SPLICE_VARIANTS:
        raise ConfigError(
            f"unknown SPD splice variant {variant!r}", hint=f"one of: {', '.join(SPLICE_VARIANTS)}"
        )
    masks: dict[str, Tensor] = {}
    state = {"clean": False}

    def replacement(path: str) -> Callable[[Tensor], Tensor]:
        comp = spd.components[path]

        def fn(x: Tensor) -> Tensor:
            if variant == "all_ones":
                return comp.forward(x)
            if variant == "zero_mask":
                shape = (*x.shape, comp.C) if comp.kind == "embedding" else (*x.shape[:-1], comp.C)
                return comp.forward(x, torch.zeros(shape, dtype=comp.V.dtype, device=x.device))
            return comp.forward(x, masks[path])

        return fn

    def pre_forward(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state["clean"]:
            return
        state["clean"] = True  # the nested clean forward: no CI pass, no replacement
        try:
            with torch.no_grad(), capture_inputs(model, spd.paths) as inputs:
                model(*args, **kwargs)
            ci = spd.causal_importance(inputs)
        finally:
            state["clean"] = False
        masks.clear()
        for p in paths:
            masks[p] = ci[p].round() if variant == "rounded_ci" else ci[p]

    def guarded(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor | None]:
        return lambda x: None if state["clean"] else fn(x)

    with ExitStack() as stack:
        if variant in _NEEDS_CI:
            stack.callback(model.register_forward_pre_hook(pre_forward, with_kwargs=True).remove)
        stack.enter_context(replace_outputs(model, {p: guarded(replacement(p)) for p in paths}))
        yield
