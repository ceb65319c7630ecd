"""What ``HarvestRepo`` returns: frozen pydantic models (JSON-ready)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ComponentSummary(_Frozen):
    """One component's scalar statistics (see ``spd_host.harvest.accumulator`` for definitions)."""

    key: str
    site: str
    index: int
    firing_count: int
    density: float
    mean_all: dict[str, float]
    mean_firing: dict[str, float | None]
    max_firing: dict[str, float | None]


class ActivationExample(_Frozen):
    """A context window around one firing; padding at sequence edges is already stripped.

    ``centre`` indexes ``tokens`` (and ``activations[type]``, ``firings``) at the firing token.
    ``position`` is the firing token's global index in the harvest's token stream
    (``sequence * seq_len + offset``).
    """

    key: str
    kind: Literal["top", "reservoir"]
    rank: int
    score: float
    position: int
    tokens: list[int]
    activations: dict[str, list[float]]
    firings: list[bool]
    centre: int


class ComponentDetail(ComponentSummary):
    histogram_edges: list[float]
    histogram_counts: list[int]
    output_mass_dropped: float
    top_examples: list[ActivationExample]
    reservoir_examples: list[ActivationExample]


class TokenScore(_Frozen):
    token: int
    value: float
    count: float  # co-occurrence n(c, t)
    token_total: float  # n(t)


class TokenStats(_Frozen):
    """Token statistics of one component.

    ``precision = n(c,t) / n(t)``, ``recall = n(c,t) / n(c)``,
    ``pmi = log(n(c,t) N / (n(c) n(t)))``. Every list ranks only tokens with
    ``n(t) >= min_support``: top lists those with ``n(c,t) > 0``; the bottom PMI list uses
    ``n(c,t) + 0.5`` (so that tokens the component avoids, including never co-occurring ones,
    rank lowest instead of being dropped). Exact ties: larger ``count`` first, then token id.
    For ``kind="output"`` counts are expected next-token probability mass and each
    ``count`` may be under-estimated by at most ``approximation_bound``; for ``kind="input"``
    the bound is 0 (exact) unless the harvest bounded its token tables
    (``token_table_max_pairs``).
    """

    key: str
    kind: Literal["input", "output"]
    firing_count: int
    n_tokens: int
    min_support: int
    approximation_bound: float
    top_pmi: list[TokenScore]
    bottom_pmi: list[TokenScore]
    top_precision: list[TokenScore]
    top_recall: list[TokenScore]
