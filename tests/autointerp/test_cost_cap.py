"""The hard cost cap, worked by hand.

Prices: input free, output $1 per token (1e6 per million); max_output_tokens 100, so every
call's worst case is exactly $100 whatever the prompt; the server bills 40 output tokens, so
every call actually costs $40.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import make_many
from helpers import rows, run
from llm_server import LLMServer

PRICES = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 1e6, "max_output_tokens": 100}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")


def test_sequential_calls_stop_when_the_next_could_exceed_the_cap(tmp_path: Path) -> None:
    # call k is sent iff 40 (k - 1) + 100 <= 350, i.e. k <= 7
    db = tmp_path / "labels.db"
    with LLMServer() as server:
        report = run(
            server, "anthropic", make_many(20), db, max_concurrent=1, cost_cap_usd=350, **PRICES
        )
    assert len(server.requests) == 7 and report.calls == 7
    assert report.spent_usd == pytest.approx(280.0)
    assert report.stopped_by_cost_cap and report.n_labelled == 7 and report.n_not_sent == 13
    assert report.n_failed == 0 and len(rows(db)) == 7  # unsent components are not failures


def test_in_flight_calls_count_against_the_cap(tmp_path: Path) -> None:
    # ten workers: three reservations of $100 fit under $350, the fourth does not
    db = tmp_path / "labels.db"
    with LLMServer(latency=0.2) as server:
        report = run(
            server, "anthropic", make_many(20), db, max_concurrent=10, cost_cap_usd=350, **PRICES
        )
    assert len(server.requests) == 3 and server.peak_in_flight <= 3
    assert report.spent_usd == pytest.approx(120.0) and report.n_labelled == 3


def test_rerun_with_a_higher_cap_continues(tmp_path: Path) -> None:
    db = tmp_path / "labels.db"
    with LLMServer() as server:
        run(server, "anthropic", make_many(5), db, max_concurrent=1, cost_cap_usd=150, **PRICES)
        assert len(rows(db)) == 2  # 100 <= 150, 40 + 100 <= 150, 80 + 100 > 150
        report = run(
            server, "anthropic", make_many(5), db, max_concurrent=1, cost_cap_usd=1000, **PRICES
        )
    assert report.n_already_labelled == 2 and report.n_labelled == 3
    assert len(server.requests) == 5 and len(rows(db)) == 5


def test_unknown_model_price_is_an_error_not_a_silent_zero(tmp_path: Path) -> None:
    from spd_host.errors import ConfigError

    with LLMServer() as server, pytest.raises(ConfigError, match="no price known"):
        run(server, "anthropic", make_many(1), tmp_path / "l.db", model="claude-unreleased")
    assert server.requests == []
