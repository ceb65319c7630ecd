"""``TranscoderAdapter``: per-layer transcoders and SAEs from any reader in ``formats.py``.

Sites: one per dictionary. A site is named ``layer_{i}`` after the layer of the hook point it
reads (the same name whatever format the files are in); when several dictionaries read the
same layer (e.g. SAEs on the residual stream and on the MLP output), each is named
``layer_{i}.{hook kind}`` instead, e.g. ``layer_3.resid_post``. ``reads_from`` and
``writes_to`` are canonical hook points; an SAE reads and writes the same one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from spd_adapters import _hooks
from spd_adapters._adapter_base import DictionaryAdapter
from spd_adapters._dictionary import Dictionary
from spd_adapters._sparse_encode import SiteEncoder
from spd_adapters.transcoder.formats import SiteSource, TranscoderLayout
from spd_host.adapter import DecompositionDefaults, MethodInfo, Site
from spd_host.errors import ConfigError
from spd_host.ids import DecompositionId


def site_names(sources: Sequence[SiteSource]) -> list[str]:
    counts = Counter(s.layer for s in sources)
    names = [
        f"layer_{s.layer}"
        if counts[s.layer] == 1
        else f"layer_{s.layer}.{_hooks.kind_of(s.input_hook)}"
        for s in sources
    ]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        from spd_host.errors import FormatError

        raise FormatError(
            f"two dictionaries read the same hook point ({dupes[0]})",
            hint="keep one per hook point",
        )
    return names


class TranscoderAdapter(DictionaryAdapter):
    def __init__(
        self,
        did: DecompositionId,
        method: MethodInfo,
        layout: TranscoderLayout,
        *,
        base_model: str | None = None,
    ) -> None:
        super().__init__(
            did,
            method,
            root=layout.root,
            base_model=base_model or layout.model_name,
            defaults=DecompositionDefaults(
                dataset=layout.dataset,
                seq_len=layout.seq_len,
                extra={"format": layout.format, **layout.extra},
            ),
        )
        self.layout = layout
        names = site_names(layout.sites)
        self._sources: dict[str, SiteSource] = dict(zip(names, layout.sites, strict=True))
        self._sites = [
            Site(
                name=name,
                n_components=src.n_features,
                reads_from=src.input_hook,
                writes_to=(src.output_hook,),
                description=(
                    f"{'SAE' if src.is_sae else 'transcoder'} ({layout.format}, {src.activation}) reading "
                    f"{src.native_input}" + ("" if src.is_sae else f", writing {src.native_output}")
                ),
            )
            for name, src in self._sources.items()
        ]
        self._dicts: dict[str, Dictionary] = {}
        self._encoders: dict[str, Dictionary] = {}  # encoder-only halves (harvest)
        self._device = torch.device("cpu")

    @property
    def sites(self) -> Sequence[Site]:
        return self._sites

    def source(self, site: str) -> SiteSource:
        if site not in self._sources:
            raise ConfigError(
                f"unknown site {site!r}", hint=f"sites are: {', '.join(self._sources)}"
            )
        return self._sources[site]

    def dictionary(self, site: str) -> Dictionary:
        """The site's weights (read from disk on first use)."""
        if site not in self._dicts:
            self._dicts[site] = self.source(site).load().to(self._device)
            self._encoders.pop(site, None)
        return self._dicts[site]

    def encoder_dictionary(self, site: str) -> Dictionary:
        """The site's encoder half (no decoder weights: a harvest never decodes), or the whole
        dictionary when it is loaded already or its reader cannot split it."""
        if site in self._dicts:
            return self._dicts[site]
        if site not in self._encoders:
            src = self.source(site)
            self._encoders[site] = (src.load_encoder or src.load)().to(self._device)
        return self._encoders[site]

    def to(self, device: str | torch.device) -> TranscoderAdapter:
        self._device = torch.device(device)
        self._dicts = {k: v.to(self._device) for k, v in self._dicts.items()}
        self._encoders = {k: v.to(self._device) for k, v in self._encoders.items()}
        return self

    # -- the maths, per site --------------------------------------------------------------
    def encode(self, site: str, acts: Tensor) -> Tensor:
        """Feature activations ``[..., n]`` for the site's input ``[..., d_in]``."""
        return self.dictionary(site).encode(acts)

    def reconstruct(self, site: str, acts: Tensor, target: Tensor | None = None) -> Tensor:
        """The site's reconstruction of its output hook point from its input ``acts``.

        ``target`` (the true output) is needed only by dictionaries trained on unit-normalised
        activations (nn_decompositions ``input_unit_norm``), whose output is mapped back with
        the target's own mean and std.
        """
        return self.dictionary(site).reconstruct(acts, target)

    # -- options -------------------------------------------------------------------------------
    @property
    def inference(self) -> str | None:
        """How BatchTopK checkpoints are read: ``batch_topk`` (default) or ``topk``; else None."""
        return self.layout.extra.get("inference")

    def with_inference(self, mode: str) -> TranscoderAdapter:
        """The same Goodfire checkpoints read with BatchTopK ``mode``: ``batch_topk`` or ``topk``.

        The equivalent of ``inference: <mode>`` in the TranscoderHarvestConfig file.
        """
        from spd_adapters.transcoder.goodfire import read_goodfire_transcoders

        if self.layout.format != "goodfire":
            raise ConfigError(
                f"{self.decomposition_id}: the inference option applies to Goodfire checkpoints, "
                f"this is {self.layout.format}"
            )
        layout = read_goodfire_transcoders(self.layout.root, inference=mode)
        return TranscoderAdapter(self._did, self._method, layout)

    # -- host hooks -------------------------------------------------------------------------
    def hook_requirements(self) -> list[tuple[str, str, str]]:
        out = []
        for src in self._sources.values():
            out.append((src.input_hook, src.native_input, str(src.config_file)))
            out.append((src.output_hook, src.native_output, str(src.config_file)))
        return out

    def input_hook_points(self, sites: Sequence[str] | None = None) -> list[str]:
        return sorted({self.source(s).input_hook for s in self._select(sites)})

    def encode_captured(self, captured: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: self.encode(name, captured[src.input_hook]) for name, src in self._sources.items()
        }

    def site_encoders(self, captured: Mapping[str, Tensor]) -> dict[str, SiteEncoder]:
        encoders = {}
        for name, src in self._sources.items():
            d = self.encoder_dictionary(name)
            encoders[name] = SiteEncoder(
                captured[src.input_hook], d.preactivations, d.activation, d.n_features
            )
        return encoders

    @property
    def splice_is_local(self) -> bool:
        """True: a site's splice reads its input hook point and replaces its output hook point,
        both in the site's own block; nothing below is read or changed."""
        return True

    @contextmanager
    def splice(
        self,
        model: torch.nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> Iterator[None]:
        """Replace each chosen site's output hook point by its reconstruction (same forward)."""
        from spd_host.topology import topology_of

        self._check_variant(variant)
        chosen = self._select(sites)
        topo = topology_of(model)
        targets = Counter(self.source(s).output_hook for s in chosen)
        clash = [h for h, c in targets.items() if c > 1]
        if clash:
            raise ConfigError(
                f"several chosen sites write {clash[0]}", hint="splice them one at a time"
            )
        needed = sorted({self.source(s).input_hook for s in chosen if not self.source(s).is_sae})
        with topo.capture(needed) as captured:
            replacements: dict[str, Any] = {}
            for s in chosen:
                src, d = self.source(s), self.dictionary(s)
                if src.is_sae:
                    replacements[src.output_hook] = _sae_fn(d)
                else:
                    replacements[src.output_hook] = _transcoder_fn(d, captured, src.input_hook)
            with topo.replace(replacements):
                yield


def _sae_fn(d: Dictionary) -> Any:
    def fn(orig: Tensor) -> Tensor:
        return d.reconstruct(orig, orig).to(orig.dtype)

    return fn


def _transcoder_fn(d: Dictionary, captured: Mapping[str, Tensor], hook: str) -> Any:
    def fn(orig: Tensor) -> Tensor:
        return d.reconstruct(captured[hook], orig).to(orig.dtype)

    return fn
