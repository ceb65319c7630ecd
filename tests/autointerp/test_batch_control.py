"""Batch control: cancelling open batches, and synchronous runs that never send (nor bill) a
component an open batch holds. Through the real ``anthropic`` / ``openai`` SDKs against the
loopback batch server; every spend is worked by hand from pricing.yaml's list prices (batch
price: half of them) and the server's per-component token counts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from batch_server import BatchPlan, BatchServer, interrupt_once_submitted
from factories import make_many
from helpers import FAST, LIST, MODELS, PROVIDERS, rows, run
from llm_server import Reply, Request

from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.runner import alabel_components
from spd_host.autointerp.store import LabelStore

pytestmark = pytest.mark.usefixtures("fake_batch_keys")


def _answers(req: Request) -> Reply:
    n = int((req.marker or "MARK0")[4:])
    return Reply(
        answer={"label": f"L{n}", "confidence": "high", "reasoning": "r"},
        input_tokens=100 + n,
        output_tokens=30 + n,
    )


def _cost(provider: str, n: int, *, batch: bool) -> float:
    """What component ``n``'s answer bills: (100 + n) in, (30 + n) out."""
    p_in, p_out = LIST[provider]
    return (0.5 if batch else 1.0) * ((100 + n) * p_in + (30 + n) * p_out) / 1e6


def _url(server: BatchServer, provider: str) -> str:
    return server.anthropic_url if provider == "anthropic" else server.openai_url


def _interrupted_batch_run(
    server: BatchServer, provider: str, n: int, db: Path, n_batches: int, **extra: Any
) -> None:
    """A ``--batch`` run over components 0..n-1 interrupted (as by Ctrl-C) once ``n_batches``
    batches are submitted: they stay open, recorded in the store."""
    config = AutointerpConfig(
        provider=provider, model=MODELS[provider], base_url=_url(server, provider),
        backoff_base_s=0.01, **{**FAST, **extra},
    )  # fmt: skip
    by_key = {e.component_key: e for e in make_many(n)}

    async def go() -> None:
        with LabelStore(db) as store:
            task = asyncio.create_task(
                alabel_components(
                    list(by_key), by_key.__getitem__, config, store=store, harvest_id="h1",
                    decomposition_id="t:demo", seed=0,
                )
            )  # fmt: skip
            while sum(b.state == "submitted" for b in store.batches.all_batches()) < n_batches:
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(go())


