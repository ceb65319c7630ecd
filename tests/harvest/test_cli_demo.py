"""The harvest CLI on a real demo decomposition: a bad token budget fails before any work."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.data import TokenDatasetSpec, available_tokens
from spd_host.models import load_tokenizer


def test_too_many_tokens_fails_early_with_the_available_count(_isolated_home: Path) -> None:
    spec = TokenDatasetSpec(source="demo", seq_len=128)
    available = available_tokens(spec, load_tokenizer("demo"))
    result = CliRunner().invoke(
        app, ["harvest", "transcoder:demo", "--n-tokens", str(available + 1)]
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # rich wraps long lines
    assert f"holds {available:,} tokens" in text
    assert f"--n-tokens {available} or less" in text
    assert not list((_isolated_home / "results").glob("*/harvest/*/state"))
