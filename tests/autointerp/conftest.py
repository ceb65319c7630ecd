from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

API_KEYS = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "OPENROUTER_API_KEY",
    "OPENAI_COMPATIBLE_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
)


@pytest.fixture
def fake_batch_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Placeholder keys for both batch providers (the loopback server checks none); opt in
    with ``pytestmark = pytest.mark.usefixtures("fake_batch_keys")``."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real keys, no real home: every test starts from a clean environment."""
    for name in API_KEYS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPD_HOST_HOME", str(tmp_path / "home"))


TOY_ID = "toy:demo"


@pytest.fixture(scope="module")
def _built_harvest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Harvest once per module (a few seconds); each test gets its own copy."""
    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.plugins import temporary_plugins
    from tests.harvest import toy_plugin

    home = tmp_path_factory.mktemp("harvest_home")
    with (
        pytest.MonkeyPatch.context() as mp,
        temporary_plugins(("toy", toy_plugin), entry_points=False),
    ):
        mp.setenv("SPD_HOST_HOME", str(home))
        config = HarvestConfig(
            n_tokens=960,
            batch_size=4,
            seq_len=12,
            examples_per_component=5,
            context_tokens=3,
            output_top_k=5,
            min_token_support=2,
        )
        assert run_harvest(TOY_ID, config, batches=toy_plugin.toy_source(4, 12), progress=False)
    return home / "results"


@pytest.fixture
def toy_harvest(_built_harvest: Path) -> Iterator[Any]:
    from spd_host.harvest import HarvestRepo
    from spd_host.paths import home
    from spd_host.plugins import temporary_plugins
    from tests.harvest import toy_plugin

    shutil.copytree(_built_harvest, home() / "results", dirs_exist_ok=True)
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        yield HarvestRepo.open(TOY_ID)
