"""Prompt caching through the real SDKs: the shared prefix is marked (Anthropic) and is the
same bytes for every component; cached input tokens from the usage fields are billed at the
cached price; the run reports the saving. Costs are worked from pricing.yaml by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import make_many
from helpers import rows, run
from llm_server import LLMServer, Reply, Request

# pricing.yaml: claude-haiku-4-5 1.00 in / 0.10 cached / 1.25 write / 5.00 out;
# gpt-4.1-mini 0.40 in / 0.10 cached / 1.60 out
HAIKU = {"in": 1.0, "read": 0.10, "write": 1.25, "out": 5.0}
MINI = {"in": 0.40, "read": 0.10, "out": 1.60}


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def test_anthropic_marks_the_shared_prefix_and_bills_cache_reads_and_writes(
    tmp_path: Path,
) -> None:
    # first request writes 800 prefix tokens to the cache, the others read them
    def plan(req: Request) -> Reply:
        if req.index == 0:
            return Reply(input_tokens=1000, cache_write_tokens=800, output_tokens=40)
        return Reply(input_tokens=1000, cache_read_tokens=800, output_tokens=40)

    with LLMServer(plan=plan) as server:
        report = run(server, "anthropic", make_many(3), tmp_path / "l.db", max_concurrent=1)
    assert report.n_labelled == 3
    systems = [r.body["system"] for r in server.requests]
    for system in systems:
        (block,) = system
        assert block["type"] == "text" and block["cache_control"] == {"type": "ephemeral"}
    # the prefix is byte-identical across components; the component is only in the message
    assert len({s[0]["text"] for s in systems}) == 1
    for r in server.requests:
        assert r.marker is not None and r.marker not in r.system and r.marker in r.user
    write = (200 * HAIKU["in"] + 800 * HAIKU["write"] + 40 * HAIKU["out"]) / 1e6
    read = (200 * HAIKU["in"] + 800 * HAIKU["read"] + 40 * HAIKU["out"]) / 1e6
    by_marker = {r.marker: r.index for r in server.requests}
    for row in rows(tmp_path / "l.db"):
        first = by_marker[f"MARK{row.component_key.split(':')[1]}"] == 0
        assert row.cost_usd == pytest.approx(write if first else read)
        assert row.input_tokens == 1000  # every input token, cached ones included
    assert report.spent_usd == pytest.approx(write + 2 * read)
    assert report.cache_read_tokens == 1600
    # saving against 1000 plain input tokens per call: reads save 0.9/MTok, the write costs 0.25
    want = (2 * 800 * (HAIKU["in"] - HAIKU["read"]) - 800 * (HAIKU["write"] - HAIKU["in"])) / 1e6
    assert report.cache_saved_usd == pytest.approx(want)


def test_openai_cached_tokens_are_billed_at_the_cached_price(tmp_path: Path) -> None:
    with LLMServer(plan=lambda r: Reply(input_tokens=2000, cache_read_tokens=1536)) as server:
        report = run(server, "openai", make_many(2), tmp_path / "l.db")
    # system message first: the shared part is the prefix OpenAI caches automatically
    assert [m["role"] for m in server.requests[0].body["messages"]] == ["system", "user"]
    assert server.requests[0].system == server.requests[1].system
    per_call = (464 * MINI["in"] + 1536 * MINI["read"] + 40 * MINI["out"]) / 1e6
    assert [r.cost_usd for r in rows(tmp_path / "l.db")] == pytest.approx([per_call] * 2)
    assert report.cache_saved_usd == pytest.approx(2 * 1536 * (MINI["in"] - MINI["read"]) / 1e6)


def test_a_hand_given_price_bills_cached_tokens_in_full(tmp_path: Path) -> None:
    """--price-per-mtok gives no cached price: the cap must not assume a discount."""
    with LLMServer(plan=lambda r: Reply(input_tokens=1000, cache_read_tokens=900)) as server:
        report = run(
            server, "openai", make_many(1), tmp_path / "l.db",
            model="gpt-unlisted", input_price_per_mtok=2.0, output_price_per_mtok=8.0,
        )  # fmt: skip
    assert report.spent_usd == pytest.approx((1000 * 2.0 + 40 * 8.0) / 1e6)
    assert report.cache_saved_usd == 0


def test_anthropic_without_a_system_prompt_sends_none() -> None:
    import asyncio

    from factories import make_evidence

    from spd_host.autointerp.answer import ANSWER_SCHEMA
    from spd_host.autointerp.providers.base import ClientOptions, CompletionRequest
    from spd_host.autointerp.registry import get_provider

    provider = get_provider("anthropic")
    with LLMServer() as server:
        client = provider.make_client(
            ClientOptions(model="claude-haiku-4-5", base_url=server.anthropic_url)
        )
        req = CompletionRequest(
            system="", prompt="MARK9", schema=ANSWER_SCHEMA, max_output_tokens=50,
            evidence=make_evidence(9),
        )  # fmt: skip

        async def go() -> None:
            await client.complete(req)
            await client.aclose()

        asyncio.run(go())
    assert "system" not in server.requests[0].body
