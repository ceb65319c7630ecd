"""``SpdAdapter``: an SPD run as a ``DecompositionAdapter`` (+ ``SupportsSplice``).

Metadata (sites, C, defaults) comes from the config and the checkpoint's key names and shapes
(the ``.pth`` is memory-mapped, so nothing is copied); the base model is built only on
``load_base_model``. Sites are named by the topology's canonical module address (``1.mlp.down``)
when the architecture is known, else by the module path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from spd_adapters.spd import base, formats
from spd_adapters.spd.config import IDENTITY_NAME
from spd_adapters.spd.harvest_fn import ACTIVATION_TYPES
from spd_adapters.spd.identity import Identity, insert_identities
from spd_adapters.spd.model import SpdModel
from spd_adapters.spd.splice import (
    DETERMINISTIC_VARIANTS,
    GOODFIRE_NAMES,
    SPLICE_VARIANTS,
    CiCache,
    observe_clean_forward,
    splice,
)
from spd_host.adapter import DecompositionDefaults, MethodInfo, Site
from spd_host.errors import ConfigError, SourceNotFoundError
from spd_host.ids import DecompositionId, SourceKind, fetch_source, fetch_wandb_run

WANDB_ENTITY_ENV = "SPD_HOST_WANDB_ENTITY"
WANDB_PROJECT_ENV = "SPD_HOST_WANDB_PROJECT"
RUN_FILE_PATTERNS = ("final_config.yaml", "model_*.pth", "model.pth")


def demo_run_dir() -> Path:
    return Path(__file__).parent / "demo_assets"


def resolve_run_dir(did: DecompositionId) -> Path:
    """Any accepted source -> a local run directory (or checkpoint file)."""
    if did.kind is SourceKind.DEMO:
        path = demo_run_dir()
        if not (path / formats.CONFIG_FILENAME).exists():
            raise SourceNotFoundError(
                f"the SPD demo decomposition is not installed ({path})",
                hint="build it with `python -m spd_adapters.spd.train_demo`",
            )
        return path
    if did.kind is SourceKind.SHORT:
        entity, project = os.environ.get(WANDB_ENTITY_ENV), os.environ.get(WANDB_PROJECT_ENV)
        if not entity or not project:
            raise SourceNotFoundError(
                f"short SPD run ID {did.raw!r} needs a default wandb entity and project",
                hint=f"set {WANDB_ENTITY_ENV} and {WANDB_PROJECT_ENV} (e.g. goodfire / spd), or use "
                f"spd:wandb:<entity>/<project>/{did.short_id}",
            )
        return fetch_wandb_run(
            f"{entity}/{project}/{did.short_id}", allow_patterns=RUN_FILE_PATTERNS
        )
    if did.kind is SourceKind.WANDB:
        return fetch_source(did, allow_patterns=RUN_FILE_PATTERNS)
    return fetch_source(did)


def _site_io(address: str) -> tuple[str, tuple[str, ...]]:
    """Where a module site reads from / writes to: the canonical hook point that holds the
    module's input (output) where there is one, else the module's address.

    An MLP's up/gate projection reads ``{i}.mlp_in``, its down projection ``{i}.mlp_hidden``;
    attention q/k/v (or fused qkv) read ``{i}.attn_in``; the down projection writes
    ``{i}.mlp_out``, the attention output projection ``{i}.attn_out``, the embedding ``embed``.
    So an SPD site and a transcoder on the same point line up in comparisons.
    """
    if address == "embed":
        return address, ("embed",)
    layer, _, rest = address.partition(".")
    if rest in ("mlp.up", "glu.gate", "glu.up", "glu_fused.gate_up"):
        return f"{layer}.mlp_in", (address,)
    if rest in ("mlp.down", "glu.down", "glu_fused.down"):
        return f"{layer}.mlp_hidden", (f"{layer}.mlp_out",)
    if rest in ("attn.q", "attn.k", "attn.v", "attn_fused.qkv"):
        return f"{layer}.attn_in", (address,)
    if rest in ("attn.o", "attn_fused.o"):
        return address, (f"{layer}.attn_out",)
    return address, (address,)


def _identity_site_io(parent: str) -> tuple[str, tuple[str, ...]]:
    """An identity inserted before module ``parent`` reads that module's input and writes it
    back (its output *is* the module's input); without a hook point there, what the module
    then writes."""
    reads, writes = _site_io(parent)
    if reads != parent:
        return reads, (reads,)
    return parent, writes


NON_CAUSAL_NOTE = (
    "The causal-importance function of this run attends over the whole sequence in both "
    "directions, so a component's importance at a token also depends on the tokens after it: it "
    "is not a causal, per-token feature of the text up to that token."
)


_IDENTITY_SUFFIX = f".{IDENTITY_NAME}"


def _module_spec(module: nn.Module, path: str) -> formats.ModuleSpec:
    if isinstance(module, Identity):
        return formats.ModuleSpec("linear", module.d, module.d, None)
    return base.module_spec(module, path)


class SpdAdapter:
    """An SPD run directory (or the shipped demo) as a DecompositionAdapter."""

    def __init__(self, did: DecompositionId, method: MethodInfo, run_path: Path):
        self._id = did
        self._method = method
        self.files, self.config, self.parts = formats.read_run(run_path)
        cfg_path = self.files.config_path
        paths = formats.checkpoint_module_paths(self.config, self.parts, where=cfg_path)
        self.module_to_c = formats.expand_module_info(self.config, paths, where=cfg_path)
        formats.check_component_keys(self.parts, self.module_to_c, where=self.files.checkpoint_path)
        self._model: nn.Module | None = None
        self._spd: SpdModel | None = None
        self._tokenizer: Any = None
        self._ci_cache = CiCache()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def decomposition_id(self) -> str:
        return self._id.normalized

    @property
    def ci_causal(self) -> bool:
        """False when the CI function sees later tokens (bidirectional attention over the sequence)."""
        return self.config.ci_config.causal

    @property
    def method(self) -> MethodInfo:
        if self.ci_causal:
            return self._method
        return self._method.model_copy(
            update={"description": f"{self._method.description} {NON_CAUSAL_NOTE}"}
        )

    @cached_property
    def _addresses(self) -> dict[str, str]:
        """module path -> canonical address, for the paths the topology knows.

        Needs the base model's structure (a meta-device skeleton from its HF config): if that
        config cannot be read the error propagates, so that site names never silently depend on
        what happens to be cached. An architecture the topology does not know falls back to
        module paths (deterministically).
        """
        from spd_host.errors import TopologyError
        from spd_host.topology import topology_of

        model = self._model if self._model is not None else base.build_skeleton(self.config)
        try:
            topo = topology_of(model)
        except TopologyError:
            return {}
        out: dict[str, str] = {}
        for path in self.module_to_c:
            try:
                out[path] = topo.address_of(path.removesuffix(_IDENTITY_SUFFIX))
            except TopologyError:
                continue
        return out

    def site_names_by_path(self) -> dict[str, str]:
        """module path -> site name: the canonical address, ``<address>.pre_identity`` for an
        inserted identity, else the module path."""
        out = {}
        for p in sorted(self.module_to_c):
            address = self._addresses.get(p)
            if address is None:
                out[p] = p
            else:
                out[p] = address + (_IDENTITY_SUFFIX if p.endswith(_IDENTITY_SUFFIX) else "")
        return out

    @cached_property
    def _sites(self) -> list[Site]:
        sites = []
        for path, name in self.site_names_by_path().items():
            address = self._addresses.get(path)
            C = self.module_to_c[path]
            if path.endswith(_IDENTITY_SUFFIX):
                parent = path.removesuffix(_IDENTITY_SUFFIX)
                reads, writes = _identity_site_io(address) if address else (path, (path,))
                address = None  # an inserted identity is not a module of the base model
                text = (
                    f"SPD decomposition of an identity map inserted before {parent} (on its "
                    f"input) into {C} rank-one subcomponents"
                )
            else:
                reads, writes = _site_io(address) if address else (path, (path,))
                text = f"SPD decomposition of {path} into {C} rank-one subcomponents"
            if not self.ci_causal:
                text += f". {NON_CAUSAL_NOTE}"
            sites.append(
                Site(
                    name=name,
                    n_components=C,
                    reads_from=reads,
                    writes_to=writes,
                    address=address,
                    description=text,
                )
            )
        return sites

    @property
    def sites(self) -> Sequence[Site]:
        return self._sites

    @property
    def activation_types(self) -> Sequence[str]:
        return ACTIVATION_TYPES

    @property
    def base_model_name(self) -> str:
        return base.base_model_name(self.config)

    @property
    def defaults(self) -> DecompositionDefaults:
        task = self.config.task_config
        ci = self.config.ci_config
        return DecompositionDefaults(
            dataset=task.dataset_name if task else None,
            dataset_column=task.column_name if task else None,
            seq_len=task.max_seq_len if task else None,
            extra={
                # Goodfire's LM data loader never prepends BOS (spd/data.py:
                # tokenize_and_concatenate(..., add_bos_token=False))
                "prepend_bos": False,
                "run_dir": str(self.files.run_dir),
                "checkpoint": self.files.checkpoint_path.name,
                "step": self.files.step,
                "ci_mode": ci.mode,
                "ci_fn_type": ci.fn_type,
                "ci_hidden_dims": None if ci.hidden_dims is None else list(ci.hidden_dims),
                # False: the CI at a token depends on later tokens (bidirectional attention)
                "ci_causal": ci.causal,
                "identity_modules": [p for p in self.module_to_c if p.endswith(_IDENTITY_SUFFIX)],
                "sigmoid_type": self.config.sigmoid_type,
                "sampling": self.config.sampling,
                "module_paths": {n: p for p, n in self.site_names_by_path().items()},
            },
        )

    # -- weights -------------------------------------------------------------------------------
    def load_base_model(self) -> nn.Module:
        if self._model is None:
            ckpt, cfg_path = self.files.checkpoint_path, self.files.config_path
            model = base.load_base(self.config, self.parts.target, where=ckpt)
            if self.config.identity_module_info:
                insert_identities(model, self.config.identity_module_info, where=cfg_path)
            # Re-match the patterns against the real model: it is the authority on module paths,
            # and its named_modules order is the reference's module order.
            real = formats.expand_module_info(
                self.config, (n for n, _ in model.named_modules()), where=cfg_path
            )
            if real != self.module_to_c:
                formats.check_component_keys(self.parts, real, where=ckpt)
            self.module_to_c = real
            self._model = model
        return self._model

    def spd_model(self) -> SpdModel:
        if self._spd is None:
            model = self.load_base_model()
            specs = {p: _module_spec(model.get_submodule(p), p) for p in self.module_to_c}
            self._spd = formats.build_spd_model(
                self.config,
                self.parts,
                specs,
                where=self.files.checkpoint_path,
                config_where=self.files.config_path,
            )
        return self._spd

    def load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = base.load_tokenizer(self.config)
        return self._tokenizer

    def decoder_directions(self, site: str) -> Tensor | None:
        """``U`` (``[C, d_model]``): what each component adds to the residual stream per unit of
        component activation, for sites that write into it (MLP down and attention output
        projections, the embedding); ``None`` for sites whose output is not the residual
        stream (up/gate/q/k/v projections). The viewer reads logits through it."""
        by_name = {s.name: s for s in self.sites}
        if site not in by_name:
            raise ConfigError(f"unknown site {site!r}", hint=f"sites are: {', '.join(by_name)}")
        writes = by_name[site].writes_to
        if not any(w == "embed" or w.endswith((".mlp_out", ".attn_out")) for w in writes):
            return None
        path = {n: p for p, n in self.site_names_by_path().items()}[site]
        return self.spd_model().components[path].U.detach()

    # -- splice --------------------------------------------------------------------------------
    @property
    def splice_variants(self) -> Sequence[str]:
        return SPLICE_VARIANTS

    @property
    def splice_is_local(self) -> bool:
        """True: a splice replaces only the chosen modules' outputs, and its CI comes from the
        clean forward of the batch (recorded by :meth:`observe_clean_forward`, else a clean
        pre-pass of the whole model), never from the spliced forward below the sites."""
        return True

    def observe_clean_forward(
        self, model: nn.Module, tokens: Tensor
    ) -> AbstractContextManager[None]:
        """Record the decomposed modules' inputs of the caller's clean forward of ``tokens``:
        splices of the same tensor compute their CI from them (no pre-pass of their own)."""
        return observe_clean_forward(model, self.spd_model(), tokens, self._ci_cache)

    def splice(
        self,
        model: nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
        options: Mapping[str, Any] | None = None,
        positions: Tensor | None = None,
    ) -> AbstractContextManager[None]:
        """``options``: ``rounding_threshold`` (rounded_ci keeps CI > it; default ``round``) and
        ``ci_sampling`` (compute CI under that sampling); ``positions`` [B, S] bool: splice only
        there. Both come from the fidelity engine (see ``fidelity_settings``)."""
        spd = self.spd_model()
        by_name = {n: p for p, n in self.site_names_by_path().items()}
        if sites is None:
            paths = spd.paths
        else:
            unknown = [s for s in sites if s not in by_name]
            if unknown:
                raise ConfigError(
                    f"unknown SPD sites {unknown} for {self.decomposition_id}",
                    hint=f"sites: {', '.join(by_name)}",
                )
            paths = [by_name[s] for s in sites]
        return splice(
            model,
            spd,
            paths,
            variant or "ci_masked",
            options=options,
            positions=positions,
            ci_cache=self._ci_cache,
            sampling=self.config.sampling,
        )

    # -- eval conventions ----------------------------------------------------------------------
    def recorded_rounding_threshold(self) -> float | None:
        """``rounding_threshold`` of the run's ``CEandKLLosses`` entry in ``eval_metric_configs``."""
        for cfg in self.config.eval_metric_configs or []:
            if cfg.get("classname") == "CEandKLLosses" and "rounding_threshold" in cfg:
                return float(cfg["rounding_threshold"])
        return None

    def fidelity_settings(self, convention: str, config: Any) -> Any:
        """What the fidelity conventions mean for an SPD run (see docs/evals.md)."""
        from spd_host.evals.configs import FidelitySettings

        if convention != "goodfire":
            return FidelitySettings(
                peer_names=dict(GOODFIRE_NAMES), default_variants=list(DETERMINISTIC_VARIANTS)
            )
        notes = []
        threshold = config.rounding_threshold
        if threshold is None:
            threshold = self.recorded_rounding_threshold()
            if threshold is None:
                threshold = 0.0
                notes.append(
                    "the run records no CEandKLLosses rounding_threshold; rounded_ci used 0.0 "
                    "(Goodfire's LM configs)"
                )
        options: dict[str, Any] = {"rounding_threshold": threshold}
        if config.ci_sampling:
            options["ci_sampling"] = self.config.sampling
            notes.append(f"eval CI computed under the run's sampling ({self.config.sampling})")
        notes.append(
            f"goodfire convention: rounded_ci at CI > {threshold}; baseline zero_mask; L0 at "
            f"ci_alive_threshold {self.config.ci_alive_threshold}"
        )
        return FidelitySettings(
            splice_options=options,
            baseline_variant="zero_mask",
            alive_threshold=self.config.ci_alive_threshold,
            peer_names=dict(GOODFIRE_NAMES),
            default_variants=list(SPLICE_VARIANTS),
            notes=notes,
        )
