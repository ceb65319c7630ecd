"""param-decomp (JAX) runs written with orbax in the trainer's exact layout load by ID and
reproduce CI and component activations against an independent float64 implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("orbax.checkpoint")

from spd_host.adapter import HarvestOptions
from spd_host.plugins import get_host
from tests.spd import pd_reference as ref
from tests.spd.pd_run_writer import RunSpec, site_name, tiny_llama, write_pd_run

ATTN_MHA = {"kind": "mha", "n_heads": 2, "implementation": "xla", "mask": "bidirectional"}
ATTN_GQA = {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "implementation": "xla", "mask": "causal"}

CASES = {
    "chunkwise-mha-gelu-first_resid": RunSpec(
        cs={"q": 3, "gate": 4, "down": 5},
        ci={
            "type": "chunkwise_transformer",
            "blocks_per_chunk": 1,
            "input_tap": "first_block_resid",
            "d_model": 8,
            "n_blocks": 1,
            "attention": ATTN_MHA,
            "ffn": {"kind": "gelu", "hidden": 12},
        },
        stack_pad=1,
    ),
    "chunkwise-mha-gelu-all_site_inputs": RunSpec(  # the older per-site chunk tap
        cs={"q": 3, "k": 2, "o": 2, "gate": 4, "down": 5},
        ci={
            "type": "chunkwise_transformer",
            "blocks_per_chunk": 1,
            "input_tap": "all_site_inputs",
            "d_model": 8,
            "n_blocks": 1,
            "attention": ATTN_MHA,
            "ffn": {"kind": "gelu", "hidden": 12},
        },
    ),
    "chunkwise-gqa-causal-swiglu-norms-all_resids": RunSpec(
        cs={"o": 3, "up": 4},
        ci={
            "type": "chunkwise_transformer",
            "blocks_per_chunk": 2,
            "input_tap": "all_block_resids",
            "d_model": 8,
            "n_blocks": 2,
            "attention": ATTN_GQA,
            "ffn": {"kind": "swiglu", "hidden": 6},
            "learned_norm_scale": True,
        },
    ),
    "global-mha-swiglu-norms-all_block_taps": RunSpec(
        cs={"k": 2, "v": 3, "down": 4},
        ci={
            "type": "global_transformer",
            "input_tap": "all_block_taps",
            "d_model": 8,
            "n_blocks": 2,
            "attention": ATTN_MHA,
            "ffn": {"kind": "swiglu", "hidden": 10},
            "learned_norm_scale": True,
        },
    ),
    "global-gqa-causal-gelu-conditioned-boundaries": RunSpec(
        cs={"q": 3, "gate": 4},
        ci={
            "type": "global_transformer",
            "input_tap": {"kind": "residual_boundaries", "offsets": [0, 2]},
            "d_model": 8,
            "n_blocks": 1,
            "attention": ATTN_GQA,
            "ffn": {"kind": "gelu", "hidden": 8},
            "component_conditioning": {
                "kind": "affine_clipped_component_activation",
                "output_scale_init": 0.5,
                "calibration": {"min_n_tokens": 32768},
            },
        },
    ),
    "chunkwise-zero-blocks": RunSpec(  # n_blocks 0: normed taps -> in_proj -> heads, causal
        cs={"q": 3, "down": 4},
        ci={
            "type": "chunkwise_transformer",
            "blocks_per_chunk": 1,
            "d_model": 8,
            "n_blocks": 0,
            "attention": ATTN_MHA,
            "ffn": {"kind": "gelu", "hidden": 8},
        },
    ),
    "global_mlp-all_block_taps": RunSpec(
        cs={"v": 2, "o": 3, "down": 4},
        ci={"type": "global_mlp", "hidden_dims": [12, 9], "input_tap": "all_block_taps"},
    ),
}


def _tokens(seed: int = 3, vocab: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 7), generator=g)


def _check(
    adapter: Any, spec: RunSpec, params: dict[str, Any], model: Any, vocab: int = 2048
) -> None:
    tokens = _tokens(vocab=vocab)
    taps = (ref.simple_taps if spec.family == "simple_mlp" else ref.taps_and_site_inputs)(
        model, tokens
    )
    want_ci, want_acts = ref.reference_ci(spec, params, taps)
    harvest = get_host().harvest_fn(adapter, HarvestOptions(threshold=0.1))
    batch = harvest(tokens)
    paths = adapter.defaults.extra["module_paths"]
    assert set(batch.activations) == {s.name for s in adapter.sites}
    n_mid = 0
    for site, acts in batch.activations.items():
        name = paths[site].removeprefix("model.")
        ci = acts["causal_importance"].numpy()
        np.testing.assert_allclose(ci, want_ci[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            acts["component_activation"].numpy(), want_acts[name], atol=1e-5, rtol=1e-5
        )
        assert torch.equal(batch.firings[site], acts["causal_importance"] > 0.1)
        n_mid += int(((ci > 0.01) & (ci < 0.99)).sum())
    assert n_mid > 0, "the CI never leaves the clamp: the comparison would be vacuous"
    assert batch.next_token_logits is not None and batch.next_token_logits.shape[:2] == (2, 7)


@pytest.mark.parametrize("case", list(CASES))
def test_ci_matches_independent_reference(tmp_path: Path, case: str) -> None:
    spec = CASES[case]
    model = tiny_llama()
    run_dir = tmp_path / "runs" / "p-0a1b2c3d"
    params = write_pd_run(run_dir, spec, model)
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    assert adapter.defaults.extra["step"] == 100  # the latest checkpoint wins
    assert adapter.defaults.extra["ci_fn_type"] == spec.ci["type"]
    _check(adapter, spec, params, model)


def test_qwen3_target(tmp_path: Path) -> None:
    """A Qwen3 target (q/k norms inside attention; head_dim != d_model / n_heads): o_proj reads
    n_heads * head_dim features, the taps sit at the same module inputs."""
    from tests.spd.pd_run_writer import tiny_qwen3

    spec = RunSpec(
        cs={"q": 2, "o": 3, "up": 4},
        ci={**CASES["global-mha-swiglu-norms-all_block_taps"].ci, "learned_norm_scale": False},
    )
    model = tiny_qwen3()
    run_dir = tmp_path / "p-3e3e3e3e"
    params = write_pd_run(run_dir, spec, model, steps=(100,))
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    assert adapter.base_model_name == str(tmp_path / "p-3e3e3e3e-target")
    _check(adapter, spec, params, model)


def test_legacy_default_item_and_config_yaml_by_short_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-split runs: one `default/` item (the whole TrainState), per-site `vu` components, the
    CI fn without the backbone wrapper, `config.yaml`; loaded as `p-xxxxxxxx` from the runs root."""
    spec = RunSpec(
        cs={"q": 3, "down": 4},
        ci=dict(CASES["chunkwise-mha-gelu-first_resid"].ci),
        layout="legacy",
        config_name="config.yaml",
    )
    model = tiny_llama()
    params = write_pd_run(tmp_path / "runs" / "p-9z8y7x6w", spec, model)
    monkeypatch.setenv("SPD_HOST_PD_RUNS_DIR", str(tmp_path / "runs"))
    for raw in ("p-9z8y7x6w", "spd:p-9z8y7x6w"):
        adapter = get_host().load_adapter(get_host().parse_id(raw))
        assert adapter.defaults.extra["checkpoint"] == "ckpts/100/default"
        assert adapter.defaults.extra["config"] == "config.yaml"
    _check(adapter, spec, params, model)


