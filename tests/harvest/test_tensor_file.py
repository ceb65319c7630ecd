"""The streaming safetensors writer against the safetensors library's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spd_host.harvest.tensor_file import Lazy, save_tensors


def test_every_dtype_and_shape_reads_back_identically(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "i32": torch.randint(-100, 100, (2, 2, 2), generator=g, dtype=torch.int32),
        "bool": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 17, dtype=torch.int32),
        "scalar": torch.tensor(5, dtype=torch.int64),
        "strided": torch.arange(20.0).view(4, 5).T,  # not contiguous: written in logical order
    }
    entries = dict(tensors)
    entries["lazy"] = Lazy(torch.float32, (2, 3), lambda: torch.full((2, 3), 1.5))
    save_tensors(entries, tmp_path / "a.safetensors")
    back = load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == set(entries)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k], t), k
    assert torch.equal(back["lazy"], torch.full((2, 3), 1.5))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_slice("f32")[1:2], tensors["f32"][1:2])


def test_a_lazy_tensor_that_breaks_its_announcement_is_refused(tmp_path: Path) -> None:
    bad = {"x": Lazy(torch.float32, (2,), lambda: torch.zeros(3))}
    with pytest.raises(ValueError, match="announced"):
        save_tensors(bad, tmp_path / "b.safetensors")
