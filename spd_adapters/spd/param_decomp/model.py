"""A param-decomp decomposition bound to a torch target, in the shape the SPD splice code takes.

``PdModel`` is an ``SpdModel`` whose ``paths`` are every module whose *input* the CI function
needs (the decomposed sites plus the CI's residual-stream / block input taps) and whose
``causal_importance`` maps those captured inputs to CI per decomposed module. The SPD splice
(`spd_adapters.spd.splice`) captures ``paths`` on a clean forward and replaces the chosen
components' outputs, exactly as for torch-era runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from spd_adapters.spd.model import Components, SpdModel
from spd_adapters.spd.param_decomp.ci_fns import PdCiFunction
from spd_host.errors import ConfigError


def _move(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _move(getattr(obj, f.name), device))
        return obj
    return obj


class PdModel(SpdModel):
    def __init__(
        self,
        components: dict[str, Components],
        ci_fn: PdCiFunction,
        site_of_path: dict[str, str],
        tap_paths: dict[str, str],
    ):
        super().__init__(components=components, layerwise=None, global_fn=None, sigmoid_type="hard")
        self.ci_fn = ci_fn
        self.site_of_path = site_of_path
        self.path_of_site = {s: p for p, s in site_of_path.items()}
        self.tap_paths = tap_paths

    @property
    def paths(self) -> list[str]:
        return sorted(set(self.components) | set(self.tap_paths.values()))

    @property
    def site_paths(self) -> list[str]:
        return sorted(self.components)

    def to(self, device: torch.device | str) -> PdModel:
        for c in self.components.values():
            c.V, c.U = c.V.to(device), c.U.to(device)
            c.bias = None if c.bias is None else c.bias.to(device)
        _move(self.ci_fn, device)
        return self

    def component_acts(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``x V`` per decomposed module path."""
        return {p: self.components[p].component_acts(inputs[p]) for p in self.site_paths}

    def pre_sigmoid(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        taps = {tap: inputs[path] for tap, path in self.tap_paths.items()}
        acts = None
        if self.ci_fn.readouts is not None:
            acts = {self.site_of_path[p]: a for p, a in self.component_acts(inputs).items()}
        pre = self.ci_fn.pre_activations(taps, acts)
        return {self.path_of_site[s]: z for s, z in pre.items()}

    def causal_importance(
        self, inputs: Mapping[str, Tensor], sampling: str | None = None
    ) -> dict[str, Tensor]:
        """Noiseless CI: the lower leaky hard sigmoid's forward value ``clip(pre, 0, 1)``.

        param-decomp runs are always evaluated noiselessly here; a sampling mode (a torch-era
        Goodfire eval option) is refused rather than silently ignored.
        """
        if sampling is not None:
            raise ConfigError(
                f"CI sampling {sampling!r} is not defined for param-decomp runs",
                hint="evaluate param-decomp runs without --ci-sampling",
            )
        return {p: z.clamp(0, 1) for p, z in self.pre_sigmoid(inputs).items()}
