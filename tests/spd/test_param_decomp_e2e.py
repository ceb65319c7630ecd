"""A param-decomp run end to end: `spd-host info`, the spliced forward against an independent
masked forward, harvest and eval fidelity (every splice variant), and the errors of bad runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

pytest.importorskip("orbax.checkpoint")

from spd_host.cli.app import app
from spd_host.errors import FormatError, SourceNotFoundError, SpdHostError
from spd_host.plugins import get_host
from tests.spd import pd_reference as ref
from tests.spd.pd_run_writer import (
    RunSpec,
    site_name,
    sites_of,
    tiny_llama,
    write_pd_run,
)
from tests.spd.test_param_decomp_load import CASES

SPEC = CASES["chunkwise-mha-gelu-first_resid"]


def _run(tmp_path: Path, spec: RunSpec = SPEC, name: str = "p-5e5e5e5e") -> tuple[Path, dict]:
    run_dir = tmp_path / "runs" / name
    params = write_pd_run(run_dir, spec, tiny_llama(), steps=(100,))
    return run_dir, params


def _load(raw: str):
    return get_host().load_adapter(get_host().parse_id(raw))


def test_info_lists_the_sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path)
    monkeypatch.setenv("SPD_HOST_PD_RUNS_DIR", str(tmp_path / "runs"))
    result = CliRunner().invoke(app, ["info", "p-5e5e5e5e", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["decomposition_id"] == "spd:p-5e5e5e5e"
    assert [s["name"] for s in doc["sites"]] == [
        f"{i}.{k}" for i in (0, 1) for k in ("attn.q", "glu.gate", "glu.down")
    ]
    assert doc["n_components"] == 2 * (3 + 4 + 5)
    assert doc["activation_types"] == ["causal_importance", "component_activation"]


def test_ci_masked_splice_matches_an_independent_masked_forward(tmp_path: Path) -> None:
    run_dir, params = _run(tmp_path)
    adapter = _load(f"spd:{run_dir}")
    model = adapter.load_base_model()
    tokens = torch.randint(0, 2048, (2, 6), generator=torch.Generator().manual_seed(0))
    ci, _ = ref.reference_ci(SPEC, params, ref.taps_and_site_inputs(model, tokens))
    hooks = []
    for layer, kind in sites_of(SPEC):
        V, U = (torch.from_numpy(a).double() for a in params["VU"][(layer, kind)])
        mask = torch.from_numpy(ci[site_name(layer, kind)])

        def replace(m, args, out, V=V, U=U, mask=mask):
            return ((args[0].double() @ V) * mask @ U).to(out.dtype)

        hooks.append(
            model.get_submodule(f"model.{site_name(layer, kind)}").register_forward_hook(replace)
        )
    with torch.no_grad():
        want = model(tokens).logits
    for h in hooks:
        h.remove()
    with torch.no_grad():
        clean = model(tokens).logits
        with adapter.splice(model, variant="ci_masked"):
            got = model(tokens).logits
        with adapter.splice(model, variant="zero_mask", sites=["0.glu.down"]):
            zeroed = model(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, clean, atol=1e-3)
    assert not torch.allclose(zeroed, clean, atol=1e-4)


@pytest.mark.slow
def test_harvest_fidelity_autointerp_end_to_end(tmp_path: Path) -> None:
    from spd_host.evals import run_suite
    from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest

    run_dir, _ = _run(tmp_path)
    did = f"spd:{run_dir}"
    cfg = HarvestConfig(
        dataset="demo", n_tokens=256, batch_size=4, seq_len=16, examples_per_component=2
    )
    run_harvest(did, cfg, progress=False)
    summary = HarvestRepo.open(did).summary()
    assert len(summary) == 2 * (3 + 4 + 5)
    assert any(c.firing_count > 0 for c in summary)
    result = run_suite("fidelity", did, dataset="demo", n_tokens=256, seq_len=16, batch_size=4)
    # the deterministic mask variants by default, as for torch-era SPD runs
    assert sorted(result.variants) == ["all_ones", "ci_masked", "rounded_ci", "zero_mask"]
    for v in result.variants:
        row = result.loss_row(variant=v)
        assert np.isfinite(row.ce_spliced) and np.isfinite(row.kl_spliced)
    assert result.loss_row(variant="ci_masked").kl_spliced > 0

    from spd_host.autointerp.api import load_labels
    from spd_host.autointerp.bridge import evidence_from_harvest

    out = CliRunner().invoke(app, ["autointerp", did, "--no-progress"])
    assert out.exit_code == 0, out.output
    fired = [c for c in summary if c.firing_count > 0]
    assert {r.component_key for r in load_labels(did)} == {c.key for c in fired}
    evidence = evidence_from_harvest(HarvestRepo.open(did), fired[0].key)
    assert "also depends on the tokens after it" in evidence.method_description


# ------------------------------------------------------------------------------ bad runs
def test_missing_checkpoints_name_the_ckpts_dir(tmp_path: Path) -> None:
    run_dir, _ = _run(tmp_path)
    for child in (run_dir / "ckpts").iterdir():
        import shutil

        shutil.rmtree(child)
    with pytest.raises(FormatError, match=r"ckpts: no checkpoint step holding a decomposition/"):
        _load(f"spd:{run_dir}")


def _edit_config(run_dir: Path, edit) -> None:
    path = run_dir / "launch_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


def test_unknown_and_unsupported_ci_types_name_the_config(tmp_path: Path) -> None:
    run_dir, _ = _run(tmp_path)
    _edit_config(run_dir, lambda c: c["decomposition"]["ci"].update(type="my_new_ci"))
    with pytest.raises(
        FormatError, match=r"launch_config.yaml: unknown CI function type.*my_new_ci"
    ):
        _load(f"spd:{run_dir}")
    _edit_config(
        run_dir, lambda c: c["decomposition"]["ci"].update(type="moe_chunkwise_transformer")
    )
    with pytest.raises(FormatError, match=r"launch_config.yaml: unsupported CI function type"):
        _load(f"spd:{run_dir}")


def test_shape_mismatch_names_the_checkpoint_and_tensor(tmp_path: Path) -> None:
    run_dir, _ = _run(tmp_path)
    _edit_config(run_dir, lambda c: c["decomposition"]["sites"]["cs"].update(gate=7))
    with pytest.raises(FormatError) as err:
        _load(f"spd:{run_dir}")
    msg = str(err.value)
    assert "ckpts/100/decomposition" in msg and "layers.0.mlp.gate_proj" in msg and "[16, 4]" in msg


def test_ci_type_disagreeing_with_the_checkpoint(tmp_path: Path) -> None:
    run_dir, _ = _run(tmp_path)
    _edit_config(run_dir, lambda c: c["decomposition"]["ci"].update(type="global_transformer"))
    with pytest.raises(FormatError, match=r"checkpoint's CI fn is chunkwise_transformer"):
        _load(f"spd:{run_dir}")


def test_ffn_kind_disagreeing_with_the_checkpoint(tmp_path: Path) -> None:
    run_dir, _ = _run(tmp_path)
    _edit_config(run_dir, lambda c: c["decomposition"]["ci"]["ffn"].update(kind="swiglu"))
    with pytest.raises(
        FormatError, match=r"blocks.0.gate is absent but the config says ffn.kind='swiglu'"
    ):
        _load(f"spd:{run_dir}")


def test_short_id_needs_the_runs_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPD_HOST_PD_RUNS_DIR", raising=False)
    with pytest.raises(SourceNotFoundError, match="SPD_HOST_PD_RUNS_DIR"):
        _load("p-abcd1234")
    monkeypatch.setenv("SPD_HOST_PD_RUNS_DIR", str(tmp_path))
    with pytest.raises(SourceNotFoundError, match=r"p-abcd1234.*not found"):
        _load("p-abcd1234")


def test_missing_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = _run(tmp_path)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # what an absent package looks like
    with pytest.raises(SpdHostError, match=r"spd-host\[jax\]"):
        _load(f"spd:{run_dir}")


def test_deliverable_record_takes_precedence(tmp_path: Path) -> None:
    """A finished run's `deliverable.yaml` (the normalised product) wins over the launch pin."""
    run_dir, _ = _run(tmp_path)
    launch = run_dir / "launch_config.yaml"
    (run_dir / "deliverable.yaml").write_text(launch.read_text())
    launch.write_text(yaml.safe_dump({"historical": "opaque"}))
    adapter = _load(f"spd:{run_dir}")
    assert adapter.defaults.extra["config"] == "deliverable.yaml"
    assert len(adapter.sites) == 6


def test_older_config_shapes_are_reported(tmp_path: Path) -> None:
    """A launch config without decomposition.ci (a ``pd.ci_config`` section: the torch-era
    schema, whose runs are ``experiment_config.yaml`` + ``model_<step>.pth``, see
    test_pd_torch_era.py) next to orbax checkpoints is refused naming the config file."""
    run_dir, _ = _run(tmp_path)

    def older(c: dict) -> None:
        c["pd"]["ci_config"] = c["decomposition"].pop("ci")

    _edit_config(run_dir, older)
    with pytest.raises(FormatError, match=r"launch_config.yaml: no decomposition.ci") as err:
        _load(f"spd:{run_dir}")
    assert "pd.ci_config" in str(err.value)
