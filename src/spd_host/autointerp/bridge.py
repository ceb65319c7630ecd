"""Build :class:`ComponentEvidence` from a finished harvest (``spd_host.harvest.HarvestRepo``).

The one place autointerp touches harvest types: token ids are decoded through the
decomposition's tokenizer, the method blurb and site come from the adapter, the primary
activation type (the adapter's first) is the one examples show. Top examples come first, then
the reservoir (uniform) sample, so quantile-stratified selection has both to draw from.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from spd_host.autointerp.evidence import (
    ActivationExample,
    ComponentEvidence,
    TokenStatLists,
    TokenValue,
)

if TYPE_CHECKING:
    from spd_host.adapter import DecompositionAdapter
    from spd_host.harvest import HarvestRepo
    from spd_host.harvest.models import TokenScore


def harvest_id(repo: HarvestRepo) -> str:
    """The resume key's harvest part: the harvest sub-run's directory name."""
    return repo.run


class HarvestEvidence:
    """``key -> ComponentEvidence`` for one harvest, loading the adapter and tokenizer once."""

    def __init__(
        self, repo: HarvestRepo, adapter: DecompositionAdapter | None = None, *, n_tokens: int = 10
    ) -> None:
        self.repo = repo
        self._adapter = adapter
        self.n_tokens = n_tokens

    @cached_property
    def adapter(self) -> DecompositionAdapter:
        if self._adapter is not None:
            return self._adapter
        from spd_host.plugins import get_host

        return get_host().load_adapter(self.repo.adapter_id)

    @cached_property
    def n_layers(self) -> int | None:
        """Block count from the base model's config (no weights), for "block i of n"."""
        try:
            from spd_host.topology.loading import load_config

            config = load_config(self.adapter.base_model_name)
            return int(config.num_hidden_layers)  # type: ignore[attr-defined]
        except Exception:
            return None

    @cached_property
    def tokenizer(self) -> Any:
        return self.repo.tokenizer

    @cached_property
    def _decode_cache(self) -> dict[int, str]:
        return {}

    def decode(self, token: int) -> str:
        cache = self._decode_cache
        if token not in cache:
            cache[token] = str(self.tokenizer.decode([int(token)]))
        return cache[token]

    def keys(self) -> list[str]:
        return [s.key for s in self.repo.summary()]

    def _values(self, scores: list[TokenScore]) -> tuple[TokenValue, ...]:
        return tuple(TokenValue(token=self.decode(s.token), value=float(s.value)) for s in scores)

    def _stats(self, key: str, kind: Any) -> TokenStatLists:
        ts = self.repo.token_stats(key, kind, top=self.n_tokens)
        return TokenStatLists(
            pmi=self._values(ts.top_pmi),
            precision=self._values(ts.top_precision),
            recall=self._values(ts.top_recall),
        )

    def __call__(self, key: str) -> ComponentEvidence:
        detail = self.repo.component(key)
        adapter = self.adapter
        primary = adapter.activation_types[0]
        site = next((s for s in adapter.sites if s.name == detail.site), None)
        location = site.reads_from if site is not None else detail.site
        description = (site.description if site is not None else "") or describe_location(
            location, self.n_layers
        )
        examples = tuple(
            ActivationExample(
                tokens=tuple(self.decode(t) for t in ex.tokens),
                activations=tuple(
                    float(a)
                    for a in ex.activations.get(primary, next(iter(ex.activations.values())))
                ),
                firings=tuple(bool(f) for f in ex.firings),
                centre=ex.centre,
            )
            for ex in [*detail.top_examples, *detail.reservoir_examples]
        )
        config = self.repo.config
        dataset = (
            config.dataset or adapter.defaults.dataset or "the decomposition's default dataset"
        )
        return ComponentEvidence(
            component_key=key,
            site=detail.site,
            location=location,
            location_description=description,
            method_name=adapter.method.name,
            method_description=adapter.method.description,
            firing_density=min(1.0, max(0.0, float(detail.density))),
            firing_count=detail.firing_count,
            input_tokens=self._stats(key, "input"),
            output_tokens=self._stats(key, "output"),
            examples=examples,
            dataset=dataset,
            model_name=adapter.base_model_name,
        )


def describe_location(location: str, n_layers: int | None) -> str:
    """A human description of a canonical hook point or module address, without loading the
    model: the topology grammar's wording when the block count is known, else a plain one."""
    if n_layers:
        try:
            from spd_host.topology import grammar

            if grammar.is_hook_point(location):
                return grammar.describe_hook_point(grammar.parse_hook_point(location), n_layers)
            return grammar.describe_address(grammar.parse_address(location), n_layers)
        except Exception:
            pass
    layer, _, role = location.partition(".")
    names = {
        "resid_pre": "residual stream entering block",
        "resid_mid": "residual stream between attention and MLP of block",
        "resid_post": "residual stream leaving block",
        "mlp_in": "MLP input (after its layer norm) in block",
        "mlp_out": "MLP output in block",
        "attn_out": "attention output in block",
    }
    if layer.isdigit() and role in names:
        return f"{names[role]} {layer}"
    return location


def evidence_from_harvest(repo: HarvestRepo, key: str) -> ComponentEvidence:
    """One component's evidence (builds a fresh :class:`HarvestEvidence`; reuse one for many)."""
    return HarvestEvidence(repo)(key)
