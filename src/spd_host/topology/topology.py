"""``TransformerTopology``: one model's canonical map (addresses, hook points) and its hooks.

Definitions of the hook points (per block ``i``; see docs/topology.md for every architecture):

- ``resid_pre``: the block's input. ``resid_post``: the block's output.
- ``attn_in``: the attention module's input (after the pre-attention norm, if any).
- ``attn_out``: the attention module's output (after its output projection).
- ``attn_out_normed``: only where a norm sits on the attention output (Gemma 2/3, OLMo 2):
  that norm's output, which is what the block adds to the residual stream.
- ``resid_mid``: ``resid_pre`` + what attention adds to the residual; absent for parallel
  attention+MLP blocks (GPT-NeoX/Pythia with ``use_parallel_residual``).
- ``mlp_in``: the MLP module's input (after the pre-MLP norm; for OLMo 2, which has none, it
  equals ``resid_mid``). ``mlp_hidden``: the input of the down-projection.
- ``mlp_out``: the MLP module's output. ``mlp_out_normed``: Gemma 2/3, OLMo 2 only, the
  post-MLP norm's output (what is added to the residual).
- global: ``embed`` (token embedding module output), ``unembed_in`` (the LM head's input).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Literal

from torch import Tensor, nn

from spd_host.errors import TopologyError
from spd_host.topology.detect import Layout, detect
from spd_host.topology.grammar import (
    BLOCK_ADDRESS_ROLES,
    Address,
    HookPoint,
    describe_address,
    describe_hook_point,
    parse_address,
    parse_hook_point,
)
from spd_host.topology.hooks import Site, capture_sites, replace_sites
from spd_host.topology.spec import ArchitectureSpec


class TransformerTopology:
    """The canonical structure of one loaded model (see the module docstring for definitions)."""

    def __init__(self, model: nn.Module, layout: Layout) -> None:
        self.model = model
        self.layout = layout
        self.spec: ArchitectureSpec = layout.spec
        config = getattr(model, "config", None)
        #: the model's own name for its architecture (``config.model_type``), else the spec name
        self.architecture: str = str(getattr(config, "model_type", None) or layout.spec.name)
        self.n_layers: int = layout.n_layers
        self.parallel: bool = layout.parallel
        self._paths: dict[str, str] = {}
        self._norm_paths: dict[str, str] = {}
        self._sites: dict[str, Site] = {}
        self._build()

    # -- construction ---------------------------------------------------------------------------
    def block_path(self, i: int) -> str:
        """Module path of block ``i`` (0-based)."""
        self._check_block(i)
        return f"{self.layout.blocks}.{i}"

    def _build(self) -> None:
        spec, lay = self.spec, self.layout
        self._paths["embed"] = lay.embed
        if lay.output is not None:
            self._paths["output"] = lay.output
        self._sites["embed"] = Site(lay.embed, "output")
        for i in range(self.n_layers):
            block = f"{lay.blocks}.{i}"
            mixer = lay.mixer(i)
            attn, mlp = f"{block}.{mixer.attn}", f"{block}.{spec.mlp}"
            for role in BLOCK_ADDRESS_ROLES[mixer.attn_kind]:
                self._paths[f"{i}.{mixer.attn_kind}.{role}"] = f"{attn}.{mixer.attn_proj[role]}"
            mlp_kind = spec.mlp_kind
            if mlp_kind is not None:
                for role in BLOCK_ADDRESS_ROLES[mlp_kind]:
                    self._paths[f"{i}.{mlp_kind}.{role}"] = f"{mlp}.{spec.mlp_proj[role]}"
            for role in BLOCK_ADDRESS_ROLES["norm"]:
                if role in spec.norms:
                    self._norm_paths[f"{i}.norm.{role}"] = f"{block}.{spec.norms[role]}"
            attn_post = spec.norms.get("attn_post")
            mlp_post = spec.norms.get("mlp_post")
            attn_branch = spec.attn_residual or attn_post or mixer.attn
            self._sites[f"{i}.resid_pre"] = Site(block, "input")
            self._sites[f"{i}.attn_in"] = Site(attn, "input")
            self._sites[f"{i}.attn_out"] = Site(attn, "output")
            if attn_post is not None:
                self._sites[f"{i}.attn_out_normed"] = Site(f"{block}.{attn_post}", "output")
            if not self.parallel:
                self._sites[f"{i}.resid_mid"] = Site(
                    f"{block}.{attn_branch}", "output", resid_block=block
                )
            self._sites[f"{i}.mlp_in"] = Site(mlp, "input")
            if "down" in spec.mlp_proj:
                self._sites[f"{i}.mlp_hidden"] = Site(f"{mlp}.{spec.mlp_proj['down']}", "input")
            self._sites[f"{i}.mlp_out"] = Site(mlp, "output")
            if mlp_post is not None:
                self._sites[f"{i}.mlp_out_normed"] = Site(f"{block}.{mlp_post}", "output")
            self._sites[f"{i}.resid_post"] = Site(block, "output")
        if lay.final_norm is not None:
            self._norm_paths["final_norm"] = lay.final_norm
        if lay.output is not None:
            self._sites["unembed_in"] = Site(lay.output, "input")
        self._addresses_of = {p: a for a, p in {**self._paths, **self._norm_paths}.items()}

    def _check_block(self, i: int | None) -> None:
        if i is not None and not 0 <= i < self.n_layers:
            raise TopologyError(
                f"block {i} does not exist in this {self.architecture} model",
                hint=f"blocks are numbered 0..{self.n_layers - 1}",
            )

    # -- addresses --------------------------------------------------------------------------------
    def addresses(self, *, include_norms: bool = False) -> list[str]:
        """Canonical module addresses present in this model (embed, projections, output)."""
        out = list(self._paths)
        if include_norms:
            out += list(self._norm_paths)
        return out

    def _resolve_address(self, address: str) -> tuple[Address, str]:
        parsed = parse_address(address)
        self._check_block(parsed.block)
        path = self._paths.get(address) or self._norm_paths.get(address)
        if path is None:
            present = [a for a in self.addresses(include_norms=True) if a.startswith("0.")]
            raise TopologyError(
                f"address {address!r} does not exist in this {self.architecture} model "
                f"(architecture spec {self.spec.name!r})",
                hint="block addresses here are {i}."
                + ", {i}.".join(a[2:] for a in present)
                + " plus "
                + ", ".join(a for a in self.addresses(include_norms=True) if "." not in a),
            )
        return parsed, path

    def module_path(self, address: str) -> str:
        """``"3.glu.down"`` -> ``"model.layers.3.mlp.down_proj"``."""
        return self._resolve_address(address)[1]

    def address_of(self, module_path: str) -> str:
        """Inverse of :meth:`module_path`; TopologyError if the module has no canonical address."""
        address = self._addresses_of.get(module_path)
        if address is None:
            examples = ", ".join(list(self._addresses_of)[:6])
            raise TopologyError(
                f"module {module_path!r} has no canonical address in this {self.architecture} model",
                hint=f"canonical modules are e.g. {examples}, ... (`spd-host topology <model>` lists all)",
            )
        return address

    def module(self, address: str) -> nn.Module:
        return self.model.get_submodule(self.module_path(address))

    # -- hook points ------------------------------------------------------------------------------
    def hook_points(self) -> list[str]:
        """All canonical hook points of this model, in forward order."""
        return list(self._sites)

    def site(self, hook_point: str) -> Site:
        """Where ``hook_point``'s tensor lives (module path, input/output)."""
        parsed = parse_hook_point(hook_point)
        self._check_block(parsed.block)
        site = self._sites.get(hook_point)
        if site is None:
            raise TopologyError(
                f"hook point {hook_point!r} does not exist in this {self.architecture} model: "
                + self._why_missing(parsed),
                hint="hook points per block here: "
                + ", ".join(h.split(".", 1)[1] for h in self._sites if h.startswith("0.")),
            )
        return site

    def _why_missing(self, hook: HookPoint) -> str:
        if hook.name == "resid_mid" and self.parallel:
            return "attention and MLP run in parallel on the block input, so there is no residual stream between them"
        if hook.name in ("attn_out_normed", "mlp_out_normed"):
            return "the architecture has no norm on that branch's output (attn_out/mlp_out is what is added to the residual)"
        if hook.name == "unembed_in":
            return "the model has no LM head"
        if hook.name == "mlp_hidden" and self.spec.mlp_kind is None:
            return "its MLP is a mixture of experts with no single down-projection"
        return "not provided by this architecture"

    def hook_point_of_module(self, module_path: str, role: Literal["input", "output"]) -> str:
        """Architecture-aware inverse of :meth:`site`: which hook point is this module's input/output."""
        for name, site in self._sites.items():
            if site.module_path == module_path and site.where == role and site.resid_block is None:
                return name
        raise TopologyError(
            f"the {role} of module {module_path!r} is not a canonical hook point of this {self.architecture} model",
            hint="modules with hook points: "
            + ", ".join(sorted({s.module_path for s in self._sites.values()})[:8])
            + ", ...",
        )

    # -- descriptions -----------------------------------------------------------------------------
    def describe(self, address_or_hook_point: str) -> str:
        """``"3.glu.down"`` -> ``"MLP down-projection in block 3 of 12"`` (blocks are 0-based)."""
        text = address_or_hook_point
        # "embed" is both an address and a hook point: the module reading wins
        if text in self._paths or text in self._norm_paths:
            return describe_address(parse_address(text), self.n_layers)
        if text in self._sites:
            return describe_hook_point(parse_hook_point(text), self.n_layers)
        try:
            parse_hook_point(text)
        except TopologyError:
            self._resolve_address(text)  # raises with the address grammar / what exists
        self.site(text)  # raises: a hook point that does not exist here
        raise AssertionError("unreachable")

    # -- hooks ------------------------------------------------------------------------------------
    def capture(
        self, hook_points: Sequence[str], *, detach: bool = False
    ) -> AbstractContextManager[dict[str, Tensor]]:
        """Record the tensors at ``hook_points`` during forwards inside the context.

        ``with topo.capture(["3.mlp_in", "3.mlp_out"]) as acts: model(tokens)`` leaves
        ``acts["3.mlp_in"]`` of shape ``[B, S, d]``. The last forward in the context wins. A
        capture records the tensor the model actually used (after any replacement).
        """
        if isinstance(hook_points, str):
            raise TopologyError(
                "capture takes a list of hook points, not a single string",
                hint=f"use [{hook_points!r}]",
            )
        sites = {h: self.site(h) for h in hook_points}
        return capture_sites(self.model, sites, detach=detach)

    def replace(
        self, replacements: Mapping[str, Callable[[Tensor], Tensor]]
    ) -> AbstractContextManager[None]:
        """Within the context the tensor at each hook point is replaced by ``fn(original)``.

        Downstream computation (residual adds included) uses the replacement. For
        ``resid_mid`` the attention branch is shifted so that ``resid_pre + branch`` equals the
        replacement (exact up to float rounding of that subtraction and re-addition).
        """
        sites = {h: self.site(h) for h in replacements}
        return replace_sites(self.model, sites, replacements)

    def as_dict(self) -> dict[str, object]:
        """The canonical map as plain data (what ``spd-host topology --json`` prints)."""
        return {
            "architecture": self.architecture,
            "spec": self.spec.name,
            "spec_description": self.spec.description,
            "n_layers": self.n_layers,
            "parallel_attn_mlp": self.parallel,
            "blocks": self.layout.blocks,
            "addresses": {
                a: {"module_path": p, "description": self.describe(a)}
                for a, p in {**self._paths, **self._norm_paths}.items()
            },
            "hook_points": {
                h: {
                    "module_path": s.module_path,
                    "where": s.where if s.resid_block is None else "block input + output",
                    "description": describe_hook_point(parse_hook_point(h), self.n_layers),
                }
                for h, s in self._sites.items()
            },
        }

    def __repr__(self) -> str:
        return f"TransformerTopology(architecture={self.architecture!r}, spec={self.spec.name!r}, n_layers={self.n_layers})"


def topology_of(
    model: nn.Module, *, specs: Sequence[ArchitectureSpec] | None = None
) -> TransformerTopology:
    """Detect ``model``'s architecture structurally and return its canonical map.

    ``specs`` overrides the candidates (default: plugin-registered specs, then the built-ins).
    """
    return TransformerTopology(model, detect(model, specs))
