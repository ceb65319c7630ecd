"""Each transcoder/SAE format, written exactly as its library writes it, loaded by ID, and
compared with an independent re-implementation of that library's published formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.conftest import add_to_offline_hub

D, N = 8, 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Reference TopK: loop over rows, keep the k largest (indices from a full sort)."""
    flat = pre.reshape(-1, pre.shape[-1])
    out = torch.zeros_like(flat)
    for r in range(flat.shape[0]):
        order = torch.argsort(flat[r], descending=True)[:k]
        out[r, order] = flat[r, order]
    return out.reshape(pre.shape)


# ------------------------------------------------------------------------------- sparsify


def write_sparsify(
    root: Path,
    hookpoint: str,
    *,
    transcode: bool,
    activation: str,
    k: int,
    skip: bool,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    folder = root / hookpoint
    folder.mkdir(parents=True)
    cfg = {
        "activation": activation,
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": N,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {
        "encoder.weight": randn(N, D, gen=gen),
        "encoder.bias": randn(N, gen=gen) * 0.1,
        "W_dec": randn(N, D, gen=gen),
        "b_dec": randn(D, gen=gen),
    }
    if skip:
        t["W_skip"] = randn(D, D, gen=gen)
    save_file(t, str(folder / "sae.safetensors"))
    (root / "config.json").write_text(
        json.dumps({"model": "EleutherAI/pythia-70m", "dataset": "demo", "ctx_len": 64})
    )
    return t


def sparsify_reference(
    t: dict[str, torch.Tensor], x: torch.Tensor, *, transcode: bool, activation: str, k: int
):
    """sparsify: pre = relu(linear(x - b_dec [SAE only])); topk or groupmax; sum of decoder rows."""
    xin = x if transcode else x - t["b_dec"]
    pre = torch.relu(xin @ t["encoder.weight"].T + t["encoder.bias"])
    if activation == "topk":
        acts = topk_dense(pre, k)
    else:
        groups = pre.reshape(*pre.shape[:-1], k, N // k)
        keep = groups == groups.max(dim=-1, keepdim=True).values
        acts = (groups * keep).reshape(pre.shape)
    out = torch.einsum("bn,nd->bd", acts, t["W_dec"]) + t["b_dec"]
    if "W_skip" in t:
        out = out + torch.einsum("bi,oi->bo", x, t["W_skip"])
    return acts, out


@pytest.mark.parametrize(
    "hookpoint,transcode,activation,k,skip,reads,writes",
    [
        ("layers.2", False, "topk", 5, False, "2.resid_post", "2.resid_post"),
        ("layers.3.mlp", True, "groupmax", 4, True, "3.mlp_in", "3.mlp_out"),
        ("layers.1.mlp", True, "topk", 3, False, "1.mlp_in", "1.mlp_out"),
    ],
)
def test_sparsify(
    tmp_path: Path, gen: torch.Generator, hookpoint, transcode, activation, k, skip, reads, writes
) -> None:
    t = write_sparsify(
        tmp_path / "run",
        hookpoint,
        transcode=transcode,
        activation=activation,
        k=k,
        skip=skip,
        gen=gen,
    )
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'run'}")
    [site] = adapter.sites
    layer = int(reads.split(".")[0])
    assert (site.name, site.n_components, site.reads_from, site.writes_to) == (
        f"layer_{layer}",
        N,
        reads,
        (writes,),
    )
    assert adapter.base_model_name == "EleutherAI/pythia-70m"
    assert adapter.defaults.seq_len == 64
    x = randn(16, D, gen=gen) * 2
    acts_ref, out_ref = sparsify_reference(t, x, transcode=transcode, activation=activation, k=k)
    acts = adapter.encode(site.name, x)
    assert rel_err(acts, acts_ref) < 1e-5
    assert rel_err(adapter.reconstruct(site.name, x), out_ref) < 1e-5
    assert int((acts > 0).sum(-1).max()) <= k


def test_sparsify_single_hookpoint_dir(tmp_path: Path, gen: torch.Generator) -> None:
    write_sparsify(
        tmp_path, "layers.0.mlp", transcode=True, activation="topk", k=4, skip=False, gen=gen
    )
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'layers.0.mlp'}")
    assert [s.reads_from for s in adapter.sites] == ["0.mlp_in"]
    assert adapter.base_model_name == "EleutherAI/pythia-70m"  # run config one level up


