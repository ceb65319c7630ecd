"""Harvest: one exact, resumable, shardable pass that collects per-component statistics.

Public API::

    HarvestConfig, run_harvest, merge_shards, HarvestRepo,
    ComponentSummary, ComponentDetail, ActivationExample, TokenStats, TokenScore

See ``docs/harvest.md`` for definitions, data structures and exactness.

Importing this package is cheap: the config and result models are pydantic only, and torch
loads when ``HarvestRepo``/``run_harvest``/``merge_shards``/``summarize`` are first used (so
``spd_host.HarvestConfig`` can be built without importing torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spd_host._lazy import lazy_exports

if TYPE_CHECKING:
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

_LAZY = {
    "HarvestConfig": "spd_host.harvest.config",
    "ActivationExample": "spd_host.harvest.models",
    "ComponentDetail": "spd_host.harvest.models",
    "ComponentSummary": "spd_host.harvest.models",
    "TokenScore": "spd_host.harvest.models",
    "TokenStats": "spd_host.harvest.models",
    "HarvestRepo": "spd_host.harvest.repo",
    "merge_shards": "spd_host.harvest.runner",
    "run_harvest": "spd_host.harvest.runner",
    "summarize": "spd_host.harvest.runner",
}

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


__getattr__, __dir__ = lazy_exports("spd_host.harvest", _LAZY, __all__, globals())