def _in_flight(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM spend WHERE state='in_flight'").fetchone()
    return int(n)


def _labels(db: Path) -> dict[str, tuple[str, str | None]]:
    return {r.component_key.split(":")[1]: (r.status, r.label) for r in rows(db)}


def _sync_markers(server: BatchServer, since: int) -> list[str]:
    """Markers of the synchronous requests (those not inside a batch) after ``since``."""
    in_batches = {req.index for b in server.batches.values() for _, req, _ in b.items}
    return sorted(r.marker or "" for r in server.requests[since:] if r.index not in in_batches)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cancel_stores_what_finished_and_bills_only_that(provider: str, tmp_path: Path) -> None:
    """5 components in one batch; 2 had finished when the cancel arrived. Stored: labels L0,
    L1 at the batch price, failure rows for 2..4 (cancelled, $0); the reservation is settled
    at exactly the billed sum; a later run sends 2..4 again and nothing else."""
    db = tmp_path / "l.db"
    plan = BatchPlan(delay=60, done_by_cancel=2)
    with BatchServer(plan=_answers, batch_plan=lambda n: plan) as server:
        _interrupted_batch_run(server, provider, 5, db, 1)
        with LabelStore(db) as store:
            (open_row,) = store.batches.open_listing()
        assert (open_row.n_requests, open_row.pending, open_row.reserved_usd > 0) == (5, 5, True)
        report = run(server, provider, make_many(5), db, cancel_batches=True, **FAST)
        assert server.cancels == [open_row.provider_batch_id]
        assert len(server.creates) == 1  # a cancel submits nothing
        billed = _cost(provider, 0, batch=True) + _cost(provider, 1, batch=True)
        assert (report.batches_canceled, report.batches_collected) == (1, 1)
        assert (report.n_labelled, report.n_failed, report.calls) == (2, 3, 0)
        assert report.batch_outcomes == {"succeeded": 2, "canceled": 3}
        assert report.spent_usd == pytest.approx(billed)
        assert report.store_spent_usd == pytest.approx(billed)  # worst case replaced
        assert _in_flight(db) == 0 and report.open_batches == []
        by_key = {r.component_key.split(":")[1]: r for r in rows(db)}
        assert {k: (r.status, r.label) for k, r in by_key.items()} == {
            "0": ("ok", "L0"), "1": ("ok", "L1"),
            "2": ("failed", None), "3": ("failed", None), "4": ("failed", None),
        }  # fmt: skip
        assert all("cancel" in (by_key[k].error or "") and by_key[k].cost_usd == 0 for k in "234")
        assert by_key["1"].cost_usd == pytest.approx(_cost(provider, 1, batch=True))
        with LabelStore(db) as store:
            (b,) = store.batches.all_batches()
            assert b.state == "collected" and b.cancel_requested_at is not None
        # the cancelled ones are retried by a later (synchronous) run, and only they
        since = len(server.requests)
        again = run(server, provider, make_many(5), db)
        assert _sync_markers(server, since) == ["MARK2", "MARK3", "MARK4"]
    assert (again.n_already_labelled, again.n_labelled, again.n_in_open_batches) == (2, 3, 0)
    sync = sum(_cost(provider, n, batch=False) for n in (2, 3, 4))
    assert again.spent_usd == pytest.approx(sync)
    assert again.store_spent_usd == pytest.approx(billed + sync)
    assert all(status == "ok" for status, _ in _labels(db).values())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_sync_run_collects_ended_batches_and_skips_the_running_ones(
    provider: str, tmp_path: Path
) -> None:
    """Batches of 3: batch 0 (components 0-2) ends after 0.3 s, batch 1 (3-5) runs on. A
    synchronous run over all 6 collects batch 0 (labels at the batch price), sends nothing
    for 3-5 and says so; after a cancel (component 3 had finished) a synchronous run sends
    only 4 and 5. Every component is billed exactly once."""
    db = tmp_path / "l.db"
    plans = {0: BatchPlan(delay=0.3), 1: BatchPlan(delay=60, done_by_cancel=1)}
    with BatchServer(plan=_answers, batch_plan=lambda n: plans[n]) as server:
        _interrupted_batch_run(server, provider, 6, db, 2, batch_max_requests=3)
        time.sleep(0.35)  # batch 0 has ended at the provider, not yet collected
        since = len(server.requests)
        sync = run(server, provider, make_many(6), db)
        assert _sync_markers(server, since) == []  # nothing sent: 0-2 collected, 3-5 held
        first_batch = sum(_cost(provider, n, batch=True) for n in (0, 1, 2))
        assert (sync.n_labelled, sync.n_in_open_batches, sync.calls) == (3, 3, 0)
        assert (sync.batches_collected, sync.n_already_labelled) == (1, 0)
        assert sync.spent_usd == pytest.approx(first_batch)
        assert len(sync.open_batches) == 1 and server.creates[1] in sync.open_batches[0]
        # a second synchronous run: the batch still runs, the same 3 are held
        again = run(server, provider, make_many(6), db)
        assert (again.n_labelled, again.n_in_open_batches, again.calls) == (0, 3, 0)
        cancel = run(server, provider, make_many(6), db, cancel_batches=True, **FAST)
        assert (cancel.n_labelled, cancel.n_failed, cancel.batches_canceled) == (1, 2, 1)
        since = len(server.requests)
        last = run(server, provider, make_many(6), db)
        assert _sync_markers(server, since) == ["MARK4", "MARK5"]
    assert (last.n_labelled, last.n_in_open_batches) == (2, 0)
    assert _labels(db) == {str(n): ("ok", f"L{n}") for n in range(6)}
    want = sum(_cost(provider, n, batch=True) for n in range(4)) + sum(
        _cost(provider, n, batch=False) for n in (4, 5)
    )
    assert last.store_spent_usd == pytest.approx(want) and _in_flight(db) == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_batch_run_never_resubmits_a_labelled_component(provider: str, tmp_path: Path) -> None:
    """Components 0 and 1 labelled synchronously, 2 failed: a --batch run over 0..4 puts 2, 3
    and 4 in its batch (a failure is retried, a label never)."""
    db = tmp_path / "l.db"

    def plan(req: Request) -> Reply:
        return Reply(status=400) if req.marker == "MARK2" else _answers(req)

    with BatchServer(plan=plan) as server:
        first = run(server, provider, make_many(3), db, max_attempts=1)
        assert (first.n_labelled, first.n_failed) == (2, 1)
    with BatchServer(plan=_answers) as server:
        batch = run(server, provider, make_many(5), db, **FAST)
        (bid,) = server.creates
        assert sorted(req.marker or "" for _, req, _ in server.batches[bid].items) == [
            "MARK2", "MARK3", "MARK4",
        ]  # fmt: skip
    assert (batch.n_already_labelled, batch.n_labelled, batch.calls) == (2, 3, 3)
    assert batch.spent_usd == pytest.approx(sum(_cost(provider, n, batch=True) for n in (2, 3, 4)))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cancelling_a_batch_that_already_ended_just_collects_it(
    provider: str, tmp_path: Path
) -> None:
    db = tmp_path / "l.db"
    with BatchServer(plan=_answers, batch_plan=lambda n: BatchPlan(delay=0.2)) as server:
        _interrupted_batch_run(server, provider, 3, db, 1)
        time.sleep(0.25)
        report = run(server, provider, make_many(3), db, cancel_batches=True, **FAST)
        assert server.cancels == []  # the poll saw it ended: no cancel call
    assert (report.batches_canceled, report.batches_collected, report.n_labelled) == (0, 1, 3)
    assert report.spent_usd == pytest.approx(sum(_cost(provider, n, batch=True) for n in range(3)))
    assert _in_flight(db) == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cancel_refused_because_the_batch_just_ended_collects_it(
    provider: str, tmp_path: Path
) -> None:
    """The poll saw the batch running; by the time the cancel arrived it had ended, and the
    provider refused the cancel (Anthropic 409, OpenAI 400). Not an error: it is collected,
    every answer stored and billed, and no cancel is counted."""
    db = tmp_path / "l.db"
    plan = BatchPlan(delay=60, ends_before_cancel=True)
    with BatchServer(plan=_answers, batch_plan=lambda n: plan) as server:
        _interrupted_batch_run(server, provider, 3, db, 1)
        report = run(server, provider, make_many(3), db, cancel_batches=True, **FAST)
        assert server.cancels == [] and ("POST", f"/v1/{_path(provider)}/cancel") in {
            (m, p.replace(server.creates[0] + "/", "")) for m, p in server.calls
        }
    assert report.stopped_by_error is None
    assert (report.batches_canceled, report.batches_collected, report.n_labelled) == (0, 1, 3)
    assert report.spent_usd == pytest.approx(sum(_cost(provider, n, batch=True) for n in range(3)))
    assert _in_flight(db) == 0


def _path(provider: str) -> str:
    return "messages/batches" if provider == "anthropic" else "batches"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cancel_marked_but_never_sent_is_sent_by_the_next_command(
    provider: str, tmp_path: Path
) -> None:
    """The state a kill between the cancel mark and the cancel call leaves: the next command
    of the scope (here a synchronous run) sends the cancel; the batch is then collected."""
    db = tmp_path / "l.db"
    plan = BatchPlan(delay=60, done_by_cancel=1)
    with BatchServer(plan=_answers, batch_plan=lambda n: plan) as server:
        _interrupted_batch_run(server, provider, 3, db, 1)
        with LabelStore(db) as store:
            (row,) = store.batches.open_batches(store.batches.all_batches()[0].scope)
            store.batches.request_cancel(row.local_id)
        assert server.cancels == []
        sync = run(server, provider, make_many(3), db)
        assert server.cancels == [row.provider_batch_id]
        assert (sync.n_in_open_batches, sync.calls, sync.n_labelled) == (3, 0, 0)
        time.sleep(0.15)  # canceling -> ended
        after = run(server, provider, make_many(3), db, **FAST)  # collects; sends nothing new
    assert (after.batches_resumed, after.batches_submitted) == (1, 0)
    assert (after.n_labelled, after.n_failed) == (1, 2) and server.cancels == [
        row.provider_batch_id
    ]
    assert after.spent_usd == pytest.approx(_cost(provider, 0, batch=True))
    assert _labels(db)["0"] == ("ok", "L0") and _in_flight(db) == 0


@pytest.mark.slow
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sigkill_mid_cancel_then_the_next_cancel_resumes_it(provider: str, tmp_path: Path) -> None:
    """A subprocess running --cancel-batches is SIGKILLed while the provider holds its cancel
    call open (the cancel was accepted). The next --cancel-batches finds the batch cancelling,
    makes no second cancel call, waits for its end and collects it: 2 labels billed, 2
    cancelled failure rows."""
    db = tmp_path / "l.db"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}"}
    plan = BatchPlan(delay=60, done_by_cancel=2, cancel_hold=30, cancel_delay=30)
    with BatchServer(plan=_answers, batch_plan=lambda n: plan) as server:
        _interrupted_batch_run(server, provider, 4, db, 1)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("batch_kill_worker.py")),
             provider, _url(server, provider), str(db), "4", "cancel"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not server.cancels:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker never cancelled"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with LabelStore(db) as store:
            (row,) = store.batches.open_listing()
        assert row.cancel_requested_at is not None and rows(db) == []
        plan.cancel_hold, plan.cancel_delay = 0.0, 2.0  # cancelling for 2 s after the call
        report = run(server, provider, make_many(4), db, cancel_batches=True, **FAST)
        assert len(server.cancels) == 1
        assert report.batches_canceled == 1  # the killed process's cancel, seen as cancelling
    assert (report.n_labelled, report.n_failed, report.batches_collected) == (2, 2, 1)
    billed = _cost(provider, 0, batch=True) + _cost(provider, 1, batch=True)
    assert report.store_spent_usd == pytest.approx(billed) and _in_flight(db) == 0


