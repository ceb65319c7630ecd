"""``CLTAdapter``: a circuit-tracer cross-layer transcoder as a host decomposition.

Sites: one per source layer, named ``layer_{i}`` (as the per-layer transcoder sites are, so the
component ``layer_3:17`` means "feature 17 read at layer 3" for both methods). A site
``reads_from`` its encoder's canonical hook point and ``writes_to`` the MLP outputs of layers
``i .. L-1``. Splicing site ``layer_j`` replaces layer ``j``'s MLP output with the CLT's
reconstruction of it: the sum of the decoder contributions of every source layer ``<= j``,
encoded from the same (spliced) forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from spd_adapters._adapter_base import DictionaryAdapter
from spd_adapters.clt.formats import CLTLayout, CrossLayerTranscoder
from spd_host.adapter import DecompositionDefaults, MethodInfo, Site
from spd_host.errors import ConfigError
from spd_host.ids import DecompositionId


def site_name(layer: int) -> str:
    return f"layer_{layer}"


class CLTAdapter(DictionaryAdapter):
    def __init__(self, did: DecompositionId, method: MethodInfo, layout: CLTLayout) -> None:
        super().__init__(
            did,
            method,
            root=layout.root,
            base_model=layout.model_name,
            defaults=DecompositionDefaults(
                dataset=layout.extra.get("dataset"),
                extra={"format": "circuit-tracer", "n_layers": layout.n_layers, **layout.extra},
            ),
        )
        self.layout = layout
        self.clt = CrossLayerTranscoder(layout)
        act = "JumpReLU" if layout.jumprelu else "ReLU"
        L = layout.n_layers
        self._sites = [
            Site(
                name=site_name(layer.layer),
                n_components=layout.n_features,
                reads_from=layer.input_hook,
                writes_to=tuple(layout.layers[j].output_hook for j in range(layer.layer, L)),
                description=(
                    f"CLT source layer {layer.layer} ({act}): reads {layout.native_input}, "
                    f"writes {layout.native_output} of layers {layer.layer}..{L - 1}"
                ),
            )
            for layer in layout.layers
        ]

    @property
    def sites(self) -> Sequence[Site]:
        return self._sites

    def layer_of(self, site: str) -> int:
        for s, layer in zip(self._sites, self.layout.layers, strict=True):
            if s.name == site:
                return layer.layer
        raise ConfigError(
            f"unknown site {site!r}", hint=f"sites are: {', '.join(s.name for s in self._sites)}"
        )

    def to(self, device: str | torch.device) -> CLTAdapter:
        if torch.device(device) != self.clt.device:
            self.clt.to(device)
        return self

    # -- the maths ---------------------------------------------------------------------------
    def encode(self, site: str, acts: Tensor) -> Tensor:
        """Feature activations of source layer ``site`` for its input ``[..., d_model]``."""
        return self.clt.encode_layer(self.layer_of(site), acts)

    def reconstruct(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """MLP-output reconstructions keyed by target site, from encoder inputs keyed by site.

        Layer ``j`` is reconstructed when the inputs of every source layer ``<= j`` are given.
        """
        by_layer = {self.layer_of(s): x for s, x in inputs.items()}
        return {site_name(j): out for j, out in self.clt.reconstruct(by_layer).items()}

    # -- host hooks --------------------------------------------------------------------------
    def hook_requirements(self) -> list[tuple[str, str, str]]:
        where = str(self.layout.config_file)
        out = []
        for layer in self.layout.layers:
            out.append(
                (layer.input_hook, f"{self.layout.native_input} (layer {layer.layer})", where)
            )
            out.append(
                (layer.output_hook, f"{self.layout.native_output} (layer {layer.layer})", where)
            )
        return out

    def input_hook_points(self, sites: Sequence[str] | None = None) -> list[str]:
        return sorted(
            {self.layout.layers[self.layer_of(s)].input_hook for s in self._select(sites)}
        )

    def encode_captured(self, captured: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            site_name(layer.layer): self.clt.encode_layer(layer.layer, captured[layer.input_hook])
            for layer in self.layout.layers
        }

    @contextmanager
    def splice(
        self,
        model: torch.nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> Iterator[None]:
        from spd_host.topology import topology_of

        self._check_variant(variant)
        targets = sorted(self.layer_of(s) for s in self._select(sites))
        topo = topology_of(model)
        layers = self.layout.layers
        needed = sorted({layers[i].input_hook for i in range(max(targets) + 1)})
        memo: dict[int, tuple[Tensor, Tensor]] = {}

        def acts_of(i: int, captured: Mapping[str, Tensor]) -> Tensor:
            x = captured[layers[i].input_hook]
            hit = memo.get(i)
            if hit is None or hit[0] is not x:  # a new forward pass captured a new tensor
                hit = (x, self.clt.encode_layer(i, x))
                memo[i] = hit
            return hit[1]

        with topo.capture(needed) as captured:
            replacements: dict[str, Any] = {}
            for j in targets:

                def fn(orig: Tensor, j: int = j) -> Tensor:
                    acts = {i: acts_of(i, captured) for i in range(j + 1)}
                    return self.clt.decode_layer(j, acts).to(orig.dtype)

                replacements[layers[j].output_hook] = fn
            with topo.replace(replacements):
                yield