def test_sites_metadata_and_non_causal_note(tmp_path: Path) -> None:
    spec = CASES["chunkwise-mha-gelu-first_resid"]
    run_dir = tmp_path / "p-11112222"
    write_pd_run(run_dir, spec, tiny_llama(), steps=(100,))
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    names = [s.name for s in adapter.sites]
    assert names == ["0.attn.q", "0.glu.gate", "0.glu.down", "1.attn.q", "1.glu.gate", "1.glu.down"]
    by = {s.name: s for s in adapter.sites}
    assert by["0.glu.down"].n_components == 5 and by["1.attn.q"].n_components == 3
    assert by["0.glu.down"].reads_from == "0.mlp_hidden"
    assert by["0.glu.down"].writes_to == ("0.mlp_out",)
    assert by["1.attn.q"].reads_from == "1.attn_in"
    assert by["1.glu.gate"].reads_from == "1.mlp_in"
    assert adapter.defaults.extra["module_paths"]["1.glu.gate"] == "model." + site_name(1, "gate")
    assert adapter.defaults.extra["ci_causal"] is False
    assert adapter.method.name == "spd" and "param-decomp" in adapter.method.description
    assert "norm of its output direction" not in adapter.method.description  # acts are x V
    note = "also depends on the tokens after it"
    assert note in adapter.method.description and note in by["0.attn.q"].description


