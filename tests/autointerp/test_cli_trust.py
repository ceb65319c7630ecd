"""The autointerp and show commands over a real toy harvest, as a user meets failures: the
failure table, the exit status, `show --failed`, unknown keys, and labels that try to act on
the terminal or leak a key."""

from __future__ import annotations

import json

import pytest
from llm_server import LLMServer, Reply, Request
from typer.testing import CliRunner

from spd_host.autointerp.api import labels_db_path
from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo
from spd_host.plugins import temporary_plugins
from tests.harvest import toy_plugin

ID = "toy:demo"
SECRET = "sk-test-LEAKY-1234abcd"


def _autointerp(server: LLMServer, *extra: str) -> object:
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        return CliRunner().invoke(
            app,
            [
                "autointerp", ID, "--provider", "openai", "--model", "gpt-4.1-mini",
                "--base-url", server.openai_url, "--no-progress", "--max-attempts", "1", *extra,
            ],
        )  # fmt: skip


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def test_every_component_failing_exits_nonzero_with_a_reason_table(
    toy_harvest: HarvestRepo,
) -> None:
    with LLMServer(plan=lambda r: Reply(status=500)) as server:
        result = _autointerp(server, "--limit", "4")
    assert result.exit_code == 1, result.output
    assert "failures by reason" in result.output
    assert "openai: HTTP 500" in result.output and f"spd-host show {ID} --failed" in result.output
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        listed = CliRunner().invoke(app, ["show", ID, "--failed", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert len(rows) == 4 and all("HTTP 500" in r["error"] for r in rows)


def test_some_failing_exits_zero(toy_harvest: HarvestRepo) -> None:
    state = {"n": 0}

    def flaky(req: Request) -> Reply:
        state["n"] += 1
        return Reply(status=500) if state["n"] == 1 else Reply()

    with LLMServer(plan=flaky) as server:
        result = _autointerp(server, "--limit", "3", "--max-concurrent", "1")
    assert result.exit_code == 0, result.output
    assert "failures by reason" in result.output


def test_a_bad_key_stops_the_run_and_exits_nonzero(toy_harvest: HarvestRepo) -> None:
    body = json.dumps({"error": {"message": f"bad key {SECRET}"}}).encode()
    with LLMServer(plan=lambda r: Reply(status=401, body=body)) as server:
        result = _autointerp(server, "--max-concurrent", "1")
        assert len(server.requests) == 1
    assert result.exit_code == 1 and "stopped:" in result.output and "HTTP 401" in result.output
    assert SECRET not in result.output


def test_show_escapes_control_characters_and_redacts_keys(toy_harvest: HarvestRepo) -> None:
    evil = "\x1b[2J\x1b]0;pwned\x07 label " + SECRET
    answer = {"label": evil, "confidence": "low", "reasoning": "bell\x07 and " + SECRET}
    with LLMServer(plan=lambda r: Reply(answer=answer)) as server:
        assert _autointerp(server, "--limit", "1").exit_code == 0
    key = next(iter(s.key for s in toy_harvest.summary() if s.firing_count))
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        shown = CliRunner().invoke(app, ["show", ID, key], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\x07" not in shown.output
    assert "\\x1b[2J" in shown.output and SECRET not in shown.output and "***" in shown.output
    assert SECRET.encode() not in labels_db_path(ID).read_bytes()


def test_show_an_unknown_key_lists_the_sites(toy_harvest: HarvestRepo) -> None:
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        result = CliRunner().invoke(app, ["show", ID, "9.nope:3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unknown component '9.nope:3'" in result.output
    for site, n in toy_plugin.SITES:
        assert f"{site} (0-{n - 1})" in result.output


def test_force_labels_again(toy_harvest: HarvestRepo) -> None:
    from spd_host.autointerp.api import load_labels

    with LLMServer() as server:
        assert _autointerp(server, "--limit", "2").exit_code == 0
        with temporary_plugins(("toy", toy_plugin), entry_points=False):
            before = {r.component_key: r.finished_at for r in load_labels(ID)}
        forced = _autointerp(server, "--limit", "2", "--force", "--json")
        assert forced.exit_code == 0 and '"n_labelled": 2' in forced.output
        assert len(server.requests) == 4
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        after = {r.component_key: r.finished_at for r in load_labels(ID)}
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)
