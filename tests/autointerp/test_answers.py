"""What an LLM or its server may send back, through the real SDKs over 127.0.0.1: blank labels,
echoed keys, error bodies, fatal statuses and Retry-After values no run should wait for."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from factories import make_many
from helpers import rows, run
from llm_server import LLMServer, Reply, Request

PROVIDERS = ["anthropic", "openai"]
SECRET = "sk-test-ECHOED-9f8e7d6c"


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("blank", ["", "   ", "\n\t "])
def test_a_blank_label_is_a_failure_row_not_a_crash(
    provider: str, blank: str, tmp_path: Path
) -> None:
    def plan(req: Request) -> Reply:
        if req.marker == "MARK1":
            return Reply(answer={"label": blank, "confidence": "high", "reasoning": "r"})
        return Reply()

    db = tmp_path / "l.db"
    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(3), db, max_attempts=2)
    assert (report.n_labelled, report.n_failed) == (2, 1)
    (failed,) = [r for r in rows(db) if r.status == "failed"]
    assert failed.component_key == "3.mlp_in:1" and failed.label is None
    assert "malformed answer" in (failed.error or "") and failed.attempts == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_key_echoed_in_an_answer_is_never_stored(provider: str, tmp_path: Path) -> None:
    def plan(req: Request) -> Reply:
        return Reply(
            answer={
                "label": f"key {SECRET} here",
                "confidence": "low",
                "reasoning": f"saw {SECRET}",
            }
        )

    db = tmp_path / "l.db"
    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(2), db)
    assert report.n_labelled == 2
    for r in rows(db):
        assert r.label == "key *** here" and r.reasoning == "saw ***"
    for f in db.parent.glob("l.db*"):  # the WAL too
        assert SECRET.encode() not in f.read_bytes()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_fatal_statuses_stop_the_run_at_once_with_the_servers_body(
    provider: str, status: int, tmp_path: Path
) -> None:
    body = json.dumps({"detail": f"no such thing (status {status})"})

    def plan(req: Request) -> Reply:
        return Reply(status=status, body=body.encode())

    db = tmp_path / "l.db"
    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(20), db, max_concurrent=1)
    assert len(server.requests) == 1 and report.calls == 1
    assert (report.n_failed, report.n_not_sent) == (1, 19)
    assert report.stopped_by_error and f"HTTP {status}: {body}" in report.stopped_by_error
    (row,) = rows(db)
    assert f"HTTP {status}: {body}" in (row.error or "")
    assert report.failure_reasons == {f"{provider}: HTTP {status}": 1}


RETRY_AFTERS = {
    "a day in seconds": "86400",
    "a date in 2100": "Fri, 01 Jan 2100 00:00:00 GMT",
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("value", list(RETRY_AFTERS.values()), ids=list(RETRY_AFTERS))
def test_retry_after_past_the_ceiling_fails_that_request_instead_of_stalling(
    provider: str, value: str, tmp_path: Path
) -> None:
    def plan(req: Request) -> Reply:
        if req.marker == "MARK0":
            return Reply(status=429, headers={"retry-after": value})
        return Reply()

    db = tmp_path / "l.db"
    t0 = time.monotonic()
    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(4), db, max_concurrent=2)
    assert time.monotonic() - t0 < 20  # nobody waited a day
    assert (report.n_labelled, report.n_failed) == (3, 1)
    (failed,) = [r for r in rows(db) if r.status == "failed"]
    assert failed.component_key == "3.mlp_in:0" and failed.attempts == 1
    assert "ceiling" in (failed.error or "") and "HTTP 429" in (failed.error or "")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retry_after_under_the_ceiling_is_still_honoured(provider: str, tmp_path: Path) -> None:
    seen: list[str] = []

    def plan(req: Request) -> Reply:
        seen.append(req.marker or "")
        if seen.count("MARK0") == 1 and req.marker == "MARK0":
            return Reply(status=429, headers={"retry-after": "1"})
        return Reply()

    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(1), tmp_path / "l.db", max_retry_after_s=5)
        (first, second) = server.requests
    assert report.n_labelled == 1 and second.arrived - first.arrived >= 0.95
