"""``--base-model`` / ``load_adapter(id, base_model=...)`` and TransformerLens model names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.errors import SourceNotFoundError
from spd_host.models import TL_ALIASES, override_base_model, resolve_model_source
from spd_host.plugins import get_host
from tests.transcoder.test_formats import write_circuit_tracer
from tests.transcoder.test_harvest import model_dir, set_model_name  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _no_overrides() -> Iterator[None]:
    yield
    override_base_model(None)
    for name in ("org/not-in-any-cache",):
        override_base_model(None, name)


@pytest.mark.parametrize(
    ("tl", "hub"),
    [
        ("gpt2-small", "gpt2"),
        ("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped"),
        ("pythia-1.4b", "EleutherAI/pythia-1.4b"),
        ("gemma-2-2b", "google/gemma-2-2b"),
    ],
)
def test_transformerlens_names_map_to_hub_names(tl: str, hub: str) -> None:
    assert TL_ALIASES[tl] == hub and resolve_model_source(tl) == hub


def _dictionary_naming_an_uncached_model(tmp_path: Path) -> Path:
    ct = tmp_path / "ct"
    write_circuit_tracer(ct, 1, gen=torch.Generator().manual_seed(0))
    set_model_name(ct / "config.yaml", "org/not-in-any-cache")
    return ct


def test_load_adapter_with_base_model_uses_it(tmp_path: Path, model_dir: Path) -> None:  # noqa: F811
    ct = _dictionary_naming_an_uncached_model(tmp_path)
    with pytest.raises(SourceNotFoundError):  # without it the dictionary cannot be used
        get_host().load_adapter(f"transcoder:{ct}").load_base_model()
    adapter = get_host().load_adapter(f"transcoder:{ct}", base_model=str(model_dir))
    model = adapter.load_base_model()
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel()
        for p in __import__("transformers")
        .AutoModelForCausalLM.from_pretrained(model_dir)
        .parameters()
    )


def test_cli_base_model_flag(tmp_path: Path, model_dir: Path) -> None:  # noqa: F811
    ct = _dictionary_naming_an_uncached_model(tmp_path)
    runner = CliRunner()
    bad = runner.invoke(
        app, ["harvest", f"transcoder:{ct}", "--base-model", str(tmp_path / "nope")]
    )
    assert bad.exit_code == 1 and "model directory not found" in bad.output
    # the flag is on every command that loads a model
    for argv in (
        ["harvest", "x:y"],
        ["autointerp", "x"],
        ["info", "x"],
        ["show", "x"],
        ["eval", "fidelity", "x"],
        ["eval", "intruder", "x"],
        ["eval", "all", "x"],
    ):
        assert "--base-model" in runner.invoke(app, [*argv, "-h"]).output, argv
