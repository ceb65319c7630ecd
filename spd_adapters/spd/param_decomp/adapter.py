"""``PdAdapter``: a param-decomp run directory as a ``DecompositionAdapter`` (+ ``SupportsSplice``).

Metadata (sites, C, CI routing) comes from the run's pinned config and the target's structure
(a meta-device skeleton for HF targets: no weights). Every checkpoint key and shape is checked
at load from orbax's metadata alone; the arrays are read on the first call that needs weights
(``pd_model``), so ``spd-host info`` stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from spd_adapters.spd.adapter import NON_CAUSAL_NOTE, _site_io
from spd_adapters.spd.model import Components
from spd_adapters.spd.param_decomp import qwen36_moe
from spd_adapters.spd.param_decomp import target as tgt
from spd_adapters.spd.param_decomp.decomposition import PdDecomposition, build_decomposition
from spd_adapters.spd.param_decomp.harvest_fn import ACTIVATION_TYPES
from spd_adapters.spd.param_decomp.launch_config import (
    MoeTransformerCi,
    TransformerCi,
    load_launch_config,
)
from spd_adapters.spd.param_decomp.model import PdModel
from spd_adapters.spd.param_decomp.moe_model import PdMoeModel
from spd_adapters.spd.param_decomp.moe_splice import moe_splice
from spd_adapters.spd.param_decomp.moe_tree import MoeDecomposition, build_moe_decomposition
from spd_adapters.spd.param_decomp.orbax_reader import read_item, read_item_shapes
from spd_adapters.spd.param_decomp.run_files import discover_pd_run
from spd_adapters.spd.param_decomp.structure import Structure, resolve_structure
from spd_adapters.spd.splice import (
    DETERMINISTIC_VARIANTS,
    GOODFIRE_NAMES,
    SPLICE_VARIANTS,
    CiCache,
    splice,
)
from spd_host.adapter import DecompositionDefaults, MethodInfo, Site
from spd_host.errors import ConfigError, FormatError
from spd_host.ids import DecompositionId

PD_DESCRIPTION = (
    "Parameter decomposition (Goodfire's param-decomp, the successor of Stochastic Parameter "
    "Decomposition) splits each decomposed weight matrix into C rank-one subcomponents whose sum "
    "approximates the original weights. A learned causal-importance function predicts, for each "
    "token, how much each subcomponent matters to the layer's output there (0 = can be ablated, "
    "1 = needed). Each component is one rank-one piece of one weight matrix; it 'fires' where its "
    "causal importance is above a threshold, and its component activation is the input's "
    "projection onto the piece's input direction. Causal importances are computed without the "
    "training-time noise, so harvests are deterministic."
)


class PdAdapter:
    """A param-decomp (JAX, orbax) run as a DecompositionAdapter."""

    def __init__(self, did: DecompositionId, method: MethodInfo, run_dir: Path):
        self._id = did
        self.files = discover_pd_run(run_dir)
        self.config = load_launch_config(self.files.config_path)
        note = f" {NON_CAUSAL_NOTE}" if self.non_causal else ""
        self._method = method.model_copy(update={"description": PD_DESCRIPTION + note})
        self._model: nn.Module | None = None
        self._pd: PdModel | PdMoeModel | None = None
        self._tokenizer: Any = None
        self._ci_cache = CiCache()  # the clean pass (CI + pinned routing) shared per batch
        # Every key and shape checked now, from orbax's metadata (no array data is read).
        self._decomposition(self._skeleton, read_item_shapes(self.files.item_dir), meta=True)

    @property
    def ci_causal(self) -> bool:
        """False when the CI function sees later tokens (bidirectional attention)."""
        return not self.non_causal

    @property
    def non_causal(self) -> bool:
        ci = self.config.decomposition.ci
        return (
            isinstance(ci, TransformerCi | MoeTransformerCi)
            and ci.attends
            and ci.attention.mask == "bidirectional"
        )

    # -- structure -----------------------------------------------------------------------------
    @cached_property
    def _skeleton(self) -> nn.Module:
        return (
            self._model
            if self._model is not None
            else tgt.build_skeleton(self.config, self.files.run_dir)
        )

    @cached_property
    def layout(self) -> tgt.TargetLayout:
        return tgt.layout_of(self._skeleton, self.config.decomposition.sites.kind)

    @property
    def is_moe(self) -> bool:
        return self.config.decomposition.sites.kind == "qwen36_moe"

    @cached_property
    def structure(self) -> Structure:
        layout = self.layout
        full_attention = (
            qwen36_moe.full_attention_layers(self._skeleton, layout.prefix, layout.n_layer)
            if self.is_moe
            else frozenset()
        )
        try:
            return resolve_structure(self.config, layout.n_layer, full_attention)
        except ValueError as err:
            raise FormatError(f"{self.files.config_path}: {err}") from err

    @cached_property
    def _addresses(self) -> dict[str, str]:
        from spd_host.errors import TopologyError
        from spd_host.topology import topology_of

        try:
            topo = topology_of(self._skeleton)
        except TopologyError:
            return {}
        out: dict[str, str] = {}
        for s in self.structure.sites:
            path = self.layout.site_path(s.name)
            try:
                out[path] = topo.address_of(path)
            except TopologyError:
                continue
        return out

    def site_names_by_path(self) -> dict[str, str]:
        """torch module path -> site name (canonical address when the topology knows it)."""
        paths = (self.layout.site_path(s.name) for s in self.structure.sites)
        return {p: self._addresses.get(p, p) for p in paths}

    # -- metadata ------------------------------------------------------------------------------
    @property
    def decomposition_id(self) -> str:
        return self._id.normalized

    @property
    def method(self) -> MethodInfo:
        return self._method

    @cached_property
    def _sites(self) -> list[Site]:
        by_name = self.structure.by_name
        prefix = self.layout.prefix
        out = []
        for path, name in self.site_names_by_path().items():
            info = by_name[path.removeprefix(prefix)]
            address = self._addresses.get(path)
            if self.is_moe and self._addresses:
                reads, writes = qwen36_moe.site_io(info.layer, info.kind, address, path)
            else:
                reads, writes = _site_io(address) if address else (path, (path,))
            note = f" {NON_CAUSAL_NOTE}" if self.non_causal else ""
            out.append(
                Site(
                    name=name,
                    n_components=info.C,
                    reads_from=reads,
                    writes_to=writes,
                    address=address,
                    description=f"param-decomp decomposition of {path} into {info.C} rank-one "
                    f"subcomponents.{note}",
                )
            )
        return out

    @property
    def sites(self) -> Sequence[Site]:
        return self._sites

    @property
    def activation_types(self) -> Sequence[str]:
        return ACTIVATION_TYPES

    @property
    def base_model_name(self) -> str:
        return tgt.target_name(self.config)

    @property
    def defaults(self) -> DecompositionDefaults:
        data = self.config.data
        ci = self.config.decomposition.ci
        return DecompositionDefaults(
            dataset=data.dataset_name if data else None,
            dataset_column=data.column_name if data else None,
            seq_len=data.max_seq_len if data else None,
            extra={
                "format": "param-decomp",
                # its LM data loader never prepends BOS (experiments/lm/data.py:
                # _tokenize_and_concatenate(..., add_bos_token=False))
                "prepend_bos": False,
                "run_dir": str(self.files.run_dir),
                "config": self.files.config_path.name,
                "checkpoint": str(self.files.item_dir.relative_to(self.files.run_dir)),
                "step": self.files.step,
                "ci_fn_type": ci.type,
                "ci_attention_mask": ci.attention.mask
                if isinstance(ci, TransformerCi | MoeTransformerCi)
                else None,
                "ci_causal": self.ci_causal,
                "ci_input_taps": list(
                    dict.fromkeys(t for n in self.structure.nets for t in n.input_taps)
                ),
                "component_conditioning": ci.component_conditioning is not None,
                "module_paths": {n: p for p, n in self.site_names_by_path().items()},
            },
        )

    # -- weights -------------------------------------------------------------------------------
    def load_base_model(self) -> nn.Module:
        if self._model is None:
            pretrained = self.config.target.spec.get("kind") == "pretrained"
            # a pretrained target's skeleton already is the loaded model
            self._model = (
                self._skeleton if pretrained else tgt.load_target(self.config, self.files.run_dir)
            )
        return self._model

    def _decomposition(
        self, model: nn.Module, restored: dict[str, Any], *, meta: bool
    ) -> PdDecomposition | MoeDecomposition:
        layout = self.layout
        ci = self.config.decomposition.ci
        if isinstance(ci, MoeTransformerCi):
            moe_dims = {
                s.name: qwen36_moe.site_dims(model, layout.prefix, s.layer, s.kind)
                for s in self.structure.sites
            }
            return build_moe_decomposition(
                restored,
                self.files.item_dir,
                ci,
                self.structure,
                moe_dims,
                lambda tap: tgt.tap_width(model, layout, tap),
                qwen36_moe.n_experts(model, layout.prefix),
                meta=meta,
            )
        dims = {
            s.name: tgt.linear_dims(model, layout.site_path(s.name)) for s in self.structure.sites
        }
        return build_decomposition(
            restored,
            self.files.item_dir,
            self.config.decomposition.ci,
            self.structure,
            dims,
            lambda tap: tgt.tap_width(model, layout, tap),
            meta=meta,
        )

    def pd_model(self) -> PdModel | PdMoeModel:
        if self._pd is None:
            model = self.load_base_model()
            layout = self.layout
            dec = self._decomposition(model, read_item(self.files.item_dir), meta=False)
            if isinstance(dec, MoeDecomposition):
                self._pd = PdMoeModel(model, layout, self.structure, dec)
                return self._pd
            components = {}
            site_of_path = {}
            for s in self.structure.sites:
                path = layout.site_path(s.name)
                bias = getattr(model.get_submodule(path), "bias", None)
                components[path] = Components(
                    dec.V[s.name],
                    dec.U[s.name],
                    None if bias is None else bias.detach().float(),
                    "linear",
                )
                site_of_path[path] = s.name
            taps = {t: layout.tap_path(t) for t in dec.ci_fn.input_taps}
            self._pd = PdModel(components, dec.ci_fn, site_of_path, taps)
        return self._pd

    def load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = tgt.load_target_tokenizer(self.config, self.files.run_dir)
        return self._tokenizer

    # -- splice --------------------------------------------------------------------------------
    @property
    def splice_variants(self) -> Sequence[str]:
        return SPLICE_VARIANTS

    def fidelity_settings(self, convention: str, config: Any) -> Any:
        """As for torch-era SPD runs: the deterministic mask variants by default; under the
        goodfire convention all six, with the ``zero_mask`` forward as the baseline."""
        from spd_host.evals.configs import FidelitySettings

        if convention != "goodfire":
            return FidelitySettings(
                peer_names=dict(GOODFIRE_NAMES), default_variants=list(DETERMINISTIC_VARIANTS)
            )
        return FidelitySettings(
            baseline_variant="zero_mask",
            peer_names=dict(GOODFIRE_NAMES),
            default_variants=list(SPLICE_VARIANTS),
            notes=["goodfire convention on a param-decomp run: baseline zero_mask"],
        )

    def splice(
        self,
        model: nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> AbstractContextManager[None]:
        pd = self.pd_model()
        by_name = {n: p for p, n in self.site_names_by_path().items()}
        if sites is None:
            paths = pd.site_paths
        else:
            unknown = [s for s in sites if s not in by_name]
            if unknown:
                raise ConfigError(
                    f"unknown sites {unknown} for {self.decomposition_id}",
                    hint=f"sites: {', '.join(by_name)}",
                )
            paths = [by_name[s] for s in sites]
        if isinstance(pd, PdMoeModel):
            return moe_splice(model, pd, paths, variant or "ci_masked", ci_cache=self._ci_cache)
        return splice(model, pd, paths, variant or "ci_masked")