def test_causal_ci_is_causal(tmp_path: Path) -> None:
    """A causal-mask CI at position t does not change when later tokens change."""
    spec = CASES["chunkwise-gqa-causal-swiglu-norms-all_resids"]
    run_dir = tmp_path / "p-33334444"
    write_pd_run(run_dir, spec, tiny_llama(), steps=(100,))
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    assert adapter.defaults.extra["ci_causal"] is True
    assert "tokens after it" not in adapter.method.description
    harvest = get_host().harvest_fn(adapter, HarvestOptions())
    a, b = _tokens(1), _tokens(1).clone()
    b[:, 4:] = (b[:, 4:] + 7) % 2048
    ca, cb = harvest(a).activations, harvest(b).activations
    for site in ca:
        x, y = ca[site]["causal_importance"], cb[site]["causal_importance"]
        assert torch.allclose(x[:, :4], y[:, :4], atol=1e-6)
        assert not torch.allclose(x[:, 4:], y[:, 4:], atol=1e-6)


_SHARDED_WRITER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
from pathlib import Path
from tests.spd.pd_run_writer import tiny_llama, write_pd_run
from tests.spd.test_param_decomp_load import CASES
write_pd_run(Path(sys.argv[1]), CASES[sys.argv[2]], tiny_llama(), steps=(100,), sharded=True)
"""


@pytest.mark.slow
def test_checkpoint_saved_from_a_device_mesh(tmp_path: Path) -> None:
    """Real runs save from a multi-device mesh: the checkpoint records shardings over devices
    this process does not have. Written in a subprocess with two (virtual CPU) devices."""
    import os
    import subprocess
    import sys

    from tests.spd.pd_run_writer import make_params

    case = "global-mha-swiglu-norms-all_block_taps"
    run_dir = tmp_path / "p-2d2d2d2d"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_WRITER, str(run_dir), case],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp" in (run_dir / "ckpts/100/decomposition/_sharding").read_text()
    model = tiny_llama()
    params = make_params(CASES[case], model, seed=100)  # the writer's params for step 100
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    _check(adapter, CASES[case], params, model)


def test_hf_weights_in_vendored_target(tmp_path: Path) -> None:
    """``target.spec.kind: hf_weights_in_vendored`` (param-decomp's vendored ``VendoredLlama``
    with HF weights): the HF Llama architecture and weights of ``model_name``."""
    import dataclasses

    run_dir = tmp_path / "runs" / "p-4f4f4f4f"
    base = CASES["global-mha-swiglu-norms-all_block_taps"]
    spec = dataclasses.replace(
        base,
        target_spec={
            "kind": "hf_weights_in_vendored",
            "model_class": "param_decomp.experiments.lm.vendored.llama_3_1.model.VendoredLlama",
            "model_name": str(run_dir.parent / f"{run_dir.name}-target"),
        },
    )
    model = tiny_llama()
    params = write_pd_run(run_dir, spec, model, steps=(100,))
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    assert type(adapter.load_base_model()).__name__ == "LlamaForCausalLM"
    _check(adapter, spec, params, model)
