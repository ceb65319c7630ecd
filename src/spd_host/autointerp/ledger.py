"""The spend ledger: every paid call, recorded before it is sent and settled when it returns.

Why a ledger and not a running total in memory: the cost cap is a promise about money, and
money is spent by calls, not by runs. A call is written here at its worst-case cost *before*
it is sent, and its row is replaced by the billed cost when the answer arrives. So

- the cap holds across resumes: a new run starts from everything this store ever spent;
- a run killed with calls in flight leaves those rows open; the next run (holding the store's
  lock, so no other run can own them) closes them at their worst case, which is what may have
  been billed;
- the total is one ``SUM`` over a table, the same for every reader.

The ledger lives in an SQLite database (the label store's own, or an eval suite's).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS spend (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        TEXT NOT NULL,
    item          TEXT NOT NULL,
    reserved_usd  REAL NOT NULL,
    actual_usd    REAL,
    state         TEXT NOT NULL CHECK (state IN ('in_flight', 'settled', 'orphaned')),
    started_at    TEXT NOT NULL,
    finished_at   TEXT
);
"""


class SpendLedger:
    """Per-call spend rows on an open SQLite connection (autocommit)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        conn.executescript(LEDGER_DDL)

    def carry_in(self, amount_usd: float, what: str) -> None:
        """Record spend made before the ledger existed (an older store), once."""
        (n,) = self._conn.execute("SELECT COUNT(*) FROM spend").fetchone()
        if n == 0 and amount_usd > 0:
            self._conn.execute(
                "INSERT INTO spend (run_id, item, reserved_usd, actual_usd, state, started_at, "
                "finished_at) VALUES ('before-ledger', ?, ?, ?, 'settled', ?, ?)",
                (what, amount_usd, amount_usd, now_iso(), now_iso()),
            )

    @property
    def connection(self) -> sqlite3.Connection:
        """The database the ledger lives in (the batch table shares it)."""
        return self._conn

    def close_orphans(self) -> int:
        """Calls left in flight by a dead run count at their worst case. Call with the lock held.

        Batches (items ``batch:<id>``) are not orphaned: a provider batch outlives the process
        that submitted it, and the next run polls it and settles its row with the billed cost
        (until then it counts at its worst case, as every in-flight row does)."""
        cur = self._conn.execute(
            "UPDATE spend SET state='orphaned', finished_at=? "
            "WHERE state='in_flight' AND item NOT LIKE 'batch:%'",
            (now_iso(),),
        )
        return int(cur.rowcount)

    def begin(self, run_id: str, item: str, reserved_usd: float) -> int:
        cur = self._conn.execute(
            "INSERT INTO spend (run_id, item, reserved_usd, state, started_at) "
            "VALUES (?, ?, ?, 'in_flight', ?)",
            (run_id, item, reserved_usd, now_iso()),
        )
        return int(cur.lastrowid or 0)

    def settle(self, call_id: int, actual_usd: float) -> None:
        self._conn.execute(
            "UPDATE spend SET actual_usd=?, state='settled', finished_at=? WHERE id=?",
            (actual_usd, now_iso(), call_id),
        )

    def total(self) -> float:
        """Everything spent: billed calls, plus open or orphaned calls at their worst case."""
        (value,) = self._conn.execute(
            "SELECT COALESCE(SUM(CASE WHEN state='settled' THEN actual_usd ELSE reserved_usd END), 0) "
            "FROM spend"
        ).fetchone()
        return float(value)

    def total_orphaned(self) -> float:
        (value,) = self._conn.execute(
            "SELECT COALESCE(SUM(reserved_usd), 0) FROM spend WHERE state='orphaned'"
        ).fetchone()
        return float(value)


def open_ledger(path: str) -> tuple[sqlite3.Connection, SpendLedger]:
    """A ledger in its own database file (eval suites)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn, SpendLedger(conn)
