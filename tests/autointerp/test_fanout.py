"""Concurrency is real and bounded; a SIGKILLed run resumes without duplicates."""

from __future__ import annotations

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
from llm_server import LLMServer


def test_500_components_with_50_in_flight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    db = tmp_path / "labels.db"
    with LLMServer(latency=0.2) as server:
        report = run(server, "openai", make_many(500), db, max_concurrent=50)
    assert (report.n_labelled, report.n_failed, report.calls) == (500, 0, 500)
    # the limit holds, and it is reached: 50 requests were at the server at once
    assert server.peak_in_flight <= 50
    assert server.peak_in_flight >= 40
    stored = rows(db)
    assert len(stored) == 500 and {r.label for r in stored} == {
        f"label of MARK{i}" for i in range(500)
    }


def _count_ok(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM labels WHERE status='ok'").fetchone()[0])
    except sqlite3.OperationalError:  # table not created yet
        return 0


def test_sigkill_halfway_then_resume_labels_everything_exactly_once(tmp_path: Path) -> None:
    n = 120
    db = tmp_path / "labels.db"
    worker = Path(__file__).with_name("kill_worker.py")
    repo = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}",
        "OPENAI_API_KEY": "sk-test",
    }
    # 120 calls / 8 workers x 0.3 s = 4.5 s of labelling: a wide window to kill it in,
    # even when the machine is loaded and this polling loop is descheduled for a while.
    with LLMServer(latency=0.3) as server:
        proc = subprocess.Popen(
            [sys.executable, str(worker), server.openai_url, str(db), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while _count_ok(db) < n // 3:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        committed_before = {r.component_key for r in rows(db) if r.status == "ok"}
        assert n // 3 <= len(committed_before) < n  # really killed halfway
        first_run_requests = len(server.requests)

        done = subprocess.run(
            [sys.executable, str(worker), server.openai_url, str(db), str(n)],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr.decode()
    stored = rows(db)
    assert len(stored) == n and all(r.status == "ok" for r in stored)
    assert sorted(r.component_key for r in stored) == sorted(f"3.mlp_in:{i}" for i in range(n))
    # the second run asked only about components that had no committed label
    second = {r.marker for r in server.requests[first_run_requests:]}
    committed_markers = {f"MARK{k.split(':')[1]}" for k in committed_before}
    assert not (second & committed_markers)
    assert len(second) == n - len(committed_before)
