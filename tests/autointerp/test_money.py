"""The cost cap as a promise about money: checked against billed spend, per label store across
resumes, with calls in flight reserved at their worst case and killed runs' calls counted.

Every expected figure is worked from the prices the test sets and the usage the local server
bills, independently of the runner's own arithmetic.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import make_many
from helpers import rows, run
from llm_server import LLMServer, Reply, Request

from spd_host.autointerp.answer import ANSWER_SCHEMA
from spd_host.autointerp.store import LabelStore

SCHEMA_BYTES = len(json.dumps(ANSWER_SCHEMA).encode())


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def _prompt_bytes(req: Request) -> int:
    """Bytes of what the runner prompts with (system + user), as the server received them."""
    return len(req.system.encode()) + len(req.user.encode())


# $1 per thousand input tokens, outputs free: spend is the billed input tokens / 1000.
INPUT_PRICED = {"input_price_per_mtok": 1000.0, "output_price_per_mtok": 0.0}


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_tokenizer_denser_than_the_average_cannot_overrun_the_cap(
    tmp_path: Path, concurrency: int
) -> None:
    """The server bills one token per prompt byte (the densest a byte-level tokenizer can be)
    and every output at max length; the old 3-bytes-per-token estimate under-reserved 3x."""
    billed: list[int] = []

    def plan(req: Request) -> Reply:
        n = _prompt_bytes(req)
        billed.append(n)
        return Reply(input_tokens=n, output_tokens=100)

    with LLMServer(plan=plan, latency=0.05) as server:
        probe = run(server, "anthropic", make_many(1), tmp_path / "probe.db", **INPUT_PRICED)
        billed.clear()
        # five and a half calls' bills: the old estimate (a third of a bill) let a sixth go out
        cap = 5.5 * probe.spent_usd
        report = run(
            server, "anthropic", make_many(40), tmp_path / "l.db",
            max_concurrent=concurrency, cost_cap_usd=cap, max_output_tokens=100, **INPUT_PRICED,
        )  # fmt: skip
    spent = sum(billed) / 1000
    assert report.spent_usd == pytest.approx(spent)
    assert spent <= cap  # the promise
    # and it is not kept by refusing to work: it stops only when one more worst case won't fit
    worst = (max(billed) + SCHEMA_BYTES + 64) / 1000
    assert spent + (concurrency + 1) * worst > cap
    assert report.stopped_by_cost_cap and report.n_not_sent == 40 - len(billed)


def test_over_reported_usage_scales_later_reservations(tmp_path: Path) -> None:
    """A server billing 3x any possible prompt size: the first call overshoots its
    reservation, every later reservation is scaled by that ratio, the total stays capped."""
    billed: list[int] = []

    def plan(req: Request) -> Reply:
        n = 3 * (_prompt_bytes(req) + SCHEMA_BYTES + 64)
        billed.append(n)
        return Reply(input_tokens=n, output_tokens=0)

    with LLMServer(plan=plan) as server:
        probe = run(server, "anthropic", make_many(1), tmp_path / "probe.db", **INPUT_PRICED)
        one_call = probe.spent_usd
        billed.clear()
        cap = 10.5 * one_call
        report = run(
            server, "anthropic", make_many(40), tmp_path / "l.db",
            max_concurrent=1, cost_cap_usd=cap, **INPUT_PRICED,
        )  # fmt: skip
    assert sum(billed) / 1000 == pytest.approx(report.spent_usd)
    assert report.spent_usd <= cap
    # the first call's reservation was a third of its bill; from then on each reservation is
    # a full bill, so k calls go out while k bills fit: 10 bills <= 10.5 bills < 11
    assert len(billed) == 10


PRICES = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 1e6, "max_output_tokens": 100}


def test_the_cap_is_the_stores_across_resumes_and_raising_it_is_explicit(tmp_path: Path) -> None:
    """Worst case $100 per call, billed $40 (see test_cost_cap). The cap is the store's total."""
    db = tmp_path / "labels.db"
    with LLMServer() as server:
        first = run(
            server, "anthropic", make_many(20), db, max_concurrent=1, cost_cap_usd=350, **PRICES
        )
        again = run(
            server, "anthropic", make_many(20), db, max_concurrent=1, cost_cap_usd=350, **PRICES
        )
        third = run(
            server, "anthropic", make_many(20), db, max_concurrent=1, cost_cap_usd=350, **PRICES
        )
        raised = run(
            server, "anthropic", make_many(20), db, max_concurrent=1, cost_cap_usd=700, **PRICES
        )
    assert first.calls == 7 and first.spent_usd == pytest.approx(280)  # 40 * 6 + 100 <= 350
    # resumes at the same cap spend nothing more: 280 + 100 > 350
    assert (again.calls, third.calls) == (0, 0) and again.stopped_by_cost_cap
    assert again.store_spent_usd == pytest.approx(280)
    # raising it to 700: 280 + 40 (k - 1) + 100 <= 700  =>  k <= 9
    assert raised.calls == 9 and raised.store_spent_usd == pytest.approx(280 + 360)
    assert len(server.requests) == 16 and len(rows(db)) == 16


def test_spend_of_an_older_store_without_a_ledger_counts(tmp_path: Path) -> None:
    db = tmp_path / "labels.db"
    with LLMServer() as server:
        run(server, "anthropic", make_many(2), db, max_concurrent=1, **PRICES)  # $80
    con = sqlite3.connect(db)
    con.execute("DROP TABLE spend")  # what a store written before the ledger looks like
    con.commit()
    con.close()
    with LLMServer() as server:
        report = run(
            server, "anthropic", make_many(5), db, max_concurrent=1, cost_cap_usd=200, **PRICES
        )
    # 80 + 100 <= 200 sends one; 120 + 100 > 200 stops
    assert report.calls == 1 and report.store_spent_usd == pytest.approx(120)


def _in_flight(db: Path) -> list[float]:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return [
                r[0] for r in con.execute("SELECT reserved_usd FROM spend WHERE state='in_flight'")
            ]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []


@pytest.mark.slow
def test_killed_runs_in_flight_calls_are_counted_and_a_second_run_is_refused(
    tmp_path: Path,
) -> None:
    from spd_host.locking import BusyError

    db = tmp_path / "labels.db"
    worker = Path(__file__).with_name("kill_worker.py")
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}",
        "OPENAI_API_KEY": "sk-test",
    }
    with LLMServer(latency=30.0) as server:  # nothing returns while we look
        proc = subprocess.Popen(
            [sys.executable, str(worker), server.openai_url, str(db), "20"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while len(_in_flight(db)) < 8:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the worker never had 8 calls in flight"
                time.sleep(0.05)
            # a second run on the same store is refused, naming the holder
            with pytest.raises(BusyError, match=f"another autointerp run .* \\(pid {proc.pid}\\)"):
                run(server, "openai", make_many(20), db)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        orphans = _in_flight(db)
        assert len(orphans) == 8
    server2_plan = None  # a fresh server answers at once
    with LLMServer(plan=server2_plan) as server:
        report = run(server, "openai", make_many(20), db, max_concurrent=4)
    assert report.orphaned_usd == pytest.approx(sum(orphans))
    assert report.store_spent_usd == pytest.approx(sum(orphans) + report.spent_usd)
    with LabelStore(db) as store:
        assert store.ledger.total() == pytest.approx(report.store_spent_usd)
