"""Reading and zeroing what decomposition sites write, through the canonical topology.

A site's ``writes_to`` names canonical hook points (``3.mlp_out``) or module addresses
(``3.mlp.down``, for methods that decompose single modules). Hook points go through
``TransformerTopology.capture`` / ``replace``; module addresses through a forward hook on the
module the topology maps them to. Captures are entered *inside* a splice context, so they are
registered after the splice's own hooks and see the spliced values; when a forward runs more
than once (a splice that needs a clean pre-pass), the last forward wins.

``record_block_outputs`` / ``reuse_blocks_below`` let a forward start at a later block from
the clean forward's block outputs (the caller decides where that is exact).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from spd_host.errors import TopologyError
from spd_host.topology.hooks import _input_tensor, _output_tensor, _with_input, _with_output


def _split(topo: Any, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    hook_points = set(topo.hook_points())
    addresses = set(topo.addresses())
    hps: list[str] = []
    mods: list[str] = []
    for t in targets:
        if t in hook_points:
            hps.append(t)
        elif t in addresses:
            mods.append(t)
        else:
            raise TopologyError(
                f"site write target {t!r} is neither a hook point nor a module address of this {topo.architecture} model",
                hint="the decomposition's Site.writes_to must use canonical names (see spd_host.topology)",
            )
    return hps, mods


def _module(model: nn.Module, topo: Any, address: str) -> nn.Module:
    # looked up at call time: a splice may have swapped the module object
    return model.get_submodule(topo.module_path(address))


class _Merged(Mapping[str, torch.Tensor]):
    """A live view over the topology's capture dict and the module-output captures."""

    def __init__(self, *parts: Mapping[str, torch.Tensor]) -> None:
        self._parts = parts

    def __getitem__(self, key: str) -> torch.Tensor:
        for part in self._parts:
            if key in part:
                return part[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in self._parts:
            for k in part:
                if k not in seen:
                    seen.add(k)
                    yield k

    def __len__(self) -> int:
        return sum(1 for _ in self)


@contextmanager
def capture_targets(
    model: nn.Module, topo: Any, targets: Sequence[str]
) -> Iterator[Mapping[str, torch.Tensor]]:
    """``with capture_targets(model, topo, ["3.mlp_out"]) as acts: model(x); y = acts[...]``.

    Read the values inside the ``with`` block.
    """
    hps, mods = _split(topo, targets)
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        hp_acts: Mapping[str, torch.Tensor] = stack.enter_context(topo.capture(hps)) if hps else {}
        for address in mods:

            def hook(_m: nn.Module, _a: Any, output: Any, address: str = address) -> None:
                out[address] = _output_tensor(output).detach()

            stack.callback(_module(model, topo, address).register_forward_hook(hook).remove)
        yield _Merged(out, hp_acts)


@contextmanager
def zero_targets(model: nn.Module, topo: Any, targets: Sequence[str]) -> Iterator[None]:
    """Within the context, each target's value is replaced by zeros (zero-ablation)."""
    hps, mods = _split(topo, targets)
    with ExitStack() as stack:
        if hps:
            stack.enter_context(topo.replace({hp: torch.zeros_like for hp in hps}))
        for address in mods:

            def hook(_m: nn.Module, _a: Any, output: Any) -> Any:
                if isinstance(output, tuple):
                    return (torch.zeros_like(output[0]), *output[1:])
                return torch.zeros_like(output)

            stack.callback(_module(model, topo, address).register_forward_hook(hook).remove)
        yield


@contextmanager
def keep_original_at(
    model: nn.Module, topo: Any, targets: Sequence[str], splice_here: torch.Tensor
) -> Iterator[None]:
    """Undo a splice at the positions where ``splice_here`` ([B, S] bool) is False.

    Enter it *inside* the splice context: it records each target's value with a hook that runs
    before every other hook on that module (prepended last, so it sees what the base module
    computed in this forward) and, with a hook that runs after them, puts that value back
    where ``splice_here`` is False. This is SAELens' ``torch.where(mask, sae_out, original)``
    for adapters whose splice replaces the write target itself; an adapter that splices inside
    a module instead takes a ``positions`` argument (see ``fidelity``).
    """
    hps, mods = _split(topo, targets)
    keep = ~splice_here

    def merged(original: torch.Tensor, spliced: torch.Tensor) -> torch.Tensor:
        m = keep.to(spliced.device).reshape(*keep.shape, *([1] * (spliced.ndim - keep.ndim)))
        return torch.where(m, original.to(spliced.dtype), spliced)

    with ExitStack() as stack:
        points: list[tuple[str, str, nn.Module]] = [
            (a, "output", _module(model, topo, a)) for a in mods
        ]
        for hp in hps:
            site = topo.site(hp)
            points.append((hp, site.where, model.get_submodule(site.module_path)))
        for _key, where, module in points:
            saved: dict[str, torch.Tensor] = {}
            if where == "input":

                def rec_in(_m: nn.Module, args: Any, kwargs: Any, saved: Any = saved) -> None:
                    saved["x"] = _input_tensor(args, kwargs)[0]

                def merge_in(_m: nn.Module, args: Any, kwargs: Any, saved: Any = saved) -> Any:
                    value, slot = _input_tensor(args, kwargs)
                    return _with_input(args, kwargs, slot, merged(saved["x"], value))

                h1 = module.register_forward_pre_hook(rec_in, with_kwargs=True, prepend=True)
                h2 = module.register_forward_pre_hook(merge_in, with_kwargs=True)
            else:

                def rec_out(_m: nn.Module, _a: Any, out: Any, saved: Any = saved) -> None:
                    saved["y"] = _output_tensor(out)

                def merge_out(_m: nn.Module, _a: Any, out: Any, saved: Any = saved) -> Any:
                    return _with_output(out, merged(saved["y"], _output_tensor(out)))

                h1 = module.register_forward_hook(rec_out, prepend=True)
                h2 = module.register_forward_hook(merge_out)
            stack.callback(h1.remove)
            stack.callback(h2.remove)
        yield


# -- starting a forward above the blocks a splice leaves alone -----------------------------------
def first_block(topo: Any, names: Sequence[str]) -> int:
    """The lowest block any of ``names`` (hook points or module addresses) lies in.

    Global names (``embed``, ``unembed_in``, ``output``) and names the topology cannot place
    count as block 0: a forward for them is never shortened.
    """
    from spd_host.topology.grammar import parse_address, parse_hook_point

    blocks: list[int] = []
    for name in names:
        block: int | None = None
        for parse in (parse_hook_point, parse_address):
            try:
                block = parse(name).block
                break
            except TopologyError:
                continue
        if block is None:
            return 0
        blocks.append(block)
    return min(blocks) if blocks else 0


def _fresh(output: Any) -> Any:
    """A copy of a recorded block output, so that a block that writes its input in place
    cannot change what the next forward is given."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_fresh(o) for o in output)
    return output


@contextmanager
def record_block_outputs(
    model: nn.Module, topo: Any, upto: int | None = None
) -> Iterator[list[Any]]:
    """Within the context, ``outputs[i]`` is what block ``i`` returned in the last forward
    (a copy: the model's later in-place work cannot reach it), for blocks below ``upto`` (all
    when None; the rest stay None): one ``[B, S, d]`` tensor per block is held."""
    outputs: list[Any] = [None] * topo.n_layers
    n = topo.n_layers if upto is None else min(upto, topo.n_layers)
    with ExitStack() as stack:
        for i in range(n):

            def hook(_m: nn.Module, _a: Any, output: Any, i: int = i) -> None:
                outputs[i] = _fresh(output)

            block = model.get_submodule(topo.block_path(i))
            stack.callback(block.register_forward_hook(hook).remove)
        yield outputs


@contextmanager
def reuse_blocks_below(
    model: nn.Module, topo: Any, start: int, outputs: Sequence[Any]
) -> Iterator[None]:
    """Within the context, blocks ``0 .. start-1`` do not compute: each returns what it
    returned in the recorded (clean) forward, so a forward spends its time from block
    ``start`` on. Exact when nothing below ``start`` differs from that forward (same tokens,
    no replacement there); the caller must know that. A block whose ``forward`` is already
    replaced on the instance, or with no recorded output, computes as usual."""
    swapped: list[nn.Module] = []
    try:
        for i in range(min(start, topo.n_layers)):
            block = model.get_submodule(topo.block_path(i))
            if outputs[i] is None or "forward" in vars(block):
                continue

            def cached(*_args: Any, _out: Any = outputs[i], **_kwargs: Any) -> Any:
                return _fresh(_out)

            block.forward = cached  # type: ignore[method-assign]
            swapped.append(block)
        yield
    finally:
        for block in swapped:
            del block.forward
