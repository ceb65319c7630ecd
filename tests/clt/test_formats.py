"""circuit-tracer CLTs written as ``CrossLayerTranscoder.to_safetensors`` writes them, loaded by
ID and compared with a dense re-implementation of the published formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from spd_adapters._files import TensorFile
from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.conftest import add_to_offline_hub

L, N, D = 3, 24, 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def write_clt(
    root: Path, *, gen: torch.Generator, threshold: bool = True, cfg_extra: dict | None = None
) -> dict[str, list[torch.Tensor]]:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "model_name": "gpt2",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        **(cfg_extra or {}),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    w: dict[str, list[torch.Tensor]] = {
        "W_enc": [],
        "b_enc": [],
        "b_dec": [],
        "threshold": [],
        "W_dec": [],
    }
    for i in range(L):
        enc = {
            f"W_enc_{i}": torch.randn(N, D, generator=gen),
            f"b_enc_{i}": torch.randn(N, generator=gen) * 0.1,
            f"b_dec_{i}": torch.randn(D, generator=gen),
        }
        if threshold:
            enc[f"threshold_{i}"] = torch.randn(N, generator=gen) * 0.5
        save_file(enc, str(root / f"W_enc_{i}.safetensors"))
        dec = torch.randn(N, L - i, D, generator=gen)
        save_file({f"W_dec_{i}": dec}, str(root / f"W_dec_{i}.safetensors"))
        for key in ("W_enc", "b_enc", "b_dec", "threshold"):
            if f"{key}_{i}" in enc:
                w[key].append(enc[f"{key}_{i}"])
        w["W_dec"].append(dec)
    return w


def reference(
    w: dict[str, list[torch.Tensor]], xs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense circuit-tracer CLT: acts[l] = jumprelu(x_l W_enc_l^T + b_enc_l); out[j] = b_dec_j +
    sum_{i<=j} acts_i W_dec_i[:, j-i]. ``xs`` is [L, B, D]."""
    pre = (
        torch.einsum("lbd,lfd->lbf", xs, torch.stack(w["W_enc"])) + torch.stack(w["b_enc"])[:, None]
    )
    if w["threshold"]:
        acts = pre * (pre > torch.stack(w["threshold"])[:, None]).float()
    else:
        acts = torch.relu(pre)
    full = torch.zeros(L, N, L, D)  # [source, feature, target, d]
    for i, dec in enumerate(w["W_dec"]):
        full[i, :, i:, :] = dec
    out = torch.einsum("ibf,iftd->tbd", acts, full) + torch.stack(w["b_dec"])[:, None]
    return acts, out


