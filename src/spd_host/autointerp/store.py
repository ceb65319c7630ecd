"""The label store: one SQLite database (WAL) per decomposition.

Location: ``results_dir(storage_key)/autointerp/labels.db``. One row per
``(harvest_id, component_key, strategy, model)`` — the resume key — holding either a label
(``status='ok'``) or the last failure (``status='failed'`` with the error and, when the server
answered, its raw response). Each row is committed the moment its call finishes, so a crash
loses at most the calls in flight. A failure never overwrites a label; a later success
replaces a failure. API keys never reach this file: every text field is redacted before writing.

The same database holds the batch tables (``batches``, ``batch_items``: every provider batch's
id, custom ids and state, committed before anything waits on it) and the spend ledger (:mod:`spd_host.autointerp.ledger`): the cost cap is
the store's, across resumes, and a run holds ``labels.db.lock`` so two runs never share it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from spd_host.autointerp.batch.table import BatchTable
from spd_host.autointerp.ledger import SpendLedger, now_iso
from spd_host.locking import RunLock
from spd_host.paths import results_dir

SCHEMA_VERSION = 2
"""1: labels, meta, spend ledger. 2: + the batch tables (:mod:`spd_host.autointerp.batch.table`),
added in place to a version-1 store (new tables only; nothing existing changes)."""

_DDL = """
CREATE TABLE IF NOT EXISTS labels (
    harvest_id       TEXT NOT NULL,
    component_key    TEXT NOT NULL,
    strategy         TEXT NOT NULL,
    model            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    decomposition_id TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    is_baseline      INTEGER NOT NULL,
    label            TEXT,
    confidence       TEXT,
    reasoning        TEXT,
    raw_response     TEXT,
    system_prompt    TEXT NOT NULL,
    prompt           TEXT NOT NULL,
    error            TEXT,
    cost_usd         REAL NOT NULL,
    input_tokens     INTEGER NOT NULL,
    output_tokens    INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    started_at       TEXT NOT NULL,
    finished_at      TEXT NOT NULL,
    PRIMARY KEY (harvest_id, component_key, strategy, model)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "harvest_id", "component_key", "strategy", "model", "provider", "decomposition_id",
    "status", "is_baseline", "label", "confidence", "reasoning", "raw_response",
    "system_prompt", "prompt", "error", "cost_usd", "input_tokens", "output_tokens",
    "attempts", "started_at", "finished_at",
)  # fmt: skip


class LabelRecord(BaseModel):
    """One stored row."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    harvest_id: str
    component_key: str
    strategy: str
    model: str
    provider: str
    decomposition_id: str
    status: Literal["ok", "failed"]
    is_baseline: bool
    label: str | None
    confidence: str | None
    reasoning: str | None
    raw_response: str | None
    system_prompt: str
    prompt: str
    error: str | None
    cost_usd: float
    input_tokens: int
    output_tokens: int
    attempts: int
    started_at: str
    finished_at: str


__all__ = ["LabelRecord", "LabelStore", "default_db_path", "now_iso"]


def default_db_path(storage_key: str) -> Path:
    return results_dir(storage_key) / "autointerp" / "labels.db"


class LabelStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_DDL)
        self._conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        self._conn.execute(
            "UPDATE meta SET value=? WHERE key='schema_version' AND CAST(value AS INTEGER) < ?",
            (str(SCHEMA_VERSION), SCHEMA_VERSION),
        )
        self.ledger = SpendLedger(self._conn)
        self.batches = BatchTable(self._conn)
        (before,) = self._conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM labels").fetchone()
        self.ledger.carry_in(float(before), "labels written before the spend ledger existed")

    def run_lock(self, what: str) -> RunLock:
        """The lock a labelling run holds on this store (``labels.db.lock`` next to it)."""
        return RunLock(self.path.with_name(self.path.name + ".lock"), what)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def labelled_keys(self, harvest_id: str, strategy: str, model: str) -> set[str]:
        rows = self._conn.execute(
            "SELECT component_key FROM labels WHERE harvest_id=? AND strategy=? AND model=? AND status='ok'",
            (harvest_id, strategy, model),
        )
        return {r[0] for r in rows}

    def write(self, record: LabelRecord, *, replace: bool = False) -> None:
        """Commit one row now. A failure never replaces an existing label; a new label
        replaces one only with ``replace`` (``--force``)."""
        values = [getattr(record, c) for c in _COLUMNS]
        values[_COLUMNS.index("is_baseline")] = int(record.is_baseline)
        updates = ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS[4:])
        self._conn.execute(
            f"INSERT INTO labels ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            f"ON CONFLICT(harvest_id, component_key, strategy, model) DO UPDATE SET {updates}, "
            "attempts = labels.attempts + excluded.attempts, cost_usd = labels.cost_usd + excluded.cost_usd "
            + ("" if replace and record.status == "ok" else "WHERE labels.status != 'ok'"),
            values,
        )

    def records(
        self,
        *,
        component_key: str | None = None,
        harvest_id: str | None = None,
        strategy: str | None = None,
        model: str | None = None,
        status: str | None = None,
    ) -> list[LabelRecord]:
        where, args = [], []
        for col, val in (
            ("component_key", component_key),
            ("harvest_id", harvest_id),
            ("strategy", strategy),
            ("model", model),
            ("status", status),
        ):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM labels"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY finished_at DESC"
        return [_row(r) for r in self._conn.execute(sql, args)]


def _row(values: Iterable[object]) -> LabelRecord:
    data = dict(zip(_COLUMNS, values, strict=True))
    data["is_baseline"] = bool(data["is_baseline"])
    return LabelRecord.model_validate(data)
