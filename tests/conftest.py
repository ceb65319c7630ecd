"""Project-wide test fixtures: every test gets its own SPD_HOST_HOME and a fresh plugin host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("spd_host_home")
    monkeypatch.setenv("SPD_HOST_HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from spd_host.plugins import reset_host

    reset_host()
    yield home
    reset_host()
    _teardown_wandb()


def _teardown_wandb() -> None:
    """Drop wandb's process-wide singleton, if a test created one.

    ``wandb.Api()`` (artifact and run look-ups) sets up a singleton that keeps the settings of
    the moment, e.g. that test's ``WANDB_DIR``; a later test's ``wandb.init`` would then write
    its offline run into the earlier test's directory.
    """
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, offline Hugging Face Hub cache directory (``models--owner--repo/...``).

    huggingface_hub reads its cache location and offline flag at import time, so both the
    environment and the already-imported constants are pointed at the temporary cache.
    """
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hf_hub_cache"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hub


def add_to_offline_hub(hub: Path, repo_id: str, files: dict[str, bytes | str]) -> Path:
    """Write ``files`` as one snapshot of ``repo_id`` in the Hub cache layout; return the snapshot dir."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel, content in files.items():
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
