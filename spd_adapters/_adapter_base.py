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

from spd_adapters._next_token import HarvestForward
from spd_adapters._sparse_encode import BlockedEncode, SiteEncoder
from spd_host.adapter import (
    DecompositionDefaults,
    HarvestBatch,
    HarvestFn,
    HarvestOptions,
    MethodInfo,
    Site,
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
    def site_encoders(self, captured: Mapping[str, Tensor]) -> dict[str, SiteEncoder] | None:
        """Each site's encoder split into pre-activations and activation (``SiteEncoder``), so
        the harvest can encode straight to the sparse form in bounded blocks; None when a
        subclass cannot split its encoders (the harvest then uses ``encode_captured``)."""
        return None

    def harvest_fn(self, options: HarvestOptions) -> HarvestFn:
        """One forward per batch; sites straight to the sparse form when the host accepts it.

        Per site, when ``options.sparse``: the encoder runs a block of positions at a time and
        each block becomes firing entries at once (``_sparse_encode``; TopK / JumpReLU / ReLU),
        so no ``[B, S, C]`` tensor is built; a site whose activations are non-zero off its
        firings, or another activation, takes the dense route (dense tensors, then
        ``sparse_activity_of``). Next tokens: the LM head a block of rows at a time when the
        host wants only the top-k (``_next_token``). The batch is the one the all-dense route
        gives, entry for entry and bit for bit.
        """
        from spd_host.topology import topology_of

        model = self.load_base_model().to(options.device)
        topo = topology_of(model)
        hooks = self.input_hook_points()
        self.to(options.device)
        threshold = options.threshold
        top_k = options.next_token_top_k
        forward = HarvestForward(
            model,
            lambda: topo.capture(hooks),
            next_token=options.next_token,
            top_k=top_k,
            defer=options.defer_next_token,
        )
        blocked = BlockedEncode()

        def harvest(tokens: Tensor) -> HarvestBatch:
            tokens = tokens.to(options.device)
            with torch.no_grad():
                captured, logits, next_topk = forward(tokens)
                encoders = self.site_encoders(captured)
                sparse, firings, activations = {}, {}, {}
                if encoders is None:
                    dense = self.encode_captured(captured)
                else:
                    dense = {}
                    for k, enc in encoders.items():
                        sp = blocked.encode(k, enc, threshold) if options.sparse else None
                        if sp is not None:
                            sparse[k] = sp
                        else:
                            dense[k] = enc.dense()
                # dense sites, on the device: sparse when their activations vanish off the
                # firings (the check sparse_activity_of makes), else dense tensors
                for k, v in dense.items():
                    v = v.float()
                    fired = v > threshold
                    sp = sparse_activity_of(fired, {ACTIVATION_TYPE: v}) if options.sparse else None
                    if sp is not None:
                        sparse[k] = sp
                    else:
                        firings[k], activations[k] = fired, {ACTIVATION_TYPE: v}
            return HarvestBatch(
                tokens=tokens,
                firings=firings,
                activations=activations,
                sparse={k: sparse[k] for k in (s.name for s in self.sites) if k in sparse},
                next_token_logits=logits.float() if logits is not None else None,
                next_token_topk=next_topk,
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
