"""The Gemini provider through the official google-genai SDK against the local server speaking
the ``generateContent`` REST wire format: the request as sent, the label stored, cost from
pricing.yaml (cached input and thinking tokens), and the error taxonomy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from factories import make_evidence, make_many
from helpers import rows
from llm_server import LLMServer, Reply, Request

from spd_host.autointerp.answer import ANSWER_SCHEMA
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.runner import RunReport, label_components

pytest.importorskip("google.genai")

SECRET = "gm-test-DO-NOT-STORE-77"
# pricing.yaml, gemini-2.5-flash: 0.30 in, 0.03 cached, 2.50 out (thinking billed as output)
PRICE = {"in": 0.30, "read": 0.03, "out": 2.50}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)


def run(server: LLMServer, evidence: list[Any], db: Path, **overrides: Any) -> RunReport:
    opts: dict[str, Any] = {
        "provider": "gemini",
        "model": "gemini-2.5-flash",
        "base_url": server.gemini_url,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    opts.update(overrides)
    return label_components(
        evidence, AutointerpConfig(**opts), db_path=db, harvest_id="h1", decomposition_id="t:demo"
    )


def test_round_trip_sends_schema_key_and_system_and_bills_cached_and_thinking(
    tmp_path: Path,
) -> None:
    db = tmp_path / "l.db"
    reply = Reply(input_tokens=3000, cache_read_tokens=2048, output_tokens=90, thinking_tokens=50)
    with LLMServer(plan=lambda r: reply) as server:
        report = run(server, [make_evidence(4)], db)
    assert (report.n_labelled, report.n_failed, report.calls) == (1, 0, 1)
    (req,) = server.requests
    assert req.headers["x-goog-api-key"] == SECRET
    gen = req.body["generationConfig"]
    assert gen["responseMimeType"] == "application/json"
    assert gen["responseJsonSchema"] == ANSWER_SCHEMA and gen["maxOutputTokens"] == 600
    assert req.body["contents"][0]["role"] == "user" and "MARK4" in req.user
    assert "MARK4" not in req.system and req.system  # shared prefix first, uncached marker after
    (row,) = rows(db)
    assert row.status == "ok" and row.label == "label of MARK4" and row.provider == "gemini"
    want = ((3000 - 2048) * PRICE["in"] + 2048 * PRICE["read"] + 90 * PRICE["out"]) / 1e6
    assert row.cost_usd == pytest.approx(want)
    assert (row.input_tokens, row.output_tokens) == (3000, 90)
    assert report.cache_saved_usd == pytest.approx(2048 * (PRICE["in"] - PRICE["read"]) / 1e6)
    assert SECRET.encode() not in db.read_bytes()


def test_429_retry_delay_pauses_then_succeeds(tmp_path: Path) -> None:
    info = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.4s"}]

    def plan(req: Request) -> Reply:
        return Reply(status=429, error_details=info) if req.index == 0 else Reply()

    with LLMServer(plan=plan) as server:
        report = run(server, [make_evidence(1)], tmp_path / "l.db")
    assert report.n_labelled == 1 and report.calls == 2
    first, second = server.requests
    assert second.arrived - first.arrived >= 0.4  # the body's retryDelay was honoured


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (Reply(status=500), "HTTP 500"),
        (Reply(truncated=True), "cut off"),
        (Reply(answer="not json at all"), "malformed"),
    ],
)
def test_failures_are_retried_then_recorded(reply: Reply, fragment: str, tmp_path: Path) -> None:
    with LLMServer(plan=lambda r: reply) as server:
        report = run(server, [make_evidence(2)], tmp_path / "l.db", max_attempts=2)
    assert report.n_failed == 1 and len(server.requests) == 2
    (row,) = rows(tmp_path / "l.db")
    assert row.status == "failed" and fragment in (row.error or "")


def test_401_stops_the_run_and_the_key_is_not_stored(tmp_path: Path) -> None:
    with LLMServer(plan=lambda r: Reply(status=401)) as server:
        report = run(server, make_many(5), tmp_path / "l.db", max_concurrent=1)
    assert report.stopped_by_error and "HTTP 401" in report.stopped_by_error
    assert len(server.requests) == 1 and report.n_not_sent == 4
    assert SECRET.encode() not in (tmp_path / "l.db").read_bytes()


def test_timeout_is_transient(tmp_path: Path) -> None:
    start = time.monotonic()
    with LLMServer(plan=lambda r: Reply(delay=1.5)) as server:
        report = run(server, [make_evidence(3)], tmp_path / "l.db", timeout_s=0.3, max_attempts=1)
    assert report.n_failed == 1 and time.monotonic() - start < 5
    (row,) = rows(tmp_path / "l.db")
    assert "timed out" in (row.error or "")
