"""base.py's transformers path: a wrong-shaped ``target_model.*`` tensor is a FormatError naming
the checkpoint file and the tensor (not torch's size-mismatch RuntimeError)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.spd.run_writer import LLAMA_PATTERNS, tiny_llama, write_run


def test_wrong_shaped_hf_target_weight_names_file_and_tensor(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(
        run,
        tiny_llama(),
        model_class="transformers.LlamaForCausalLM",
        patterns=dict(LLAMA_PATTERNS),
        fn_type="mlp",
        hidden=[2],
    )
    ckpt = run / "model_200.pth"
    sd = torch.load(ckpt, weights_only=True)
    sd["target_model.model.layers.1.self_attn.v_proj.weight"] = torch.zeros(7, 16)
    torch.save(sd, ckpt)
    adapter = get_host().load_adapter(f"spd:{run}")
    with pytest.raises(
        FormatError,
        match=r"model_200\.pth: tensor 'target_model\.model\.layers\.1\.self_attn\.v_proj\.weight' "
        r"has shape \[7, 16\]",
    ):
        adapter.load_base_model()
