"""The real SDK clients against a local server speaking each API's wire format."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from factories import METHOD_DESCRIPTION, make_evidence, make_many
from helpers import rows, run
from llm_server import LLMServer, Reply

from spd_host.autointerp.answer import ANSWER_SCHEMA

PROVIDERS = ["anthropic", "openai"]
KEYS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}
SECRET = "sk-test-DO-NOT-STORE-4242"


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEYS.values():
        monkeypatch.setenv(name, SECRET)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_round_trip_sends_schema_and_key_and_stores_label(
    provider: str, keyed: None, tmp_path: Path
) -> None:
    db = tmp_path / "labels.db"
    with LLMServer() as server:
        report = run(server, provider, [make_evidence(7)], db)
    assert (report.n_labelled, report.n_failed, report.calls) == (1, 0, 1)
    (req,) = server.requests
    if provider == "anthropic":
        # SDK 2.x sends the key as a bearer token; older ones as x-api-key
        sent = req.headers.get("x-api-key") or req.headers.get("authorization", "").removeprefix(
            "Bearer "
        )
        assert sent == SECRET
        assert req.body["tool_choice"] == {"type": "tool", "name": "record_component_label"}
        assert req.body["tools"][0]["input_schema"] == ANSWER_SCHEMA
        assert req.body["max_tokens"] == 600
    else:
        assert req.headers["authorization"] == f"Bearer {SECRET}"
        fmt = req.body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == ANSWER_SCHEMA
        assert fmt["json_schema"]["strict"] is True
        assert req.body["max_completion_tokens"] == 600 and "max_tokens" not in req.body
    assert METHOD_DESCRIPTION in req.prompt  # the method blurb comes from the evidence/adapter
    (row,) = rows(db)
    assert row.status == "ok" and row.label == "label of MARK7" and row.confidence == "medium"
    assert row.prompt in req.prompt and row.model == MODELS_[provider]
    assert json.loads(row.raw_response or "{}")  # the server's JSON is kept verbatim-ish
    # usage 100 in / 40 out at the provider's list price
    price = {"anthropic": (1.0, 5.0), "openai": (0.4, 1.6)}[provider]
    assert row.cost_usd == pytest.approx((100 * price[0] + 40 * price[1]) / 1e6)
    assert SECRET.encode() not in db.read_bytes()


MODELS_ = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_retry_after_pauses_every_worker(provider: str, keyed: None, tmp_path: Path) -> None:
    """The first request gets 429 with Retry-After: 1; the other three in flight are slow. No
    request may arrive until the pause is over, whichever worker sends it."""

    def plan(req):  # type: ignore[no-untyped-def]
        if req.index == 0:
            return Reply(status=429, headers={"retry-after": "1"}, delay=0.0)
        return Reply(delay=0.3 if req.index < 4 else 0.0)

    db = tmp_path / "labels.db"
    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(8), db, max_concurrent=4)
    assert (report.n_labelled, report.n_failed) == (8, 0)
    t_429 = next(t for r, status, t in server.responses if status == 429)
    later = [r for r in server.requests if r.index >= 4]
    assert later and all(r.arrived >= t_429 + 0.95 for r in later)
    first = server.requests[0].marker
    retried = [r for r in server.requests if r.marker == first]
    assert len(retried) == 2
    (row,) = [r for r in rows(db) if r.label == f"label of {first}"]
    assert row.attempts == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_500_is_retried_then_recorded_as_failure_never_as_label(
    provider: str, keyed: None, tmp_path: Path
) -> None:
    db = tmp_path / "labels.db"
    # component 0 always gets 500; component 1 gets 500 once
    seen: dict[str | None, int] = {}

    def plan(req):  # type: ignore[no-untyped-def]
        seen[req.marker] = seen.get(req.marker, 0) + 1
        if req.marker == "MARK0" or (req.marker == "MARK1" and seen["MARK1"] == 1):
            return Reply(status=500)
        return Reply()

    with LLMServer(plan=plan) as server:
        report = run(server, provider, make_many(2), db, max_attempts=3)
    assert (report.n_labelled, report.n_failed, report.calls) == (1, 1, 5)
    by_key = {r.component_key: r for r in rows(db)}
    failed = by_key["3.mlp_in:0"]
    assert failed.status == "failed" and failed.label is None and failed.attempts == 3
    assert "HTTP 500" in (failed.error or "")
    assert by_key["3.mlp_in:1"].status == "ok" and by_key["3.mlp_in:1"].attempts == 2

    # a re-run retries the failure only, and a success replaces it
    with LLMServer() as server:
        report = run(server, provider, make_many(2), db)
    assert server.markers() == ["MARK0"] and report.n_already_labelled == 1
    assert {r.status for r in rows(db)} == {"ok"} and len(rows(db)) == 2
    assert next(r for r in rows(db) if r.component_key == "3.mlp_in:0").attempts == 4


@pytest.mark.parametrize("provider", PROVIDERS)
def test_timeout_is_retried(provider: str, keyed: None, tmp_path: Path) -> None:
    db = tmp_path / "labels.db"

    def plan(req):  # type: ignore[no-untyped-def]
        return Reply(delay=3.0) if req.index == 0 else Reply()

    with LLMServer(plan=plan) as server:
        report = run(server, provider, [make_evidence(0)], db, timeout_s=0.5)
    assert (report.n_labelled, report.calls) == (1, 2)
    assert rows(db)[0].attempts == 2


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "bad",
    [
        Reply(truncated=True, answer='{"label": "the cat'),  # cut at the token limit
        Reply(cut_connection=True),  # the HTTP body itself is truncated
        Reply(body=b"<html><body>502 Bad Gateway</body></html>"),  # not JSON at all
        Reply(answer="I think this component detects cats."),  # prose instead of JSON
        Reply(answer={"label": "cats", "confidence": "certain", "reasoning": "x"}),  # off-schema
    ],
    ids=["finish-length", "cut-connection", "html-body", "prose", "off-schema"],
)
def test_malformed_and_truncated_answers_are_retried(
    provider: str, bad: Reply, keyed: None, tmp_path: Path
) -> None:
    db = tmp_path / "labels.db"

    def plan(req):  # type: ignore[no-untyped-def]
        return bad if req.index == 0 else Reply()

    with LLMServer(plan=plan) as server:
        report = run(server, provider, [make_evidence(0)], db)
    assert (report.n_labelled, report.n_failed, report.calls) == (1, 0, 2)
    (row,) = rows(db)
    assert row.label == "label of MARK0" and row.attempts == 2


@pytest.mark.parametrize("provider", PROVIDERS)
def test_persistently_malformed_answer_is_a_failure_with_raw_response(
    provider: str, keyed: None, tmp_path: Path
) -> None:
    db = tmp_path / "labels.db"
    with LLMServer(plan=lambda req: Reply(answer="no json here, sorry")) as server:
        report = run(server, provider, [make_evidence(0)], db, max_attempts=2)
    assert (report.n_labelled, report.n_failed, report.calls) == (0, 1, 2)
    (row,) = rows(db)
    assert row.status == "failed" and row.label is None
    assert "malformed answer" in (row.error or "") and "no json here" in (row.raw_response or "")
    # the tokens the server billed for the bad answers count as spend
    assert row.cost_usd > 0 and report.spent_usd == pytest.approx(row.cost_usd)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_permanent_error_is_not_retried_and_key_is_redacted(
    provider: str, keyed: None, tmp_path: Path
) -> None:
    db = tmp_path / "labels.db"
    body = json.dumps({"error": {"message": f"invalid key {SECRET}", "type": "auth"}}).encode()

    def plan(req):  # type: ignore[no-untyped-def]
        return Reply(status=401, body=body)

    with LLMServer(plan=plan) as server:
        report = run(server, provider, [make_evidence(0)], db)
    assert (report.n_failed, report.calls) == (1, 1)
    (row,) = rows(db)
    assert "401" in (row.error or "") and SECRET not in (row.error or "")
    assert SECRET.encode() not in db.read_bytes()


def test_rpm_spaces_request_starts(keyed: None, tmp_path: Path) -> None:
    """600 requests per minute = one start per 0.1 s, even with eight workers free: the fifth
    request cannot reach the server before 0.4 s after the run began (a lower bound, which no
    amount of machine load can break; not a speed assertion)."""
    with LLMServer() as server:
        began = time.monotonic()
        report = run(server, "openai", make_many(5), tmp_path / "l.db", max_concurrent=8, rpm=600)
    assert report.n_labelled == 5 and report.calls == 5
    assert max(r.arrived for r in server.requests) - began >= 0.4 - 1e-3


def test_compatible_servers_get_max_tokens(tmp_path: Path) -> None:
    with LLMServer() as server:
        from spd_host.autointerp.config import AutointerpConfig
        from spd_host.autointerp.runner import label_components

        config = AutointerpConfig(
            provider="openai-compatible", model="local", base_url=server.openai_url
        )
        report = label_components(
            [make_evidence(1)],
            config,
            db_path=tmp_path / "l.db",
            harvest_id="h",
            decomposition_id="t:demo",
        )
    assert report.n_labelled == 1 and report.spent_usd == 0
    assert server.requests[0].body["max_tokens"] == 600
    assert "authorization" in server.requests[0].headers  # a placeholder key; no env var needed


def test_openrouter_speaks_openai_wire_format(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", SECRET)
    with LLMServer() as server:
        from spd_host.autointerp.config import AutointerpConfig
        from spd_host.autointerp.runner import label_components

        config = AutointerpConfig(
            provider="openrouter", model="google/gemini-2.5-flash", base_url=server.openai_url
        )
        report = label_components(
            [make_evidence(3)],
            config,
            db_path=tmp_path / "l.db",
            harvest_id="h",
            decomposition_id="t:demo",
        )
    assert report.n_labelled == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert report.spent_usd == pytest.approx((100 * 0.3 + 40 * 2.5) / 1e6)


def test_a_retry_after_pause_shows_in_the_progress_bar(keyed: None, tmp_path: Path) -> None:
    """Issue #13: a Retry-After stalled every worker silently; the bar now says it waits."""
    import asyncio
    import io

    from rich.console import Console

    from spd_host.autointerp.config import AutointerpConfig
    from spd_host.autointerp.runner import alabel_components
    from spd_host.autointerp.store import LabelStore

    def plan(req):  # type: ignore[no-untyped-def]
        if req.index == 0:
            return Reply(status=429, headers={"retry-after": "2"}, delay=0.0)
        return Reply(delay=0.4 if req.index < 4 else 0.0)  # finish while the pause lasts

    evidence = {e.component_key: e for e in make_many(6)}
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with LLMServer(plan=plan) as server, LabelStore(tmp_path / "labels.db") as store:
        config = AutointerpConfig(
            provider="openai",
            model="gpt-4.1-mini",
            base_url=server.openai_url,
            max_concurrent=4,
            backoff_base_s=0.01,
        )
        report = asyncio.run(
            alabel_components(
                list(evidence),
                evidence.__getitem__,
                config,
                store=store,
                harvest_id="h1",
                decomposition_id="t:demo",
                console=console,
                progress=True,
                seed=0,
            )
        )
    assert report.n_labelled == 6
    assert "(Retry-After)" in out.getvalue() and "waiting" in out.getvalue()
