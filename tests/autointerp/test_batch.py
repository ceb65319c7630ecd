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
from helpers import MODELS, rows, run
from llm_server import Reply, Request

from spd_host.autointerp.store import LabelStore

PROVIDERS = ["anthropic", "openai"]
# pricing.yaml list prices (USD/MTok) and the batch discount 0.5 of both
LIST = {"anthropic": (1.00, 5.00), "openai": (0.40, 1.60)}
FAST = {"batch": True, "poll_interval_s": 0.05}


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


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
