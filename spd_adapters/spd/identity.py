"""Identity modules inserted before target modules (``identity_module_info``).

The reference decomposes the identity map in front of a module: it attaches an identity module
as the attribute ``pre_identity`` of every module an ``identity_module_info`` pattern matches
(``nn.Linear`` or transformers ``Conv1D``; embeddings are refused) and registers a forward
pre-hook that passes the module's input through it. The identity is ``d x d`` with ``d`` the
module's input width, has no weights (nothing in the checkpoint's ``target_model.*``), and is then
decomposed like any other module: ``_components.<dashed path>-pre_identity.{V,U}`` with
``V [d, C]``, ``U [C, d]`` and no bias. Here the same structure is rebuilt, so capturing the
identity's input and replacing its output with hooks works exactly as for any other site.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from spd_adapters.spd.config import IDENTITY_NAME, ModuleInfo
from spd_host.errors import FormatError


class Identity(nn.Module):
    """``x -> x`` on vectors of width ``d`` (the decomposed identity)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        return x


def _through_identity(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    ident = module.get_submodule(IDENTITY_NAME)
    return (ident(args[0]), *args[1:])


def identity_targets(
    infos: Sequence[ModuleInfo], paths: Sequence[str], *, where: Path | str
) -> list[str]:
    """Module paths the identity patterns match, in ``paths`` order per pattern."""
    out: list[str] = []
    seen: set[str] = set()
    for info in infos:
        if info.module_pattern in seen:
            raise FormatError(
                f"{where}: identity_module_info lists pattern {info.module_pattern!r} twice"
            )
        seen.add(info.module_pattern)
        hits = [p for p in paths if p and fnmatch.fnmatch(p, info.module_pattern)]
        if not hits:
            raise FormatError(
                f"{where}: identity_module_info pattern {info.module_pattern!r} matches no module "
                "of the base model"
            )
        out.extend(hits)
    return out


def with_identity_paths(paths: Sequence[str], targets: Sequence[str]) -> list[str]:
    """``paths`` with ``<target>.pre_identity`` right after each target (named_modules order)."""
    wanted = set(targets)
    out: list[str] = []
    for p in paths:
        out.append(p)
        if p in wanted:
            out.append(f"{p}.{IDENTITY_NAME}")
    return out


def insert_identities(
    model: nn.Module, infos: Sequence[ModuleInfo], *, where: Path | str
) -> list[str]:
    """Attach ``pre_identity`` to each matched module of ``model`` (in place); their paths."""
    from transformers.pytorch_utils import Conv1D

    targets = identity_targets(infos, [n for n, _ in model.named_modules()], where=where)
    for path in targets:
        module = model.get_submodule(path)
        if isinstance(module, nn.Linear):
            d = module.in_features
        elif isinstance(module, Conv1D):
            d = int(module.weight.shape[0])
        else:
            raise FormatError(
                f"{where}: identity_module_info matches {path!r} ({type(module).__name__}); "
                "identities can only be inserted before Linear or Conv1D modules"
            )
        if hasattr(module, IDENTITY_NAME):
            continue  # already inserted (the same model loaded twice)
        module.add_module(IDENTITY_NAME, Identity(d))
        module.register_forward_pre_hook(lambda m, a: _through_identity(m, a))
    return [f"{p}.{IDENTITY_NAME}" for p in targets]
