"""Harvest: one exact, resumable, shardable pass that collects per-component statistics.

Public API::

    HarvestConfig, run_harvest, merge_shards, HarvestRepo,
    ComponentSummary, ComponentDetail, ActivationExample, TokenStats, TokenScore

See ``docs/harvest.md`` for definitions, data structures and exactness.
"""

from __future__ import annotations

from spd_host.harvest.config import HarvestConfig
from spd_host.harvest.models import (
    ActivationExample,
    ComponentDetail,
    ComponentSummary,
    TokenScore,
    TokenStats,
)
from spd_host.harvest.repo import HarvestRepo
from spd_host.harvest.runner import merge_shards, run_harvest, summarize

__all__ = [
    "ActivationExample",
    "ComponentDetail",
    "ComponentSummary",
    "HarvestConfig",
    "HarvestRepo",
    "TokenScore",
    "TokenStats",
    "merge_shards",
    "run_harvest",
    "summarize",
]
