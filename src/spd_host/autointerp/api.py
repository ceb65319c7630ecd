"""The library entry points over a stored harvest: run autointerp, read labels back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from spd_host.autointerp.bridge import HarvestEvidence, harvest_id
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.runner import RunReport, alabel_components
from spd_host.autointerp.store import LabelRecord, LabelStore, default_db_path
from spd_host.errors import ResultsNotFoundError


def labels_db_path(decomposition_id: str) -> Path:
    """``results_dir(storage_key)/autointerp/labels.db`` for a decomposition ID."""
    from spd_host.plugins import get_host

    return default_db_path(get_host().parse_id(decomposition_id).storage_key)


def run_autointerp(
    decomposition_id: str,
    config: AutointerpConfig | None = None,
    *,
    harvest_run: str | None = None,
    db_path: Path | None = None,
    progress: bool = True,
    console: Console | None = None,
    force: bool = False,
    batch_progress: Callable[[Any], None] | None = None,
) -> RunReport:
    """Label every component of the decomposition's harvest (latest sub-run by default) that
    is not yet labelled for this strategy and model, and fired at least ``min_firing_count``
    times. ``force``: label again the components already labelled (the new label replaces
    the old; the spend still counts against the store's cap). With ``config.batch`` the
    provider's batch API is used; ``batch_progress`` gets a
    :class:`~spd_host.autointerp.batch.engine.BatchProgress` after every poll."""
    from spd_host.harvest import HarvestRepo

    config = config or AutointerpConfig()
    repo = HarvestRepo.open(decomposition_id, harvest_run)
    evidence = HarvestEvidence(repo)
    keys = [s.key for s in repo.summary() if s.firing_count >= config.min_firing_count]
    with LabelStore(db_path or labels_db_path(decomposition_id)) as store:
        return asyncio.run(
            alabel_components(
                keys,
                evidence,
                config,
                store=store,
                harvest_id=harvest_id(repo),
                decomposition_id=repo.adapter_id,
                progress=progress,
                console=console,
                force=force,
                batch_progress=batch_progress,
            )
        )


def load_labels(
    decomposition_id: str,
    *,
    component_key: str | None = None,
    strategy: str | None = None,
    model: str | None = None,
    db_path: Path | None = None,
    include_failed: bool = False,
) -> list[LabelRecord]:
    """Stored labels (newest first); failures only when asked for."""
    path = db_path or labels_db_path(decomposition_id)
    if not path.exists():
        raise ResultsNotFoundError(
            f"no autointerp labels for {decomposition_id} ({path} does not exist)",
            hint=f"run `spd-host autointerp {decomposition_id}` first",
        )
    with LabelStore(path) as store:
        return store.records(
            component_key=component_key,
            strategy=strategy,
            model=model,
            status=None if include_failed else "ok",
        )
