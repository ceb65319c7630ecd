"""What transcoder and CLT adapters share: metadata, base-model loading, hook checks, harvesting.

Both methods have the same shape from the host's side: sites that read one canonical hook point
and write one, a single activation type ``activation``, and a HarvestFn that runs the base model
once while capturing only the hook points the encoders read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spd_host.adapter import (
    DecompositionDefaults,
    HarvestBatch,
    HarvestFn,
    HarvestOptions,
    MethodInfo,
    Site,
    next_token_topk_of,
    sparse_activity_of,
)
from spd_host.errors import ConfigError, FormatError
from spd_host.ids import DecompositionId

ACTIVATION_TYPE = "activation"
SPLICE_VARIANT = "reconstruction"


class DictionaryAdapter(ABC):
    """Base of ``TranscoderAdapter`` and ``CLTAdapter`` (implements ``DecompositionAdapter``)."""

    def __init__(
        self,
        did: DecompositionId,
        method: MethodInfo,
        *,
        root: Path,
        base_model: str | None,
        defaults: DecompositionDefaults,
    ) -> None:
        self._did = did
        self._method = method
        self.root = root
        self._base_model = base_model
        self._defaults = defaults
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None

    # -- DecompositionAdapter metadata -------------------------------------------------------
    @property
    def decomposition_id(self) -> str:
        return self._did.normalized

    @property
    def method(self) -> MethodInfo:
        return self._method

    @property
    @abstractmethod
    def sites(self) -> Sequence[Site]: ...

    @property
    def activation_types(self) -> Sequence[str]:
        return (ACTIVATION_TYPE,)

    @property
    def base_model_name(self) -> str:
        return self._base_model or "unknown"

    @property
    def defaults(self) -> DecompositionDefaults:
        return self._defaults

    @property
    def splice_variants(self) -> Sequence[str]:
        return (SPLICE_VARIANT,)

    # -- what subclasses provide ------------------------------------------------------------
    @abstractmethod
    def hook_requirements(self) -> list[tuple[str, str, str]]:
        """``(canonical hook point, name in the files, file that names it)`` for every hook used."""

    @abstractmethod
    def input_hook_points(self, sites: Sequence[str] | None = None) -> list[str]:
        """The canonical hook points the encoders of ``sites`` (all when None) read."""

    @abstractmethod
    def encode_captured(self, captured: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Feature activations per site from the captured input hook points."""

    # -- base model --------------------------------------------------------------------------
    def _model_source(self) -> str:
        if not self._base_model:
            raise FormatError(
                f"{self.root}: the decomposition does not name its base model",
                hint="add model_name to config.yaml (circuit-tracer), metadata.model_name to cfg.json "
                "(SAELens), or a config.json with a 'model' key next to sparsify's hookpoint folders",
            )
        return self._base_model

    def load_base_model(self) -> torch.nn.Module:
        if self._model is None:
            from spd_adapters.spd.targets.loading import is_pretrain_run, load_pretrain_run
            from spd_host.models import load_base_model

            source = self._model_source()
            # Goodfire's transcoder/CLT configs may name one of their own pretrain runs
            model = (
                load_pretrain_run(source) if is_pretrain_run(source) else load_base_model(source)
            )
            self.check_hooks(model)
            self._model = model
        return self._model

    def load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from spd_adapters.spd.targets.loading import (
                is_pretrain_run,
                load_pretrain_run_tokenizer,
            )
            from spd_host.models import load_tokenizer

            source = self._model_source()
            self._tokenizer = (
                load_pretrain_run_tokenizer(source)
                if is_pretrain_run(source)
                else load_tokenizer(source)
            )
        return self._tokenizer

    def check_hooks(self, model: torch.nn.Module) -> None:
        """FormatError naming the config file if a hook the files use is not in ``model``."""
        from spd_host.topology import topology_of

        topo = topology_of(model)
        available = set(topo.hook_points())
        for point, native, where in self.hook_requirements():
            if point not in available:
                raise FormatError(
                    f"{where}: hook {native!r} (canonical {point!r}) does not exist in the base model "
                    f"({topo.architecture}, {topo.n_layers} layers)",
                    hint="the decomposition was trained for a different model; check its model name",
                )

    # -- harvesting --------------------------------------------------------------------------
    def harvest_fn(self, options: HarvestOptions) -> HarvestFn:
        from spd_host.topology import topology_of

        model = self.load_base_model().to(options.device)
        topo = topology_of(model)
        hooks = self.input_hook_points()
        self.to(options.device)
        threshold = options.threshold

        def harvest(tokens: Tensor) -> HarvestBatch:
            tokens = tokens.to(options.device)
            with torch.no_grad(), topo.capture(hooks) as captured:
                out = model(tokens)
                acts = self.encode_captured(captured)
            logits = out.logits if hasattr(out, "logits") else out[0]
            # on the device: each site sparse (one entry per firing) when its activations
            # vanish off the firings (ReLU / JumpReLU / TopK at threshold 0), else dense
            sparse, firings, activations = {}, {}, {}
            for k, v in acts.items():
                v = v.float()
                fired = v > threshold
                sp = sparse_activity_of(fired, {ACTIVATION_TYPE: v}) if options.sparse else None
                if sp is not None:
                    sparse[k] = sp
                else:
                    firings[k], activations[k] = fired, {ACTIVATION_TYPE: v}
            top_k = options.next_token_top_k
            return HarvestBatch(
                tokens=tokens,
                firings=firings,
                activations=activations,
                sparse=sparse,
                next_token_logits=logits.float() if options.next_token and not top_k else None,
                next_token_topk=next_token_topk_of(logits, top_k)
                if options.next_token and top_k
                else None,
            )

        return harvest

    def to(self, device: str | torch.device) -> DictionaryAdapter:
        return self

    def _select(self, sites: Sequence[str] | None) -> list[str]:
        names = [s.name for s in self.sites]
        if sites is None:
            return names
        unknown = [s for s in sites if s not in names]
        if unknown:
            raise ConfigError(
                f"{self.decomposition_id}: unknown site(s) {unknown}",
                hint=f"sites are: {', '.join(names)}",
            )
        return list(sites)

    @staticmethod
    def _check_variant(variant: str | None) -> None:
        if variant not in (None, SPLICE_VARIANT):
            raise ConfigError(
                f"unknown splice variant {variant!r}", hint=f"variants: {SPLICE_VARIANT}"
            )
