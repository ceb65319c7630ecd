"""Capturing and replacing the inputs/outputs of decomposed modules with torch hooks.

SPD components live on arbitrary modules (``c_fc``, ``down_proj``, ``wte``), whose inputs are not
all canonical hook points (the input of an MLP's down-projection is the post-activation hidden
state), so this plugin hooks the modules themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from spd_adapters._next_token import logits_of

__all__ = ["capture_inputs", "logits_of", "replace_outputs"]


@contextmanager
def capture_inputs(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Within the context, each forward records ``inputs[path]`` = the module's first argument."""
    inputs: dict[str, Tensor] = {}
    handles = []
    for path in paths:

        def hook(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, _p: str = path
        ) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            inputs[_p] = x

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replace_outputs(
    model: nn.Module, replacements: Mapping[str, Callable[[Tensor], Tensor | None]]
) -> Iterator[None]:
    """Within the context, module ``path``'s output is ``replacements[path](its input)``
    (a replacement returning ``None`` keeps the module's own output)."""
    handles = []
    for path, fn in replacements.items():

        def hook(
            _m: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            output: Any,
            *,
            _fn: Callable[[Tensor], Tensor | None] = fn,
        ) -> Tensor | None:
            x = args[0] if args else next(iter(kwargs.values()))
            out = _fn(x)
            if out is None:
                return None
            return out.to(output.dtype) if isinstance(output, Tensor) else out

        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
