"""Capture and replacement of hook-point tensors with torch forward hooks.

Every hook point is a :class:`Site`: the input or output of one module, or (``resid_mid``) the
block input plus the output of the module whose output the block adds to the residual stream.
Hooks are registered inside ``try`` and removed in ``finally``, so a forward that raises (or a
context body that raises) leaves the model clean.

Ordering: replacement hooks are registered with ``prepend=True`` and readers (captures and the
block-input recorders ``resid_mid`` needs) are appended, so a capture always records the tensor
the model actually uses, whatever the nesting order of ``capture`` and ``replace``. Two
replacements of the same hook point compose, the innermost context's function applied first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spd_host.errors import TopologyError


@dataclass(frozen=True)
class Site:
    """Where a hook point's tensor lives.

    ``where="input"``: the first positional tensor argument of ``module_path`` (or its
    ``hidden_states`` keyword). ``where="output"``: the module's output (first element of a
    tuple). ``resid_block``: when set, the hook point is ``input(resid_block) + output(module)``
    (used for ``resid_mid``, which HF blocks never materialise as a module boundary).
    """

    module_path: str
    where: Literal["input", "output"]
    resid_block: str | None = None


def _input_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, int | str]:
    if args and isinstance(args[0], Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return value, key
    raise TopologyError("hooked module was called without a tensor argument")


def _with_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], slot: int | str, value: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(slot, int):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, slot: value}


def _output_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TopologyError(
        f"hooked module returned {type(output).__name__}, not a tensor or tuple of tensors"
    )


def _with_output(output: Any, value: Tensor) -> Any:
    if isinstance(output, Tensor):
        return value
    return type(output)([value, *output[1:]])


def _checked(name: str, fn: Callable[[Tensor], Tensor], original: Tensor) -> Tensor:
    new = fn(original)
    if not isinstance(new, Tensor):
        raise TopologyError(
            f"replacement for hook point {name!r} returned {type(new).__name__}, not a Tensor"
        )
    if new.shape != original.shape:
        raise TopologyError(
            f"replacement for hook point {name!r} returned shape {list(new.shape)}, "
            f"expected {list(original.shape)}",
            hint="the replacement must have the same shape as the tensor it replaces",
        )
    return new


class _BlockInput:
    """Records the tensor a block was called with, for ``resid_mid``."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.value = _input_tensor(args, kwargs)[0]

    def get(self, name: str) -> Tensor:
        if self.value is None:
            raise TopologyError(
                f"hook point {name!r}: the block's input was not seen before its attention output"
            )
        return self.value


@contextmanager
def capture_sites(
    model: nn.Module, sites: Mapping[str, Site], *, detach: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Record the tensor at each site during forwards inside the context (last forward wins)."""
    acts: dict[str, Tensor] = {}
    handles: list[RemovableHandle] = []

    def store(name: str, value: Tensor) -> None:
        acts[name] = value.detach() if detach else value

    try:
        for name, site in sites.items():
            module = model.get_submodule(site.module_path)
            if site.resid_block is not None:
                block_input = _BlockInput()
                block = model.get_submodule(site.resid_block)
                handles.append(block.register_forward_pre_hook(block_input.hook, with_kwargs=True))

                def on_branch(
                    m: nn.Module, a: Any, out: Any, name: str = name, rec: _BlockInput = block_input
                ) -> None:
                    store(name, rec.get(name) + _output_tensor(out))

                handles.append(module.register_forward_hook(on_branch))
            elif site.where == "input":

                def on_input(m: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
                    store(name, _input_tensor(args, kwargs)[0])

                handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
            else:

                def on_output(m: nn.Module, a: Any, out: Any, name: str = name) -> None:
                    store(name, _output_tensor(out))

                handles.append(module.register_forward_hook(on_output))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replace_sites(
    model: nn.Module, sites: Mapping[str, Site], fns: Mapping[str, Callable[[Tensor], Tensor]]
) -> Iterator[None]:
    """Within the context, the tensor at each site becomes ``fns[name](original)``."""
    handles: list[RemovableHandle] = []
    try:
        for name, site in sites.items():
            fn = fns[name]
            module = model.get_submodule(site.module_path)
            if site.resid_block is not None:
                block_input = _BlockInput()
                block = model.get_submodule(site.resid_block)
                # appended: sees the block input after any resid_pre replacement
                handles.append(block.register_forward_pre_hook(block_input.hook, with_kwargs=True))

                def on_branch(
                    m: nn.Module,
                    a: Any,
                    out: Any,
                    name: str = name,
                    fn: Any = fn,
                    rec: _BlockInput = block_input,
                ) -> Any:
                    base = rec.get(name)
                    branch = _output_tensor(out)
                    new_total = _checked(name, fn, base + branch)
                    return _with_output(out, new_total - base)

                handles.append(module.register_forward_hook(on_branch, prepend=True))
            elif site.where == "input":

                def on_input(
                    m: nn.Module, args: Any, kwargs: Any, name: str = name, fn: Any = fn
                ) -> Any:
                    value, slot = _input_tensor(args, kwargs)
                    return _with_input(args, kwargs, slot, _checked(name, fn, value))

                handles.append(
                    module.register_forward_pre_hook(on_input, with_kwargs=True, prepend=True)
                )
            else:

                def on_output(
                    m: nn.Module, a: Any, out: Any, name: str = name, fn: Any = fn
                ) -> Any:
                    return _with_output(out, _checked(name, fn, _output_tensor(out)))

                handles.append(module.register_forward_hook(on_output, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["Site", "capture_sites", "replace_sites"]
