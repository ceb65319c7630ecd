"""Versioned eval results: the base model every suite's result extends, and their JSON files.

One file per suite and decomposition: ``results_dir(storage_key)/evals/<suite>.json``. A result
carries everything needed to reproduce or trust it: the suite's config, the package version,
the harvest sub-run it read (if any), and free-text notes (e.g. "offline baseline judge").
Writes are atomic (temp file + rename), so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_host.errors import FormatError, ResultsNotFoundError

SCHEMA_VERSION = 1


class EvalResult(BaseModel):
    """Fields every suite's result has; suites subclass it and add their own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: headline keys shown in comparison tables, in order (subclasses override)
    headline_fields: ClassVar[tuple[str, ...]] = ()

    schema_version: int = SCHEMA_VERSION
    suite: str
    decomposition_id: str
    method: str
    package_version: str
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    )
    config: dict[str, Any]
    harvest_run: str | None = Field(
        default=None, description="The harvest sub-run the suite read, or None if it read none."
    )
    notes: list[str] = Field(default_factory=list)

    def headline(self) -> dict[str, Any]:
        """The few numbers a comparison table shows for this result (one row)."""
        return {k: getattr(self, k) for k in self.headline_fields}

    def table_rows(self) -> list[dict[str, Any]]:
        """Comparison-table rows for this decomposition (several when a suite has variants)."""
        return [self.headline()]


def package_version() -> str:
    from spd_host import __version__

    return __version__


def evals_dir(storage_key: str) -> Path:
    from spd_host.paths import results_dir

    return results_dir(storage_key) / "evals"


def result_path(storage_key: str, suite: str) -> Path:
    return evals_dir(storage_key) / f"{suite}.json"


def save_result(result: EvalResult, storage_key: str) -> Path:
    """Write ``result`` atomically; return the file's path."""
    path = result_path(storage_key, result.suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(result.model_dump_json(indent=2))
            f.write("\n")
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_result(path: Path, model: type[EvalResult]) -> EvalResult:
    """Read a result file back into ``model``; clear errors for a missing or foreign file."""
    if not path.is_file():
        raise ResultsNotFoundError(
            f"no eval result at {path}", hint="run `spd-host eval <suite> <id>` first"
        )
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as err:
        raise FormatError(
            f"{path} is not a valid {model.__name__} (schema version {SCHEMA_VERSION}): {err}",
            hint="re-run the eval to rewrite it with this version of spd-host",
        ) from None
