"""Broken MOLT directories fail with FormatError / SourceNotFoundError naming the file and tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from molt_files import random_molt_tensors, write_molt
from safetensors.torch import save_file
from spd_host_molt.format import read_config, read_weights

from spd_host.errors import FormatError, SourceNotFoundError

D = 8
RANKS = {1: 2, 2: 2}


def make(tmp_path: Path, **kw) -> Path:
    sd = random_molt_tensors(D, RANKS, jumprelu=kw.get("act_fn") == "jumprelu")
    return write_molt(tmp_path / "m", sd, d_model=D, ranks=RANKS, **kw)


def load(root: Path) -> None:
    read_weights(root, read_config(root))


def test_good_directory_loads(tmp_path: Path) -> None:
    root = make(tmp_path)
    cfg = read_config(root)
    w = read_weights(root, cfg)
    assert cfg.ranks == (1, 2) and w.n_features == 4 and w.rank_of_features() == [1, 1, 2, 2]


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=r"config\.json"):
        read_config(tmp_path)


def test_not_a_molt(tmp_path: Path) -> None:
    root = make(tmp_path)
    cfg = json.loads((root / "config.json").read_text())
    cfg["sae_type"] = "sae"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="sae_type is 'sae'"):
        read_config(root)


def test_batch_topk_is_refused(tmp_path: Path) -> None:
    root = make(tmp_path, act_fn="batchtopk")
    with pytest.raises(FormatError, match="batchtopk"):
        read_config(root)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    root = make(tmp_path)
    sd = random_molt_tensors(D, RANKS)
    del sd["V_matrices.2"]
    save_file(sd, str(root / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match=r"missing tensor 'V_matrices.2'"):
        load(root)


def test_misshaped_transform_is_named(tmp_path: Path) -> None:
    root = make(tmp_path)
    sd = random_molt_tensors(D, RANKS)
    sd["U_matrices.2"] = torch.zeros(2, D, 3)
    save_file(sd, str(root / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match=r"U_matrices.2.*shape \[2, 8, 3\]"):
        load(root)


def test_group_counts_must_match_encoder(tmp_path: Path) -> None:
    root = make(tmp_path)
    sd = random_molt_tensors(D, RANKS)
    sd["W_E"] = torch.zeros(D, 5)
    sd["b_E"] = torch.zeros(5)
    save_file(sd, str(root / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="hold 4 transforms but W_E has 5"):
        load(root)


def test_pickle_checkpoint_is_not_opened(tmp_path: Path) -> None:
    root = make(tmp_path)
    (root / "sae_weights.safetensors").unlink()
    (root / "sae_weights.pt").write_bytes(b"not opened")
    with pytest.raises(FormatError, match="no MOLT weights") as info:
        load(root)
    assert "never unpickles" in str(info.value)


def test_dataset_wise_needs_norms(tmp_path: Path) -> None:
    root = make(tmp_path, norm_activation="dataset-wise")
    with pytest.raises(FormatError, match=r"dataset_average_activation_norm\.blocks\.1\.ln2"):
        load(root)


def test_jumprelu_needs_thresholds(tmp_path: Path) -> None:
    root = make(tmp_path, act_fn="jumprelu")
    sd = random_molt_tensors(D, RANKS)
    save_file(sd, str(root / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="log_jumprelu_threshold"):
        load(root)
