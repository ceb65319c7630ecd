"""The goodfire convention on a tiny SPD run, against Goodfire's ``CEandKLLosses`` /
``CI_L0`` formulas written out here: rounded masks ``ci > rounding_threshold`` (the run's own,
from ``eval_metric_configs``), the ``zero_masked`` baseline (each module outputs only its
bias), per-batch CE / KL / ce_unrecovered weighted by ``B*S``, L0 at ``ci_alive_threshold`` as
the mean of per-batch L0s, and the stochastic mask ``ci + (1 - ci) u`` plus the weight delta
masked by one uniform per position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.fidelity import fidelity_on_batches
from spd_host.plugins import get_host

run_writer = pytest.importorskip("tests.spd.run_writer")
ref = pytest.importorskip("tests.spd.reference")

PATTERNS = {"model.layers.*.mlp.down_proj": 24, "model.layers.1.self_attn.o_proj": 16}
ROUNDING, ALIVE = 0.1, 0.05


@pytest.fixture
def run(tmp_path: Path):
    model = run_writer.tiny_llama()
    sd = run_writer.write_run(
        tmp_path / "run",
        model,
        model_class="transformers.LlamaForCausalLM",
        patterns=PATTERNS,
        fn_type="vector_mlp",
        hidden=[3],
    )
    cfg_path = tmp_path / "run" / "final_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["eval_metric_configs"] = [
        {"classname": "CI_L0", "groups": None},
        {"classname": "CEandKLLosses", "rounding_threshold": ROUNDING},
    ]
    cfg["ci_alive_threshold"] = ALIVE
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    return adapter, sd, run_writer.expand(model, PATTERNS)


def _hand(model, sd, paths, tokens, mask_fn, delta_r=None):
    """Logits with every decomposed module replaced by ((x V) * mask) U (+ r * delta)."""
    xs: dict[str, torch.Tensor] = {}
    hs = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, _p=p: xs.__setitem__(_p, a[0])
        )
        for p in paths
    ]
    with torch.no_grad():
        clean = model(tokens).logits.double()
    for h in hs:
        h.remove()
    ci = {
        p: ref.sigmoid("leaky_hard", ref.pre_sigmoid_layerwise(sd, "vector_mlp", p, xs[p], False))
        for p in paths
    }
    masks = {p: mask_fn(p, ci[p]) for p in paths}

    def hook(m, a, out, _p):
        name = _p.replace(".", "-")
        V, U = sd[f"_components.{name}.V"], sd[f"_components.{name}.U"]
        new = ((a[0] @ V) * masks[_p]) @ U
        if delta_r is not None:
            delta = out - (a[0] @ V) @ U  # x (W - (V U)^T), Llama has no bias
            new = new + delta_r(_p, delta.shape[:-1]).unsqueeze(-1) * delta
        return new

    hs = [
        model.get_submodule(p).register_forward_hook(lambda m, a, o, _p=p: hook(m, a, o, _p))
        for p in paths
    ]
    with torch.no_grad():
        logits = model(tokens).logits.double()
    for h in hs:
        h.remove()
    return clean, logits, ci


def _ce(logits, b):
    labels = b.clone()
    labels[:, 0] = -100
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1])[:-1], labels.reshape(-1)[1:], ignore_index=-100
    ).item()


def _kl(pred, target):
    return (
        F.kl_div(F.log_softmax(pred, -1), F.softmax(target, -1), reduction="none")
        .sum(-1)
        .mean()
        .item()
    )


def test_goodfire_rounded_ci_baseline_and_l0(run) -> None:
    adapter, sd, module_to_c = run
    paths = sorted(module_to_c)
    model = adapter.load_base_model()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 61, (1, 9), generator=g), torch.randint(0, 61, (4, 9), generator=g)]
    cfg = FidelityConfig(
        use_harvest=False, convention="goodfire", per_site=False, variants=("rounded_ci",)
    )
    res = fidelity_on_batches(adapter, batches, cfg)
    assert res.baseline == "splice variant zero_mask"
    assert res.peer_names["rounded_ci"] == "rounded_masked"
    tot = {"unrec": 0.0, "kl": 0.0, "kl0": 0.0}
    l0s: dict[str, list[float]] = {p: [] for p in paths}
    n = 0
    for b in batches:
        clean, rounded, ci = _hand(model, sd, paths, b, lambda p, c: (c > ROUNDING).float())
        _, zero, _ = _hand(model, sd, paths, b, lambda p, c: torch.zeros_like(c))
        t, s, z = _ce(clean, b), _ce(rounded, b), _ce(zero, b)
        w = b.numel()
        tot["unrec"] += (s - t) / (z - t) * w
        tot["kl"] += _kl(rounded, clean) * w
        tot["kl0"] += _kl(zero, clean) * w
        n += w
        for p in paths:
            l0s[p].append((ci[p] > ALIVE).float().sum(-1).mean().item())
    row = res.loss_row("all", "rounded_ci")
    # a ratio of CE differences: float32 rounding of the forwards, relative
    assert row.ce_unrecovered == pytest.approx(tot["unrec"] / n, rel=1e-4)
    assert row.kl_spliced == pytest.approx(tot["kl"] / n, abs=1e-5)
    assert row.kl_ablated == pytest.approx(tot["kl0"] / n, abs=1e-5)
    by_path = adapter.site_names_by_path()
    for p in paths:
        (sp,) = [s for s in res.sparsity if s.site == by_path[p]]
        assert sp.l0 == pytest.approx(sum(l0s[p]) / len(l0s[p]), abs=1e-6)
    # the spd-host convention rounds at 0.5 and pools: a different number on the same tokens
    other = fidelity_on_batches(adapter, batches, cfg.model_copy(update={"convention": "spd-host"}))
    assert abs(other.loss_row("all", "rounded_ci").kl_spliced - row.kl_spliced) > 1e-6


def test_goodfire_stochastic_mask_and_weight_delta(run) -> None:
    adapter, sd, module_to_c = run
    paths = sorted(module_to_c)
    model = adapter.load_base_model()
    tokens = torch.randint(0, 61, (3, 8), generator=torch.Generator().manual_seed(4))
    cfg = FidelityConfig(
        use_harvest=False,
        convention="goodfire",
        per_site=False,
        variants=("stochastic",),
        seed_masks=11,
    )
    res = fidelity_on_batches(adapter, [tokens], cfg)
    # the same draws in the same order: one source per module (sorted paths) when the masks
    # are built, then one uniform per position for each module's delta as the forward reaches it
    torch.manual_seed(11)
    drawn: dict[str, torch.Tensor] = {}

    def mask(p, c):
        drawn[p] = torch.rand(c.shape)
        return c + (1 - c) * drawn[p]

    def delta_r(p, shape):
        return torch.rand(shape)

    clean, stoch, _ = _hand(model, sd, paths, tokens, mask, delta_r)
    row = res.loss_row("all", "stochastic")
    assert row.kl_spliced == pytest.approx(_kl(stoch, clean), abs=1e-5)
    assert row.kl_spliced > 1e-6
