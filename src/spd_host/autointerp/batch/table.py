"""The batch table: every batch's id, provider, custom ids and state, in SQLite.

Why it is written before anything waits: a batch outlives the process that submitted it. The
row (state ``submitting``, with every custom id and the item it stands for) is committed
*before* the create call and the provider's batch id right after it, so a killed process
resumes by polling what was accepted and never submits it again. A ``submitting`` row without
an id is resolved by asking the provider (:meth:`BatchClient.find`): adopted if the batch
exists, ``abandoned`` (its items go out again) if it does not.

States: ``submitting`` -> ``submitted`` -> ``ended`` -> ``collected``; ``abandoned`` (never
accepted) and ``failed`` (the create call was refused) end a batch without results. A cancel
is not a state but a mark, ``cancel_requested_at``, written *before* the cancel call: a process
killed mid-cancel leaves the mark, and the next command of the scope sends the cancel again
(or, if the provider has ended the batch meanwhile, just collects it). An item
is ``done`` once its result (label, trial or failure row) is written; a batch collected twice
(killed mid-collection) skips its done items.

The table lives in the label store's database (autointerp) or an eval suite's spend database
(the LLM judges), beside the spend ledger whose row holds the batch's reservation.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from spd_host.autointerp.batch.base import BatchCounts
from spd_host.autointerp.ledger import now_iso

BATCH_DDL = """
CREATE TABLE IF NOT EXISTS batches (
    local_id          TEXT PRIMARY KEY,
    scope             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    provider_batch_id TEXT,
    state             TEXT NOT NULL CHECK (state IN
                        ('submitting', 'submitted', 'ended', 'collected', 'abandoned', 'failed')),
    provider_status   TEXT,
    n_requests        INTEGER NOT NULL,
    reserved_usd      REAL NOT NULL,
    spend_id          INTEGER,
    processing        INTEGER NOT NULL DEFAULT 0,
    succeeded         INTEGER NOT NULL DEFAULT 0,
    errored           INTEGER NOT NULL DEFAULT 0,
    expired           INTEGER NOT NULL DEFAULT 0,
    canceled          INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    created_at        TEXT NOT NULL,
    submitted_at      TEXT,
    ended_at          TEXT,
    collected_at      TEXT,
    cancel_requested_at TEXT
);
CREATE TABLE IF NOT EXISTS batch_items (
    local_id  TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    item      TEXT NOT NULL,
    worst_usd REAL NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    outcome   TEXT,
    cost_usd  REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (local_id, custom_id)
);
CREATE INDEX IF NOT EXISTS batch_items_item ON batch_items (item);
"""

OPEN_STATES = ("submitting", "submitted", "ended")


# columns added after the table first shipped: (name, declaration), added in place if missing
_ADDED_COLUMNS = (("cancel_requested_at", "TEXT"),)


@dataclass(frozen=True)
class BatchRow:
    local_id: str
    scope: str
    provider: str
    model: str
    provider_batch_id: str | None
    state: str
    n_requests: int
    reserved_usd: float
    spend_id: int | None
    created_at: str
    cancel_requested_at: str | None = None


_INSERTED = (
    "local_id, scope, provider, model, provider_batch_id, state, n_requests, reserved_usd, "
    "spend_id, created_at"
)
_ROW = _INSERTED + ", cancel_requested_at"


@dataclass(frozen=True)
class OpenBatch:
    """An open batch as the user is shown it (``--list-batches``): where it stands, what it
    holds, and what it still has reserved against the cap."""

    local_id: str
    scope: str
    provider: str
    model: str
    provider_batch_id: str | None
    state: str
    provider_status: str | None
    created_at: str
    n_requests: int
    pending: int
    processing: int
    succeeded: int
    errored: int
    expired: int
    canceled: int
    reserved_usd: float
    cancel_requested_at: str | None


class BatchTable:
    """The batch rows of one database (autocommit connection, shared with its owner)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.executescript(BATCH_DDL)
        have = {r[1] for r in conn.execute("PRAGMA table_info(batches)")}
        for name, decl in _ADDED_COLUMNS:
            if name not in have:  # a store from before the column: gains it, nothing else changes
                conn.execute(f"ALTER TABLE batches ADD COLUMN {name} {decl}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes (results and their done marks) so a kill leaves all or none."""
        self._conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def open_batches(self, scope: str) -> list[BatchRow]:
        marks = ", ".join("?" * len(OPEN_STATES))
        rows = self._conn.execute(
            f"SELECT {_ROW} FROM batches WHERE scope=? AND state IN ({marks}) ORDER BY created_at",
            (scope, *OPEN_STATES),
        )
        return [BatchRow(*r) for r in rows]

    def all_batches(self, scope: str | None = None) -> list[BatchRow]:
        sql = f"SELECT {_ROW} FROM batches"
        args: tuple[str, ...] = ()
        if scope is not None:
            sql, args = sql + " WHERE scope=?", (scope,)
        return [BatchRow(*r) for r in self._conn.execute(sql + " ORDER BY created_at", args)]

    def known_ids(self, provider: str) -> set[str]:
        rows = self._conn.execute(
            "SELECT provider_batch_id FROM batches WHERE provider=? AND provider_batch_id IS NOT NULL",
            (provider,),
        )
        return {r[0] for r in rows}

    def insert_submitting(
        self,
        row: BatchRow,
        items: Sequence[tuple[str, str, float]],
    ) -> None:
        """The batch and its ``(custom_id, item, worst_usd)`` items, in one transaction,
        before the create call."""
        with self.transaction():
            self._conn.execute(
                f"INSERT INTO batches ({_INSERTED}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.local_id,
                    row.scope,
                    row.provider,
                    row.model,
                    row.provider_batch_id,
                    row.state,
                    row.n_requests,
                    row.reserved_usd,
                    row.spend_id,
                    row.created_at,
                ),
            )
            self._conn.executemany(
                "INSERT INTO batch_items (local_id, custom_id, item, worst_usd, state) "
                "VALUES (?, ?, ?, ?, 'pending')",
                [(row.local_id, c, k, w) for c, k, w in items],
            )

    def set_submitted(self, local_id: str, provider_batch_id: str) -> None:
        self._conn.execute(
            "UPDATE batches SET provider_batch_id=?, state='submitted', submitted_at=? "
            "WHERE local_id=?",
            (provider_batch_id, now_iso(), local_id),
        )

    def set_status(
        self, local_id: str, provider_status: str, counts: BatchCounts, ended: bool
    ) -> None:
        self._conn.execute(
            "UPDATE batches SET provider_status=?, processing=?, succeeded=?, errored=?, "
            "expired=?, canceled=?, state=CASE WHEN ? THEN 'ended' ELSE state END, "
            "ended_at=CASE WHEN ? AND ended_at IS NULL THEN ? ELSE ended_at END WHERE local_id=?",
            (
                provider_status,
                counts.processing,
                counts.succeeded,
                counts.errored,
                counts.expired,
                counts.canceled,
                ended,
                ended,
                now_iso(),
                local_id,
            ),
        )

    def close(self, local_id: str, state: str, error: str | None = None) -> None:
        """End a batch: ``collected``, ``abandoned`` or ``failed``."""
        self._conn.execute(
            "UPDATE batches SET state=?, error=COALESCE(?, error), collected_at=? WHERE local_id=?",
            (state, error, now_iso(), local_id),
        )

    def items(self, local_id: str, *, pending_only: bool = False) -> dict[str, str]:
        """``custom_id -> item`` of a batch."""
        sql = "SELECT custom_id, item FROM batch_items WHERE local_id=?"
        if pending_only:
            sql += " AND state='pending'"
        return dict(self._conn.execute(sql, (local_id,)).fetchall())

    def mark_done(self, local_id: str, custom_id: str, outcome: str, cost_usd: float) -> None:
        self._conn.execute(
            "UPDATE batch_items SET state='done', outcome=?, cost_usd=? "
            "WHERE local_id=? AND custom_id=?",
            (outcome, cost_usd, local_id, custom_id),
        )

    def request_cancel(self, local_id: str) -> None:
        """Mark a batch to be cancelled (kept if already marked): written before the call."""
        self._conn.execute(
            "UPDATE batches SET cancel_requested_at=COALESCE(cancel_requested_at, ?) "
            "WHERE local_id=?",
            (now_iso(), local_id),
        )

    def open_listing(self, scopes: Sequence[str] | None = None) -> list[OpenBatch]:
        """Every open batch (of ``scopes``, or of the whole database), oldest first."""
        marks = ", ".join("?" * len(OPEN_STATES))
        sql = (
            "SELECT b.local_id, b.scope, b.provider, b.model, b.provider_batch_id, b.state, "
            "b.provider_status, b.created_at, b.n_requests, "
            "(SELECT COUNT(*) FROM batch_items i WHERE i.local_id=b.local_id AND i.state='pending'), "
            "b.processing, b.succeeded, b.errored, b.expired, b.canceled, b.reserved_usd, "
            f"b.cancel_requested_at FROM batches b WHERE b.state IN ({marks})"
        )
        args: list[str] = list(OPEN_STATES)
        if scopes is not None:
            if not scopes:
                return []
            sql += f" AND b.scope IN ({', '.join('?' * len(scopes))})"
            args += list(scopes)
        return [OpenBatch(*r) for r in self._conn.execute(sql + " ORDER BY b.created_at", args)]

    def open_scopes(self, prefix: str) -> list[str]:
        """Scopes starting with ``prefix`` that have an open batch."""
        marks = ", ".join("?" * len(OPEN_STATES))
        rows = self._conn.execute(
            f"SELECT DISTINCT scope FROM batches WHERE state IN ({marks}) AND substr(scope, 1, ?)=?",
            (*OPEN_STATES, len(prefix), prefix),
        )
        return sorted(str(r[0]) for r in rows)

    def held_items(self, scopes: Sequence[str]) -> dict[str, str]:
        """``item -> local id`` of every item still pending in an open batch of ``scopes``:
        what a synchronous run must not send (it is in flight, and will be billed)."""
        if not scopes:
            return {}
        marks = ", ".join("?" * len(OPEN_STATES))
        rows = self._conn.execute(
            "SELECT i.item, i.local_id FROM batch_items i JOIN batches b ON b.local_id=i.local_id "
            f"WHERE i.state='pending' AND b.state IN ({marks}) "
            f"AND b.scope IN ({', '.join('?' * len(scopes))})",
            (*OPEN_STATES, *scopes),
        )
        return {str(k): str(b) for k, b in rows}

    def dangling_spend(self) -> list[int]:
        """Spend-ledger rows of batches that never got a batch row (a kill between the
        reservation and the ``submitting`` row: no create call was made, nothing billed)."""
        rows = self._conn.execute(
            "SELECT id FROM spend WHERE state='in_flight' AND item LIKE 'batch:%' "
            "AND substr(item, 7) NOT IN (SELECT local_id FROM batches)"
        )
        return [int(r[0]) for r in rows]

    def billed(self, local_id: str) -> float:
        (v,) = self._conn.execute(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM batch_items WHERE local_id=?", (local_id,)
        ).fetchone()
        return float(v)

    def outcome_counts(self, local_id: str) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT outcome, COUNT(*) FROM batch_items WHERE local_id=? AND state='done' "
            "GROUP BY outcome",
            (local_id,),
        )
        return {str(o): int(n) for o, n in rows}
