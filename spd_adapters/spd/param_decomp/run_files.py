"""A param-decomp run directory: its pinned config, its checkpoints, the latest step.

Layout (param-decomp ``core/run_files.py``, ``core/checkpoint.py``)::

    runs/<run id>/launch_config.yaml          (older runs: config.yaml)
    runs/<run id>/deliverable.yaml            optional normalised record, preferred when present
    runs/<run id>/ckpts/<step>/decomposition/ (+ training/)  an orbax CheckpointManager step
    runs/<run id>/ckpts/<step>/default/       older runs: one item holding the whole TrainState
    runs/<run id>/metrics.jsonl

The latest checkpoint is the largest integer step directory that holds one of the two layouts
(orbax writes unfinished saves under a temporary non-integer name, so those never count).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from spd_adapters.spd.param_decomp.launch_config import (
    DELIVERABLE_FILENAME,
    LAUNCH_CONFIG_FILENAME,
    LEGACY_CONFIG_FILENAME,
)
from spd_host.errors import FormatError, SourceNotFoundError

RUNS_DIR_ENV = "SPD_HOST_PD_RUNS_DIR"
CKPTS_DIRNAME = "ckpts"

ItemLayout = Literal["decomposition", "default"]


@dataclass(frozen=True)
class PdRunFiles:
    run_dir: Path
    config_path: Path
    step_dir: Path
    step: int
    layout: ItemLayout

    @property
    def item_dir(self) -> Path:
        return self.step_dir / self.layout


def is_pd_run(path: Path) -> bool:
    """A param-decomp run dir: ``launch_config.yaml`` (only param-decomp writes that name), or
    an older ``config.yaml`` next to an orbax ``ckpts/`` directory."""
    if not path.is_dir():
        return False
    if (path / LAUNCH_CONFIG_FILENAME).is_file() or (path / DELIVERABLE_FILENAME).is_file():
        return True
    return (path / LEGACY_CONFIG_FILENAME).is_file() and (path / CKPTS_DIRNAME).is_dir()


def resolve_short_id(run_id: str) -> Path:
    """``p-xxxxxxxx`` -> ``$SPD_HOST_PD_RUNS_DIR/<id>`` (or ``.../runs/<id>`` under a data root)."""
    root = os.environ.get(RUNS_DIR_ENV)
    if not root:
        raise SourceNotFoundError(
            f"param-decomp run ID {run_id!r} needs a runs directory",
            hint=f"set {RUNS_DIR_ENV} to the directory holding the run dirs (param-decomp's "
            f"<data root>/runs), or use spd:<path to the run dir>",
        )
    base = Path(root).expanduser()
    for candidate in (base / run_id, base / "runs" / run_id):
        if candidate.is_dir():
            return candidate
    raise SourceNotFoundError(
        f"param-decomp run {run_id!r} not found under {RUNS_DIR_ENV}={base}",
        hint=f"expected the directory {base / run_id}",
    )


def _step_layout(step_dir: Path) -> ItemLayout | None:
    split = (step_dir / "decomposition").is_dir()
    legacy = (step_dir / "default").is_dir()
    if split and legacy:
        raise FormatError(
            f"{step_dir}: holds both a decomposition/ and a default/ item; cannot tell the layout"
        )
    return "decomposition" if split else "default" if legacy else None


def discover_pd_run(run_dir: Path) -> PdRunFiles:
    """The run's config file and latest checkpoint step, with clear errors for broken runs."""
    candidates = (DELIVERABLE_FILENAME, LAUNCH_CONFIG_FILENAME, LEGACY_CONFIG_FILENAME)
    config_path = next(
        (run_dir / n for n in candidates if (run_dir / n).is_file()),
        run_dir / LAUNCH_CONFIG_FILENAME,
    )
    if not config_path.is_file():
        raise FormatError(
            f"{run_dir}: no {LAUNCH_CONFIG_FILENAME} (or older {LEGACY_CONFIG_FILENAME})",
            hint="a param-decomp run directory pins its config next to ckpts/",
        )
    ckpts = run_dir / CKPTS_DIRNAME
    steps: list[tuple[int, Path, ItemLayout]] = []
    if ckpts.is_dir():
        for child in ckpts.iterdir():
            if child.is_dir() and child.name.isdigit():
                layout = _step_layout(child)
                if layout is not None:
                    steps.append((int(child.name), child, layout))
    if not steps:
        found = sorted(p.name for p in ckpts.iterdir()) if ckpts.is_dir() else []
        raise FormatError(
            f"{ckpts}: no checkpoint step holding a decomposition/ (or older default/) item "
            f"(found: {found or 'nothing'})",
            hint="copy at least the latest ckpts/<step>/decomposition/ of the run",
        )
    step, step_dir, layout = max(steps)
    return PdRunFiles(run_dir, config_path, step_dir, step, layout)
