"""SIGKILL of a batch run, then resume: the batch the killed process had submitted is polled
and collected, never submitted again; also when the kill came between the create call and the
write of the provider's batch id (the batch is found at the provider by its metadata / by its
creation time and request count)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_server import BatchPlan, BatchServer
from factories import make_many
from helpers import rows, run
from llm_server import Reply, Request

from spd_host.autointerp.store import LabelStore

N = 5


def _answers(req: Request) -> Reply:
    n = int((req.marker or "MARK0")[4:])
    return Reply(answer={"label": f"L{n}", "confidence": "low", "reasoning": "r"})


def _batch_rows(db: Path) -> list[tuple[str | None, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return list(conn.execute("SELECT provider_batch_id, state FROM batches"))
    except sqlite3.OperationalError:  # not created yet
        return []


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("when", ["while-running", "during-create"])
def test_sigkill_then_resume_polls_and_never_resubmits(
    provider: str, when: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    db = tmp_path / "labels.db"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}"}
    hold = 30.0 if when == "during-create" else 0.0
    plan = BatchPlan(delay=2.0, create_hold=hold)
    with BatchServer(plan=_answers, batch_plan=lambda n: plan) as server:
        url = server.anthropic_url if provider == "anthropic" else server.openai_url
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("batch_kill_worker.py")),
             provider, url, str(db), str(N)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 120

        def ready() -> bool:
            batches = _batch_rows(db)
            if when == "during-create":  # accepted by the server, id not yet written
                return bool(server.creates) and batches == [(None, "submitting")]
            return bool(batches) and batches[0][1] == "submitted"

        while not ready():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker never submitted"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert rows(db) == []  # killed before any result
        calls_before = len(server.calls)
        report = run(server, provider, make_many(N), db, batch=True, poll_interval_s=0.05)
        new_calls = server.calls[calls_before:]
    assert len(server.creates) == 1 and server.create_calls == 1  # never submitted twice
    assert not any(path.endswith("/files") for _, path in new_calls)
    assert report.batches_resumed == 1 and report.batches_submitted == 0
    assert report.n_labelled == N and report.n_failed == 0
    assert sorted(r.label or "" for r in rows(db)) == [f"L{i}" for i in range(N)]
    with LabelStore(db) as store:
        (b,) = store.batches.all_batches()
        # the killed run's reservation was settled at the billed cost, not left as orphaned
        assert store.ledger.total() == pytest.approx(report.spent_usd)
        assert store.ledger.total_orphaned() == 0
    assert b.provider_batch_id == server.creates[0] and b.state == "collected"