def test_cli_lists_cancels_and_a_sync_run_reports_what_batches_hold(toy_harvest: Any) -> None:
    """On a real toy harvest: an interrupted --batch run of 4 components leaves one open batch;
    --list-batches shows it (sending nothing); a synchronous run labels every other component,
    sends none of the 4 and says so; --cancel-batches (1 had finished) stores its label and 3
    failure rows; a synchronous run then labels exactly those 3."""
    import json as _json

    from typer.testing import CliRunner

    from spd_host.autointerp.api import labels_db_path, run_autointerp
    from spd_host.cli.app import app

    db = labels_db_path("toy:demo")
    runner = CliRunner()
    plan = BatchPlan(delay=60, done_by_cancel=1)
    with BatchServer(batch_plan=lambda n: plan) as server:
        config = AutointerpConfig(
            provider="openai", model=MODELS["openai"], base_url=server.openai_url, limit=4,
            **FAST,
        )  # fmt: skip

        interrupt_once_submitted(lambda: run_autointerp("toy:demo", config, progress=False), db)
        args = ["autointerp", "toy:demo", "--provider", "openai", "--base-url", server.openai_url]
        listed = runner.invoke(app, [*args, "--list-batches", "--json"])
        assert listed.exit_code == 0, listed.output
        (row,) = _json.loads(listed.stdout)
        assert (row["provider_batch_id"], row["pending"], row["n_requests"]) == (
            server.creates[0], 4, 4,
        )  # fmt: skip
        assert row["scope"].startswith("autointerp|openai|gpt-4.1-mini|") and server.cancels == []
        table = runner.invoke(app, [*args, "--list-batches"])
        assert server.creates[0] in table.output and "1 open batch" in table.output
        since = len(server.requests)
        sync = runner.invoke(app, [*args, "--json"])  # every component of the harvest
        assert sync.exit_code == 0, sync.output
        report = _json.loads(sync.stdout)
        others = report["n_components"] - 4
        assert others > 0 and len(server.requests) - since == others  # none of the 4 sent
        assert (report["n_in_open_batches"], report["n_labelled"]) == (4, others)
        assert "4 component(s) not sent" in sync.stderr and server.creates[0] in sync.stderr
        cancel = runner.invoke(
            app, [*args, "--cancel-batches", "--poll-interval", "0.05", "--json"]
        )
        assert cancel.exit_code == 0, cancel.output
        done = _json.loads(cancel.stdout)
        assert (done["n_labelled"], done["n_failed"], done["batches_canceled"]) == (1, 3, 1)
        assert server.cancels == [server.creates[0]]
        since = len(server.requests)
        last = runner.invoke(app, [*args, "--json"])
        assert last.exit_code == 0, last.output
        assert len(server.requests) - since == 3
        assert _json.loads(last.stdout)["n_labelled"] == 3
        assert _json.loads(runner.invoke(app, [*args, "--list-batches", "--json"]).stdout) == []
