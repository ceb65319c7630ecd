"""IDs: ``molt:<dir>``, ``molt:hf:<owner>/<repo>/<name>`` (Llamascopium's ``<repo_id>:<name>``), no demo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from molt_files import random_molt_tensors, write_molt

pytest.importorskip(
    "spd_host.topology", reason="spd_host.topology (branch topology) not merged yet"
)

import spd_host_molt.plugin as molt_plugin

import spd_host
from spd_host.errors import SourceNotFoundError

RANKS = {2: 3, 8: 1}


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Hugging Face cache (``models--owner--repo/snapshots/<commit>``), offline."""
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_subdirectory_is_one_molt(offline_hub: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--org--molts"
    snapshot = repo / "snapshots" / commit
    for layer in (0, 1):  # a Hub repo holding one MOLT per layer, as Llamascopium publishes them
        write_molt(
            snapshot / f"L{layer}",
            random_molt_tensors(8, RANKS),
            d_model=8,
            ranks=RANKS,
            layer=layer,
            lm={"model_name": "org/base-model"},
        )
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    with spd_host.temporary_plugins(("molt", molt_plugin), entry_points=False):
        adapter = spd_host.load_adapter("molt:hf:org/molts/L1")
    assert adapter.decomposition_id == "molt:hf:org/molts/L1"
    assert adapter.base_model_name == "org/base-model"
    (site,) = adapter.sites
    assert (site.n_components, site.reads_from, site.writes_to) == (4, "1.mlp_in", ("1.mlp_out",))
    assert isinstance(adapter, spd_host.DecompositionAdapter)
    assert torch.equal(
        adapter.molt().w.U[8],
        random_molt_tensors(8, RANKS)["U_matrices.8"],  # type: ignore[attr-defined]
    )


def test_demo_is_refused_with_a_hint() -> None:
    with (
        spd_host.temporary_plugins(("molt", molt_plugin), entry_points=False),
        pytest.raises(SourceNotFoundError, match="no demo") as info,
    ):
        spd_host.load_adapter("molt:demo")
    assert "molt:<dir>" in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with (
        spd_host.temporary_plugins(("molt", molt_plugin), entry_points=False),
        pytest.raises(SourceNotFoundError, match="no such file or directory"),
    ):
        spd_host.load_adapter(f"molt:{tmp_path / 'nope'}")
