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
from spd_adapters._sparse_encode import SiteEncoder
from spd_adapters.clt.formats import CLTLayer, CLTLayout
from spd_adapters.clt.goodfire import GoodfireCLTLayer, GoodfireCLTLayout
from spd_host.adapter import DecompositionDefaults, MethodInfo, Site
from spd_host.errors import ConfigError
from spd_host.ids import DecompositionId


def site_name(layer: int) -> str:
    return f"layer_{layer}"


class CLTAdapter(DictionaryAdapter):
    """Sites are the CLT's source layers; internally each is addressed by its position ``p``
    in ``layout.layers`` (equal to the layer number unless the CLT skips layers)."""

    def __init__(
        self, did: DecompositionId, method: MethodInfo, layout: CLTLayout | GoodfireCLTLayout
    ) -> None:
        super().__init__(
            did,
            method,
            root=layout.root,
            base_model=layout.model_name,
            defaults=DecompositionDefaults(
                dataset=layout.extra.get("dataset"),
                extra={"format": layout.format, "n_layers": layout.n_layers, **layout.extra},
            ),
        )
        self.layout = layout
        self.clt = layout.model()
        act = layout.activation_name
        layers: list[CLTLayer | GoodfireCLTLayer] = list(layout.layers)
        self._layers = layers
        self._positions = {site_name(layer.layer): p for p, layer in enumerate(layers)}
        self._sites = [
            Site(
                name=site_name(layer.layer),
                n_components=layout.n_features,
                reads_from=layer.input_hook,
                writes_to=tuple(layers[q].output_hook for q in range(p, len(layers))),
                description=(
                    f"CLT source layer {layer.layer} ({layout.format}, {act}): reads "
                    f"{layout.native_input.replace('{i}', str(layer.layer))}, writes "
                    f"{layout.native_output.replace('{i}', 'i')} of layers "
                    f"{layer.layer}..{layers[-1].layer}"
                ),
            )
            for p, layer in enumerate(layers)
        ]

    @property
    def sites(self) -> Sequence[Site]:
        return self._sites

    def layer_of(self, site: str) -> int:
        """The position of ``site`` among the CLT's source layers."""
        if site not in self._positions:
            raise ConfigError(
                f"unknown site {site!r}", hint=f"sites are: {', '.join(self._positions)}"
            )
        return self._positions[site]

    def decoder_directions(self, site: str) -> Tensor:
        """``[n, d_model]``: what each feature of ``site`` writes into the residual stream per
        unit activation, summed over the layers it decodes into (every target layer's MLP
        output is added to the residual stream). The viewer reads logits through it."""
        p = self.layer_of(site)
        total = self.clt.decoder(p, p).float().clone()
        for q in range(p + 1, self.clt.n_layers):
            total += self.clt.decoder(p, q).float()
        return total

    def to(self, device: str | torch.device) -> CLTAdapter:
        if torch.device(device) != self.clt.device:
            self.clt.to(device)
        return self

    def with_inference(self, mode: str) -> CLTAdapter:
        """The same Goodfire CLT read with BatchTopK ``mode``: ``batch_topk`` or ``topk``.

        The equivalent of ``inference: <mode>`` in a CLTHarvestConfig file.
        """
        from spd_adapters.clt.goodfire import read_goodfire_clt

        if not isinstance(self.layout, GoodfireCLTLayout):
            raise ConfigError(
                f"{self.decomposition_id}: the inference option applies to Goodfire checkpoints, "
                f"this is {self.layout.format}"
            )
        layout = read_goodfire_clt(
            self.layout.root, model_name=self.layout.model_name, inference=mode
        )
        return CLTAdapter(self._did, self._method, layout)

    # -- the maths ---------------------------------------------------------------------------
    def encode(self, site: str, acts: Tensor) -> Tensor:
        """Feature activations of source layer ``site`` for its input ``[..., d_model]``.

        For BatchTopK checkpoints the result depends on every token passed together.
        """
        return self.clt.encode_layer(self.layer_of(site), acts)

    def reconstruct(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """MLP-output reconstructions keyed by target site, from encoder inputs keyed by site.

        Layer ``j`` is reconstructed when the inputs of every source layer ``<= j`` are given.
        """
        by_pos = {self.layer_of(s): x for s, x in inputs.items()}
        layers = self._layers
        return {site_name(layers[q].layer): out for q, out in self.clt.reconstruct(by_pos).items()}

    # -- host hooks --------------------------------------------------------------------------
    def hook_requirements(self) -> list[tuple[str, str, str]]:
        where = str(self.layout.config_file)
        out = []
        for layer in self._layers:
            native_in = self.layout.native_input.replace("{i}", str(layer.layer))
            native_out = self.layout.native_output.replace("{i}", str(layer.layer))
            out.append((layer.input_hook, f"{native_in} (layer {layer.layer})", where))
            out.append((layer.output_hook, f"{native_out} (layer {layer.layer})", where))
        return out

    def input_hook_points(self, sites: Sequence[str] | None = None) -> list[str]:
        return sorted({self._layers[self.layer_of(s)].input_hook for s in self._select(sites)})

    def encode_captured(self, captured: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            site_name(layer.layer): self.clt.encode_layer(p, captured[layer.input_hook])
            for p, layer in enumerate(self._layers)
        }

    def site_encoders(self, captured: Mapping[str, Tensor]) -> dict[str, SiteEncoder]:
        encoders = {}
        for p, layer in enumerate(self._layers):
            pre, act = self.clt.encoder_parts(p)
            encoders[site_name(layer.layer)] = SiteEncoder(
                captured[layer.input_hook], pre, act, self.layout.n_features
            )
        return encoders

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
        layers = self._layers
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