@pytest.mark.parametrize("threshold", [True, False])
def test_clt_encode_and_reconstruct(tmp_path: Path, threshold: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    w = write_clt(tmp_path / "clt", gen=gen, threshold=threshold)
    adapter = get_host().load_adapter(f"clt:{tmp_path / 'clt'}")
    assert [s.name for s in adapter.sites] == ["layer_0", "layer_1", "layer_2"]
    assert adapter.sites[1].reads_from == "1.resid_mid"
    assert adapter.sites[1].writes_to == ("1.mlp_out", "2.mlp_out")
    assert all(s.n_components == N for s in adapter.sites)
    assert adapter.base_model_name == "gpt2"
    assert list(adapter.activation_types) == ["activation"]
    xs = torch.randn(L, 10, D, generator=gen) * 2
    acts_ref, out_ref = reference(w, xs)
    for i in range(L):
        assert rel_err(adapter.encode(f"layer_{i}", xs[i]), acts_ref[i]) < 1e-5
    recon = adapter.reconstruct({f"layer_{i}": xs[i] for i in range(L)})
    for j in range(L):
        assert rel_err(recon[f"layer_{j}"], out_ref[j]) < 1e-5
    # only the first two source layers given: layers 0 and 1 can still be reconstructed
    partial = adapter.reconstruct({"layer_0": xs[0], "layer_1": xs[1]})
    assert set(partial) == {"layer_0", "layer_1"}


def test_decoders_are_read_a_slice_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(2)
    w = write_clt(tmp_path / "clt", gen=gen)
    real_get = TensorFile.get

    def no_whole_decoders(self: TensorFile, key: str, dtype=torch.float32):
        assert not key.startswith("W_dec_"), f"whole decoder {key} was loaded"
        return real_get(self, key, dtype)

    monkeypatch.setattr(TensorFile, "get", no_whole_decoders)
    adapter = get_host().load_adapter(f"clt:{tmp_path / 'clt'}")
    adapter.clt.decoder_cache_bytes = 0  # nothing cached: every use re-reads its slice
    xs = torch.randn(L, 4, D, generator=gen)
    _, out_ref = reference(w, xs)
    recon = adapter.reconstruct({f"layer_{i}": xs[i] for i in range(L)})
    assert rel_err(recon["layer_2"], out_ref[2]) < 1e-5
    assert adapter.clt.decoder_reads == L * (L + 1) // 2  # one [n, d] slice per (source, target)


def test_clt_by_hf_id(tmp_path: Path, offline_hub: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    w = write_clt(tmp_path / "clt", gen=gen)
    add_to_offline_hub(
        offline_hub, "org/clt-repo", {p.name: p.read_bytes() for p in (tmp_path / "clt").iterdir()}
    )
    adapter = get_host().load_adapter("clt:hf:org/clt-repo")
    x = torch.randn(3, D, generator=gen)
    acts_ref, _ = reference(w, torch.stack([x] * L))
    assert rel_err(adapter.encode("layer_2", x), acts_ref[2]) < 1e-5


def load(path: Path):
    return get_host().load_adapter(f"clt:{path}")


def test_missing_decoder_file(tmp_path: Path) -> None:
    write_clt(tmp_path, gen=torch.Generator().manual_seed(0))
    (tmp_path / "W_dec_1.safetensors").unlink()
    with pytest.raises(FormatError, match=r"W_dec_1\.safetensors: file not found"):
        load(tmp_path)


def test_missing_tensor(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    write_clt(tmp_path, gen=gen)
    save_file(
        {"W_enc_2": torch.randn(N, D), "b_enc_2": torch.randn(N), "threshold_2": torch.randn(N)},
        str(tmp_path / "W_enc_2.safetensors"),
    )
    with pytest.raises(FormatError, match=r"W_enc_2\.safetensors: missing tensor 'b_dec_2'"):
        load(tmp_path)


def test_decoder_of_wrong_shape(tmp_path: Path) -> None:
    write_clt(tmp_path, gen=torch.Generator().manual_seed(0))
    save_file({"W_dec_1": torch.randn(N, L, D)}, str(tmp_path / "W_dec_1.safetensors"))
    with pytest.raises(
        FormatError,
        match=r"W_dec_1\.safetensors: tensor 'W_dec_1' has shape \[24, 3, 8\], expected \[24, 2, 8\]",
    ):
        load(tmp_path)


def test_threshold_of_wrong_length(tmp_path: Path) -> None:
    write_clt(tmp_path, gen=torch.Generator().manual_seed(0))
    save_file(
        {
            "W_enc_1": torch.randn(N, D),
            "b_enc_1": torch.randn(N),
            "b_dec_1": torch.randn(D),
            "threshold_1": torch.randn(N - 1),
        },
        str(tmp_path / "W_enc_1.safetensors"),
    )
    with pytest.raises(
        FormatError, match=r"tensor 'threshold_1' has shape \[23\], expected \[24\]"
    ):
        load(tmp_path)


def test_unknown_activation(tmp_path: Path) -> None:
    write_clt(tmp_path, gen=torch.Generator().manual_seed(0), cfg_extra={"activation": "softmax"})
    with pytest.raises(FormatError, match=r"config\.yaml: unknown activation 'softmax'"):
        load(tmp_path)


def test_transcoder_set_points_to_transcoder_method(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set"}))
    with pytest.raises(
        FormatError, match=r"hint: per-layer transcoders load with the transcoder method"
    ):
        load(tmp_path)
