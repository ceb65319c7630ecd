"""The adapter: metadata without weights, then base model, harvest and (optional) splice.

On-disk format of this example (a directory)::

    sae.json            {"base_model": "<hub name or dir>", "hook_point": "2.resid_post"}
    sae.safetensors     W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]

Encoding is ``f = relu((x - b_dec) @ W_enc + b_enc)``, decoding ``x_hat = f @ W_dec + b_dec``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

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
from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.ids import DecompositionId


class ResidSaeAdapter:
    """Implements ``spd_host.DecompositionAdapter`` and ``spd_host.SupportsSplice``."""

    def __init__(self, did: DecompositionId, root: Path, method: MethodInfo) -> None:
        meta_path = root / "sae.json"
        if not meta_path.is_file():
            raise SourceNotFoundError(f"{root}: no sae.json", hint="is this a resid-sae directory?")
        meta = json.loads(meta_path.read_text())
        self._did, self._method, self.root = did, method, root
        self.hook_point: str = meta["hook_point"]  # a canonical spd-host hook point
        self._base_model: str = meta["base_model"]
        self._weights: dict[str, torch.Tensor] | None = None
        self._model: torch.nn.Module | None = None
        from safetensors import safe_open  # the header gives n without reading weights

        with safe_open(str(root / "sae.safetensors"), framework="pt") as fh:
            _d, n = fh.get_slice("W_enc").get_shape()
        self._site = Site(
            name=self.hook_point,
            n_components=n,
            reads_from=self.hook_point,
            writes_to=(self.hook_point,),
            description=f"SAE with {n} features on the residual stream at {self.hook_point}",
        )

    # ---- metadata: cheap, no weights (`spd-host info` uses only these) ----
    @property
    def decomposition_id(self) -> str:
        return self._did.normalized

    @property
    def method(self) -> MethodInfo:
        return self._method

    @property
    def sites(self) -> Sequence[Site]:
        return (self._site,)

    @property
    def activation_types(self) -> Sequence[str]:
        return ("activation",)  # the first type is the one firings are thresholded on

    @property
    def base_model_name(self) -> str:
        return self._base_model

    @property
    def defaults(self) -> DecompositionDefaults:
        return DecompositionDefaults()

    # ---- heavy parts, loaded on first use ----
    def load_base_model(self) -> torch.nn.Module:
        if self._model is None:
            from spd_host.models import load_base_model

            self._model = load_base_model(self._base_model)
        return self._model

    def load_tokenizer(self) -> Any:
        from spd_host.models import load_tokenizer

        return load_tokenizer(self._base_model)

    def weights(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            from safetensors.torch import load_file

            w = load_file(str(self.root / "sae.safetensors"))
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                if name not in w:
                    raise FormatError(f"{self.root / 'sae.safetensors'}: missing tensor {name!r}")
            self._weights = {k: v.float() for k, v in w.items()}
        return self._weights

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        return torch.relu((x.float() - w["b_dec"]) @ w["W_enc"] + w["b_enc"])

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        return f @ w["W_dec"] + w["b_dec"]

    # ---- harvest: one forward per batch, read the hook point, encode ----
    def harvest_fn(self, options: HarvestOptions) -> HarvestFn:
        from spd_host.topology import topology_of

        model = self.load_base_model()
        topo = topology_of(model)
        site = self._site.name

        @torch.no_grad()
        def run(tokens: torch.Tensor) -> HarvestBatch:
            with topo.capture([self.hook_point]) as acts:
                logits = model(tokens).logits
            f = self.encode(acts[self.hook_point])
            fired = f > options.threshold
            top_k = options.next_token_top_k if options.next_token else None
            # a ReLU SAE's activations vanish where it does not fire: when the host accepts
            # it, hand one entry per firing instead of [B, S, C] tensors
            sparse = sparse_activity_of(fired, {"activation": f}) if options.sparse else None
            return HarvestBatch(
                tokens=tokens,
                firings={site: fired} if sparse is None else {},
                activations={site: {"activation": f}} if sparse is None else {},
                sparse={site: sparse} if sparse is not None else {},
                next_token_logits=logits if options.next_token and not top_k else None,
                next_token_topk=next_token_topk_of(logits, top_k) if top_k else None,
            )

        return run

    # ---- optional: SupportsSplice, used by `spd-host eval fidelity` ----
    @property
    def splice_variants(self) -> Sequence[str]:
        return ("reconstruction",)

    @contextmanager
    def splice(
        self,
        model: torch.nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> Iterator[None]:
        from spd_host.topology import topology_of

        if sites is not None and self._site.name not in sites:
            yield  # asked to splice other sites only: nothing of ours to replace
            return

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            return self.decode(self.encode(x)).to(x.dtype)

        with topology_of(model).replace({self.hook_point: reconstruct}):
            yield