# ------------------------------------------------------------------------------- SAELens


def write_saelens(
    folder: Path,
    arch: str,
    *,
    gen: torch.Generator,
    d_out: int = D,
    legacy: bool = False,
    extra: dict | None = None,
) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    is_tc = "transcoder" in arch
    hooks = {"hook_name": "blocks.2.ln2.hook_normalized" if is_tc else "blocks.2.hook_resid_pre"}
    if is_tc:
        hooks["hook_name_out"] = "blocks.2.hook_mlp_out"
    cfg: dict = {
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not is_tc,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": arch,
    }
    if is_tc:
        cfg["d_out"] = d_out
    meta = {"model_name": "gpt2", "dataset_path": "demo", "context_size": 32, **hooks}
    if legacy:
        cfg.update(meta)  # SAELens < 6 wrote these at the top level
    else:
        cfg["metadata"] = meta
    cfg.update(extra or {})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {
        "W_enc": randn(D, N, gen=gen),
        "b_enc": randn(N, gen=gen) * 0.1,
        "W_dec": randn(N, d_out, gen=gen),
        "b_dec": randn(d_out, gen=gen),
    }
    if "jumprelu" in arch:
        t["threshold"] = torch.rand(N, generator=gen) * 1.5
    if "skip" in arch:
        t["W_skip"] = randn(d_out, D, gen=gen)
    save_file(t, str(folder / "sae_weights.safetensors"))
    return t


def saelens_reference(t, x, *, arch: str, k: int | None = None, rescale: bool = False):
    """SAELens: hidden_pre = (x - b_dec [SAEs]) @ W_enc + b_enc; activation; acts @ W_dec + b_dec."""
    is_tc = "transcoder" in arch
    xin = x if is_tc else x - t["b_dec"]
    pre = xin @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    if "jumprelu" in arch:
        acts = torch.where(pre > t["threshold"], torch.relu(pre), torch.zeros_like(pre))
    elif k is not None:
        acts = torch.relu(topk_dense(pre, k))
    else:
        acts = torch.relu(pre)
    dec_in = acts / norms if rescale else acts
    out = dec_in @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return acts, out


@pytest.mark.parametrize(
    "arch,legacy,extra,k,rescale",
    [
        ("standard", True, {"activation_fn_str": "relu"}, None, False),
        ("standard", False, {}, None, False),
        ("jumprelu", False, {}, None, False),
        ("topk", False, {"k": 6}, 6, False),
        ("topk", False, {"k": 6, "rescale_acts_by_decoder_norm": True}, 6, True),
        (
            "standard",
            True,
            {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}},
            7,
            False,
        ),
        ("transcoder", False, {}, None, False),
        ("skip_transcoder", False, {}, None, False),
        ("jumprelu_transcoder", False, {}, None, False),
        ("jumprelu_skip_transcoder", False, {}, None, False),
    ],
)
def test_saelens(tmp_path: Path, gen: torch.Generator, arch, legacy, extra, k, rescale) -> None:
    t = write_saelens(tmp_path / "sae", arch, gen=gen, legacy=legacy, extra=extra)
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'sae'}")
    [site] = adapter.sites
    is_tc = "transcoder" in arch
    assert site.name == "layer_2"
    assert site.reads_from == ("2.mlp_in" if is_tc else "2.resid_pre")
    assert site.writes_to == (("2.mlp_out",) if is_tc else ("2.resid_pre",))
    assert adapter.base_model_name == "gpt2"
    x = randn(16, D, gen=gen) * 2
    acts_ref, out_ref = saelens_reference(t, x, arch=arch, k=k, rescale=rescale)
    acts = adapter.encode(site.name, x)
    assert (acts > 0).any() and (acts == 0).any()
    assert rel_err(acts, acts_ref) < 1e-5
    assert rel_err(adapter.reconstruct(site.name, x), out_ref) < 1e-5


