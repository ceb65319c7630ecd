"""The harvest bar ends at 100% even when the last batch is short (300 tokens in batches of
4 x 32: the plan is 3 batches = 384 tokens, the data yields 10 sequences = 320)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from spd_host.cli.app import app


@pytest.mark.slow
def test_harvest_bar_ends_at_100_percent() -> None:
    argv = ["harvest", "transcoder:demo", "--n-tokens", "300", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*argv, "--seq-len", "32"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    (bar,) = [line for line in result.output.splitlines() if line.startswith("harvest ")]
    assert re.search(r"\b320/320\s+100%", bar), bar
