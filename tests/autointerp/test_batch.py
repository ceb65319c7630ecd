"""The batch path through the real ``anthropic`` and ``openai`` SDKs against the loopback batch
server: labels equal the synchronous path's, batch prices worked by hand from pricing.yaml,
failures and expired requests become failure rows retried on a re-run, chunking and the cost
cap with the in-flight worst case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batch_server import BatchPlan, BatchServer
from factories import make_many
from helpers import FAST, LIST, MODELS, PROVIDERS, rows, run
from llm_server import Reply, Request

from spd_host.autointerp.store import LabelStore

pytestmark = pytest.mark.usefixtures("fake_batch_keys")


def _answers(req: Request) -> Reply:
    """Different answers per component, so a mismatched custom id would show."""
    n = int((req.marker or "MARK0")[4:])
    return Reply(
        answer={"label": f"thing {n * 7 % 5}", "confidence": "high", "reasoning": f"r{n}"},
        input_tokens=100 + n,
        output_tokens=30 + n,
    )


@pytest.mark.parametrize("provider", PROVIDERS)
def test_batch_labels_equal_sync_labels_at_batch_price(provider: str, tmp_path: Path) -> None:
    with BatchServer(plan=_answers) as server:
        sync = run(server, provider, make_many(6), tmp_path / "sync.db")
        n_sync = len(server.requests)
        batch = run(server, provider, make_many(6), tmp_path / "batch.db", **FAST)
    assert (sync.n_labelled, batch.n_labelled, batch.n_failed) == (6, 6, 0)
    assert batch.batch and batch.batches_submitted == 1 and len(server.creates) == 1
    assert len(server.requests) - n_sync == 6  # each component once, inside the batch

    def labels(db: Path) -> dict[str, tuple[str | None, str | None, str | None]]:
        return {r.component_key: (r.label, r.confidence, r.reasoning) for r in rows(db)}

    assert labels(tmp_path / "batch.db") == labels(tmp_path / "sync.db")
    p_in, p_out = LIST[provider]
    for r in rows(tmp_path / "batch.db"):
        n = int(r.component_key.split(":")[1])
        assert (r.input_tokens, r.output_tokens) == (100 + n, 30 + n)
        assert r.cost_usd == pytest.approx(0.5 * ((100 + n) * p_in + (30 + n) * p_out) / 1e6)
    want = sum(0.5 * ((100 + n) * p_in + (30 + n) * p_out) / 1e6 for n in range(6))
    assert batch.spent_usd == pytest.approx(want) and batch.store_spent_usd == pytest.approx(want)
    # the requests inside the batch are the synchronous requests, byte for byte
    sync_bodies = [r.body for r in server.requests[:n_sync]]
    batch_bodies = [r.body for r in server.requests[n_sync:]]
    key = lambda b: json.dumps(b, sort_keys=True)  # noqa: E731
    assert sorted(map(key, batch_bodies)) == sorted(map(key, sync_bodies))
    if provider == "anthropic":  # prompt caching stays on in batches
        assert all(b["system"][0]["cache_control"] == {"type": "ephemeral"} for b in batch_bodies)
    else:
        upload = server.files["file-0"].decode().splitlines()
        first = json.loads(upload[0])
        assert (first["method"], first["url"]) == ("POST", "/v1/chat/completions")
    with LabelStore(tmp_path / "batch.db") as store:
        (b,) = store.batches.all_batches()
    assert b.state == "collected" and b.provider_batch_id == server.creates[0]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_large_jobs_are_chunked_and_progress_is_reported(provider: str, tmp_path: Path) -> None:
    from spd_host.autointerp.config import AutointerpConfig
    from spd_host.autointerp.runner import alabel_components

    seen = []
    evidence = {e.component_key: e for e in make_many(7)}
    with BatchServer(plan=_answers) as server, LabelStore(tmp_path / "l.db") as store:
        import asyncio

        config = AutointerpConfig(
            provider=provider, model=MODELS[provider], base_url=_url(server, provider),
            batch_max_requests=3, **FAST,
        )  # fmt: skip
        report = asyncio.run(
            alabel_components(
                list(evidence), evidence.__getitem__, config, store=store, harvest_id="h1",
                decomposition_id="t:demo", batch_progress=lambda p: seen.append(
                    (p.submitted, p.succeeded, p.batches)),
            )
        )  # fmt: skip
    assert report.n_labelled == 7 and report.batches_submitted == 3
    per_batch = [
        sum(1 for r in server.requests if r.index in _indices(server, b)) for b in server.creates
    ]
    assert per_batch == [3, 3, 1]
    assert seen[-1] == (7, 7, 3) and seen[0][1] == 0
    assert {r.label for r in rows(tmp_path / "l.db")} == {f"thing {n * 7 % 5}" for n in range(7)}


def _url(server: BatchServer, provider: str) -> str:
    return server.anthropic_url if provider == "anthropic" else server.openai_url


def _indices(server: BatchServer, bid: str) -> set[int]:
    return {req.index for _, req, _ in server.batches[bid].items}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_errored_malformed_and_expired_requests_are_failure_rows_retried_on_rerun(
    provider: str, tmp_path: Path
) -> None:
    def plan(req: Request) -> Reply:
        if req.marker == "MARK1":
            return Reply(status=500)
        if req.marker == "MARK2":
            return Reply(answer="prose, not JSON")
        return Reply()

    db = tmp_path / "l.db"
    with BatchServer(plan=plan, batch_plan=lambda n: BatchPlan(expire_after=4)) as server:
        first = run(server, provider, make_many(6), db, **FAST)
    assert (first.n_labelled, first.n_failed, first.n_not_sent) == (2, 4, 0)
    assert first.batch_outcomes == {"succeeded": 2, "errored": 1, "malformed": 1, "expired": 2}
    by_key = {r.component_key: r for r in rows(db)}
    assert {k for k, r in by_key.items() if r.status == "ok"} == {"3.mlp_in:0", "3.mlp_in:3"}
    assert "500" in (by_key["3.mlp_in:1"].error or "")
    assert "malformed answer" in (by_key["3.mlp_in:2"].error or "")
    assert "prose, not JSON" in (by_key["3.mlp_in:2"].raw_response or "")
    assert by_key["3.mlp_in:2"].cost_usd > 0  # a malformed answer was billed
    for k in ("3.mlp_in:4", "3.mlp_in:5"):  # OpenAI: one in the error file, one by omission
        assert "expired" in (by_key[k].error or "") and by_key[k].cost_usd == 0
    with BatchServer() as server:
        again = run(server, provider, make_many(6), db, **FAST)
    assert again.n_already_labelled == 2 and again.n_labelled == 4 and again.n_failed == 0
    assert sorted(r.marker or "" for r in server.requests) == ["MARK1", "MARK2", "MARK4", "MARK5"]
    assert all(r.status == "ok" for r in rows(db))
    assert {r.component_key: r.attempts for r in rows(db)}["3.mlp_in:1"] == 2


# worst case exactly $100 a request (output $1/token, 100 tokens, input free); billed $40
PRICES = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 1e6, "max_output_tokens": 100}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cost_cap_reserves_the_worst_case_of_everything_in_flight(
    provider: str, tmp_path: Path
) -> None:
    """Cap $350. A batch holds as many $100 worst cases as fit beside what is billed and in
    flight: 3 (300); billed 120 -> 2 (320); billed 200 -> 1; billed 240 -> 1; billed 280 ->
    none fits and nothing runs: stop. Never more in flight than the cap allows."""
    db = tmp_path / "l.db"
    with BatchServer() as server:
        report = run(server, provider, make_many(20), db, cost_cap_usd=350, **PRICES, **FAST)
    sizes = [len(server.batches[b].items) for b in server.creates]
    assert sizes == [3, 2, 1, 1]
    assert report.stopped_by_cost_cap and report.n_labelled == 7 and report.n_not_sent == 13
    assert report.spent_usd == pytest.approx(280.0) and report.n_failed == 0
    # a re-run with a higher cap continues from the store's recorded spend (280):
    # 2 (480) -> billed 360 -> 1 -> 400 -> 1 -> 440 -> none fits under 500
    with BatchServer() as server:
        more = run(server, provider, make_many(20), db, cost_cap_usd=500, **PRICES, **FAST)
    assert [len(server.batches[b].items) for b in server.creates] == [2, 1, 1]
    assert more.n_labelled == 4 and more.store_spent_usd == pytest.approx(440.0)


def test_list_prices_are_discounted_in_the_reservation(tmp_path: Path) -> None:
    """gpt-4.1-mini at batch price: 0.20 in / 0.80 out per MTok (list 0.40 / 1.60). With
    max_output_tokens 10**6 one request's worst case is $0.80 plus its prompt bound: under a
    $1.00 cap at the batch price (at list price, $1.60, nothing would be sent), but two in
    flight are not. Each bills 100 in + 40 out = $0.000052, so one batch of one at a time."""
    with BatchServer() as server:
        report = run(
            server, "openai", make_many(3), tmp_path / "l.db", cost_cap_usd=1.0,
            max_output_tokens=1_000_000, **FAST,
        )  # fmt: skip
    assert [len(server.batches[b].items) for b in server.creates] == [1, 1, 1]
    assert report.n_labelled == 3 and report.spent_usd == pytest.approx(3 * 52e-6)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_create_stops_the_run_and_sends_nothing(provider: str, tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    with BatchServer(batch_plan=lambda n: BatchPlan(create_status=401)) as server:
        report = run(server, provider, make_many(3), db, **FAST)
    assert report.stopped_by_error and "401" in report.stopped_by_error
    assert (report.n_labelled, report.n_failed, report.n_not_sent) == (0, 0, 3)
    assert rows(db) == [] and report.store_spent_usd == 0
    # a 500 on create is retried (after checking the provider did not accept it anyway)
    flaky = lambda n: BatchPlan(create_status=500 if n == 0 else 200)  # noqa: E731
    with BatchServer(batch_plan=flaky) as server:
        report = run(server, provider, make_many(3), db, **FAST)
    assert report.n_labelled == 3 and server.create_calls == 2 and len(server.creates) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cancel_through_the_sdk_cancels_the_unfinished_requests(provider: str) -> None:
    import asyncio

    from factories import make_evidence

    from spd_host.autointerp.answer import ANSWER_SCHEMA
    from spd_host.autointerp.providers.base import ClientOptions, CompletionRequest
    from spd_host.autointerp.registry import get_provider

    async def go(server: BatchServer) -> tuple[list[str], str, list[str]]:
        p = get_provider(provider)
        assert p.make_batch_client is not None
        client = p.make_batch_client(
            ClientOptions(model=MODELS[provider], base_url=_url(server, provider))
        )
        req = CompletionRequest("sys", "MARK9", ANSWER_SCHEMA, 50, make_evidence(9))
        bid = await client.submit("local1", [client.line("c0", req), client.line("c1", req)])
        before = (await client.status(bid)).provider_status
        await client.cancel(bid)
        during = (await client.status(bid)).provider_status
        assert during == ("canceling" if provider == "anthropic" else "cancelling")
        status = await client.status(bid)
        while not status.ended:
            await asyncio.sleep(0.02)
            status = await client.status(bid)
        outcomes = [r.outcome async for r in client.results(bid)]
        await client.aclose()
        return [before], status.provider_status, outcomes

    with BatchServer(batch_plan=lambda n: BatchPlan(delay=30)) as server:
        before, after, outcomes = asyncio.run(go(server))
    assert before[0] in ("in_progress", "validating")
    assert after == ("ended" if provider == "anthropic" else "cancelled")
    assert outcomes == ["canceled", "canceled"] if provider == "anthropic" else ["canceled"]


def test_cli_batch_flag_labels_a_real_harvest_and_refuses_a_provider_without_batches(
    toy_harvest: object,
) -> None:
    from typer.testing import CliRunner

    from spd_host.autointerp.api import load_labels
    from spd_host.cli.app import app
    from spd_host.plugins import temporary_plugins
    from tests.harvest import toy_plugin

    runner = CliRunner()
    with temporary_plugins(("toy", toy_plugin), entry_points=False), BatchServer() as server:
        args = ["autointerp", "toy:demo", "--provider", "openai", "--base-url", server.openai_url]
        result = runner.invoke(app, [*args, "--batch", "--poll-interval", "0.05", "--limit", "4"])
        assert result.exit_code == 0, result.output
        assert "batch requests" in result.output and "succeeded 4" in result.output
        assert len(load_labels("toy:demo")) == 4 and len(server.creates) == 1
        refused = runner.invoke(
            app, ["autointerp", "toy:demo", "--provider", "openai-compatible", "--base-url",
                  server.openai_url, "--batch", "--no-progress"],
        )  # fmt: skip
    assert refused.exit_code != 0 and "has no batch API" in refused.output


def test_a_version_1_store_gains_the_batch_tables_and_keeps_its_labels(tmp_path: Path) -> None:
    """A store written before the batch tables (schema 1: labels + meta + spend) opens, is
    migrated in place to schema 2, and its labels, spend and a batch run on top all work."""
    import sqlite3

    from spd_host.autointerp.ledger import LEDGER_DDL
    from spd_host.autointerp.store import _DDL

    db = tmp_path / "labels.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_DDL + LEDGER_DDL)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with BatchServer() as server:
        run(server, "openai", make_many(2), db)  # sync labels in the old store
        report = run(server, "openai", make_many(4), db, **FAST)
    assert report.n_already_labelled == 2 and report.n_labelled == 2
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert version == "2" and {"labels", "spend", "batches", "batch_items"} <= tables
    assert len(rows(db)) == 4


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_batch_the_provider_lost_is_failure_rows_and_its_reservation_counts(
    provider: str, tmp_path: Path
) -> None:
    """A 404 on poll (the batch was deleted): its components are failure rows a re-run
    retries, and what it may have billed stays counted at its worst case ($100 x 2)."""
    db = tmp_path / "l.db"
    with BatchServer(batch_plan=lambda n: BatchPlan(gone=True)) as server:
        report = run(server, provider, make_many(2), db, cost_cap_usd=1000, **PRICES, **FAST)
    assert (report.n_labelled, report.n_failed) == (0, 2)
    assert all("404" in (r.error or "") for r in rows(db))
    assert report.store_spent_usd == pytest.approx(200.0)
    with BatchServer() as server:
        again = run(server, provider, make_many(2), db, cost_cap_usd=1000, **PRICES, **FAST)
    assert again.n_labelled == 2 and again.store_spent_usd == pytest.approx(280.0)


def test_a_reservation_without_its_batch_row_is_released(tmp_path: Path) -> None:
    """Killed between the ledger reservation and the submitting row: no create call was made,
    so the next batch run settles the reservation at zero instead of counting it forever."""
    db = tmp_path / "l.db"
    with LabelStore(db) as store:
        store.ledger.begin("dead-run", "batch:0123456789abcdef", 250.0)
        assert store.ledger.total() == 250.0
    with BatchServer() as server:
        report = run(server, "openai", make_many(2), db, cost_cap_usd=300, **PRICES, **FAST)
    assert report.n_labelled == 2 and report.store_spent_usd == pytest.approx(80.0)