def test_saelens_transcoder_with_different_output_width(
    tmp_path: Path, gen: torch.Generator
) -> None:
    t = write_saelens(tmp_path / "tc", "transcoder", gen=gen, d_out=5)
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'tc'}")
    x = randn(4, D, gen=gen)
    _, out_ref = saelens_reference(t, x, arch="transcoder")
    out = adapter.reconstruct("layer_2", x)
    assert out.shape == (4, 5) and rel_err(out, out_ref) < 1e-5


def test_saelens_release_with_several_layers(tmp_path: Path, gen: torch.Generator) -> None:
    write_saelens(tmp_path / "rel" / "a", "standard", gen=gen)
    cfg_b = tmp_path / "rel" / "b"
    write_saelens(cfg_b, "standard", gen=gen)
    cfg = json.loads((cfg_b / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.4.hook_resid_post"
    (cfg_b / "cfg.json").write_text(json.dumps(cfg))
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'rel'}")
    assert [(s.name, s.reads_from) for s in adapter.sites] == [
        ("layer_2", "2.resid_pre"),
        ("layer_4", "4.resid_post"),
    ]


# ------------------------------------------------------------------------------- circuit-tracer


def write_circuit_tracer(
    root: Path,
    n_layers: int,
    *,
    gen: torch.Generator,
    activation: str | None = None,
    k: int | None = None,
    threshold: bool = False,
    skip: bool = False,
    hooks=("mlp.hook_in", "mlp.hook_out"),
) -> list[dict[str, torch.Tensor]]:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_kind": "transcoder_set",
        "model_name": "gpt2",
        "feature_input_hook": hooks[0],
        "feature_output_hook": hooks[1],
        "scan": "test/scan",
    }
    if activation:
        cfg["activation"] = activation
    if k is not None:
        cfg["k"] = k
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    layers = []
    for i in range(n_layers):
        t = {
            "W_enc": randn(N, D, gen=gen),
            "W_dec": randn(N, D, gen=gen),
            "b_enc": randn(N, gen=gen) * 0.1,
            "b_dec": randn(D, gen=gen),
        }
        if threshold:
            t["activation_function.threshold"] = randn(N, gen=gen) * 0.5  # some negative
        if skip:
            t["W_skip"] = randn(D, D, gen=gen)
        save_file(t, str(root / f"layer_{i}.safetensors"))
        layers.append(t)
    return layers


