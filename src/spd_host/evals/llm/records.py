"""Resume for the scorers: an append-only JSONL of records per suite, keyed by a run key.

``<evals dir>/<suite>.trials.jsonl`` holds one ``{"run_key", "record"}`` line per judged item,
written as it arrives; a re-run with the same run key (judge, harvest sub-run, settings)
reuses the ``ok`` records and retries the failed and unsent ones. A line cut short by a kill
is skipped. Paid suites also keep ``<suite>.spend.db`` (the autointerp spend ledger), so the
cost cap holds across resumes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from spd_host.autointerp.ledger import SpendLedger, open_ledger
from spd_host.evals.results import evals_dir, package_version

if TYPE_CHECKING:
    from spd_host.adapter import DecompositionAdapter

R = TypeVar("R", bound=BaseModel)


def spend_db_path(storage_key: str, suite: str) -> Path:
    """``<evals dir>/<suite>.spend.db``: a paid suite's spend ledger and batch tables."""
    return evals_dir(storage_key) / f"{suite}.spend.db"


class TrialLog(Generic[R]):
    def __init__(self, storage_key: str, suite: str, run_key: str, model: type[R]) -> None:
        self.path: Path = evals_dir(storage_key) / f"{suite}.trials.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_key = run_key
        self.model = model

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def ledger_path(self) -> Path:
        return self.path.with_name(self.path.name.replace(".trials.jsonl", ".spend.db"))

    def done(self) -> dict[str, R]:
        """The records of this run key judged ok, by ``trial_id``."""
        out: dict[str, R] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("run_key") != self.run_key:
                continue
            rec = self.model.model_validate(row["record"])
            if getattr(rec, "status", "ok") == "ok":
                out[str(getattr(rec, "trial_id"))] = rec  # noqa: B009
        return out

    @contextlib.contextmanager
    def sink(self) -> Iterator[Callable[[R], None]]:
        with self.path.open("a") as f:

            def write(rec: R) -> None:
                f.write(
                    json.dumps({"run_key": self.run_key, "record": rec.model_dump(mode="json")})
                )
                f.write("\n")
                f.flush()

            yield write


@contextlib.contextmanager
def open_ledger_at(path: Path) -> Iterator[SpendLedger]:
    conn, ledger = open_ledger(str(path))
    try:
        yield ledger
    finally:
        conn.close()


def result_header(
    adapter: DecompositionAdapter, config: BaseModel, harvest_run: str, notes: list[str]
) -> dict[str, Any]:
    """The :class:`~spd_host.evals.results.EvalResult` fields a scorer's result shares with
    every suite's: what was evaluated, with which package and settings, on which harvest."""
    return {
        "decomposition_id": adapter.decomposition_id,
        "method": adapter.method.name,
        "package_version": package_version(),
        "config": config.model_dump(mode="json"),
        "harvest_run": harvest_run,
        "notes": notes,
    }