def circuit_tracer_reference(t, x, *, k: int | None = None):
    """circuit-tracer: F.linear(x, W_enc, b_enc); JumpReLU x*(x>thr) / TopK gate (no clamp) / relu."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    if "activation_function.threshold" in t:
        acts = pre * (pre > t["activation_function.threshold"]).float()
    elif k is not None:
        acts = topk_dense(pre, k)
    else:
        acts = torch.relu(pre)
    out = acts @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].T
    return acts, out


@pytest.mark.parametrize(
    "activation,k,threshold,skip",
    [
        (None, None, False, False),
        ("relu", None, False, True),
        (None, None, True, False),
        ("topk", 4, False, False),
    ],
)
def test_circuit_tracer(
    tmp_path: Path, gen: torch.Generator, activation, k, threshold, skip
) -> None:
    layers = write_circuit_tracer(
        tmp_path / "ct", 3, gen=gen, activation=activation, k=k, threshold=threshold, skip=skip
    )
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'ct'}")
    assert [(s.name, s.reads_from, s.writes_to) for s in adapter.sites] == [
        (f"layer_{i}", f"{i}.mlp_in", (f"{i}.mlp_out",)) for i in range(3)
    ]
    x = randn(16, D, gen=gen) * 2
    for i, t in enumerate(layers):
        acts_ref, out_ref = circuit_tracer_reference(t, x, k=k)
        assert rel_err(adapter.encode(f"layer_{i}", x), acts_ref) < 1e-5
        assert rel_err(adapter.reconstruct(f"layer_{i}", x), out_ref) < 1e-5
    if (
        threshold
    ):  # negative thresholds let negative pre-activations through, as circuit-tracer does
        assert (adapter.encode("layer_0", x) < 0).any()


def test_circuit_tracer_resid_mid_hooks(tmp_path: Path, gen: torch.Generator) -> None:
    write_circuit_tracer(tmp_path / "ct", 2, gen=gen, hooks=("hook_resid_mid", "hook_mlp_out"))
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'ct'}")
    assert [s.reads_from for s in adapter.sites] == ["0.resid_mid", "1.resid_mid"]


def test_load_by_hf_id_from_offline_cache(
    tmp_path: Path, gen: torch.Generator, offline_hub: Path
) -> None:
    layers = write_circuit_tracer(tmp_path / "ct", 2, gen=gen, threshold=True)
    files = {f"sub/{p.name}": p.read_bytes() for p in (tmp_path / "ct").iterdir()}
    add_to_offline_hub(offline_hub, "someone/transcoders", files)
    adapter = get_host().load_adapter("transcoder:hf:someone/transcoders/sub")
    assert adapter.decomposition_id == "transcoder:hf:someone/transcoders/sub"
    x = randn(5, D, gen=gen)
    acts_ref, _ = circuit_tracer_reference(layers[1], x)
    assert rel_err(adapter.encode("layer_1", x), acts_ref) < 1e-5


# ------------------------------------------------------------------------------- bad inputs


def load(path: Path):
    return get_host().load_adapter(f"transcoder:{path}")


def test_missing_tensor_names_file_and_tensor(tmp_path: Path, gen: torch.Generator) -> None:
    write_circuit_tracer(tmp_path / "ct", 2, gen=gen)
    save_file(
        {"W_enc": randn(N, D, gen=gen), "W_dec": randn(N, D, gen=gen), "b_enc": randn(N, gen=gen)},
        str(tmp_path / "ct" / "layer_1.safetensors"),
    )
    with pytest.raises(FormatError, match=r"layer_1\.safetensors: missing tensor 'b_dec'"):
        load(tmp_path / "ct")


def test_wrong_shape_names_file_and_tensor(tmp_path: Path, gen: torch.Generator) -> None:
    t = write_saelens(tmp_path / "sae", "standard", gen=gen)
    t["W_enc"] = t["W_enc"].T.contiguous()  # sparsify/circuit-tracer orientation in a SAELens file
    save_file(t, str(tmp_path / "sae" / "sae_weights.safetensors"))
    with pytest.raises(
        FormatError,
        match=r"sae_weights\.safetensors: tensor 'W_enc' has shape \[32, 8\], expected \[8, 32\]",
    ):
        load(tmp_path / "sae")


@pytest.mark.parametrize("fmt", ["saelens", "circuit-tracer"])
def test_threshold_of_wrong_length(tmp_path: Path, gen: torch.Generator, fmt: str) -> None:
    if fmt == "saelens":
        t = write_saelens(tmp_path / "d", "jumprelu", gen=gen)
        t["threshold"] = t["threshold"][:-1].clone()
        save_file(t, str(tmp_path / "d" / "sae_weights.safetensors"))
        key = "threshold"
    else:
        [t] = write_circuit_tracer(tmp_path / "d", 1, gen=gen, threshold=True)
        t["activation_function.threshold"] = randn(N + 3, gen=gen)
        save_file(t, str(tmp_path / "d" / "layer_0.safetensors"))
        key = "activation_function.threshold"
    with pytest.raises(FormatError, match=rf"tensor '{key}' has shape \[\d+\], expected \[32\]"):
        load(tmp_path / "d")


@pytest.mark.parametrize("fmt", ["sparsify", "saelens", "saelens-arch", "circuit-tracer"])
def test_unknown_activation(tmp_path: Path, gen: torch.Generator, fmt: str) -> None:
    if fmt == "sparsify":
        write_sparsify(
            tmp_path / "d",
            "layers.0.mlp",
            transcode=True,
            activation="topk",
            k=4,
            skip=False,
            gen=gen,
        )
        p = tmp_path / "d" / "layers.0.mlp" / "cfg.json"
        cfg = json.loads(p.read_text())
        cfg["activation"] = "softplus"
        p.write_text(json.dumps(cfg))
        match = r"cfg\.json: unknown activation 'softplus'"
    elif fmt == "saelens":
        write_saelens(
            tmp_path / "d",
            "standard",
            gen=gen,
            legacy=True,
            extra={"activation_fn_str": "tanh-relu"},
        )
        match = r"cfg\.json: unknown activation 'tanh-relu'"
    elif fmt == "saelens-arch":
        write_saelens(tmp_path / "d", "gated", gen=gen)
        match = r"cfg\.json: unknown SAELens architecture 'gated'"
    else:
        write_circuit_tracer(tmp_path / "d", 1, gen=gen, activation="gelu")
        match = r"config\.yaml: unknown activation 'gelu'"
    with pytest.raises(FormatError, match=match):
        load(tmp_path / "d")


def test_unmappable_hook_name(tmp_path: Path, gen: torch.Generator) -> None:
    write_circuit_tracer(tmp_path / "ct", 1, gen=gen, hooks=("attn.hook_z", "hook_mlp_out"))
    with pytest.raises(
        FormatError, match=r"config\.yaml \(layer 0\): hook 'blocks\.0\.attn\.hook_z'"
    ):
        load(tmp_path / "ct")


def test_missing_layer_file(tmp_path: Path, gen: torch.Generator) -> None:
    write_circuit_tracer(tmp_path / "ct", 3, gen=gen)
    (tmp_path / "ct" / "layer_1.safetensors").unlink()
    with pytest.raises(FormatError, match=r"missing layer_1\.safetensors"):
        load(tmp_path / "ct")


def test_ambiguous_and_unknown_directories(tmp_path: Path, gen: torch.Generator) -> None:
    write_saelens(tmp_path / "both", "standard", gen=gen)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "both" / "sae.safetensors"))
    with pytest.raises(
        FormatError, match=r"ambiguous transcoder directory: it matches saelens, sparsify"
    ):
        load(tmp_path / "both")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    with pytest.raises(
        FormatError,
        match=r"not a transcoder directory in any known format \(found: \['README\.md'\]\)",
    ):
        load(tmp_path / "empty")


def test_clt_directory_points_to_clt_method(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder"}))
    with pytest.raises(FormatError, match=r"hint: load it with the clt method"):
        load(tmp_path)


def test_two_dictionaries_on_one_layer_get_hook_kind_names(
    tmp_path: Path, gen: torch.Generator
) -> None:
    write_sparsify(
        tmp_path / "run", "layers.1", transcode=False, activation="topk", k=3, skip=False, gen=gen
    )
    (tmp_path / "run" / "config.json").unlink()
    write_sparsify(
        tmp_path / "run",
        "layers.1.mlp",
        transcode=True,
        activation="topk",
        k=3,
        skip=False,
        gen=gen,
    )
    adapter = load(tmp_path / "run")
    assert sorted((s.name, s.reads_from) for s in adapter.sites) == [
        ("layer_1.mlp_in", "1.mlp_in"),
        ("layer_1.resid_post", "1.resid_post"),
    ]


def test_metadata_reads_no_weights(
    tmp_path: Path, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spd_adapters._files import TensorFile
    from spd_host.cli.info_cmd import describe_adapter

    write_circuit_tracer(tmp_path / "ct", 2, gen=gen, threshold=True)

    def no_reads(self, key, dtype=None):
        raise AssertionError(f"weights read for metadata: {key}")

    monkeypatch.setattr(TensorFile, "get", no_reads)
    doc = describe_adapter(load(tmp_path / "ct"))
    assert doc["n_components"] == 2 * N and doc["method"]["name"] == "transcoder"
