"""The short, seeded trainers behind ``transcoder:demo`` and ``clt:demo``.

They train on the bundled demo model (``spd_host.models.load_base_model("demo")``) and write
the result in circuit-tracer's on-disk layout, so that loading a demo goes through the same
reader as a published decomposition. Recipe (kept deliberately simple and CPU-friendly):

1. capture ``{i}.mlp_in`` and ``{i}.mlp_out`` for every layer on ``N_TOKENS`` training tokens;
2. train ReLU encoders/decoders with Adam on normalised MSE plus a decoder-norm-weighted L1
   penalty whose coefficient is steered towards a target L0 (so sparsity does not need tuning);
3. turn ReLU into JumpReLU with per-feature thresholds that drop each feature's weakest
   firings, then refit the decoders (and output biases) exactly by least squares given the
   final sparse codes;
4. save, reload through the real loader, and measure mean L0 and held-out next-token CE for the
   clean model, the spliced model and the model with every MLP output zero-ablated.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SEED = 0
SEQ_LEN = 128
N_TOKENS = 65_536
N_FEATURES = 512
TARGET_L0 = 12.0
STEPS = 1000
BATCH = 512
LR = 2e-3
THRESHOLD_QUANTILE = 0.10  # of each feature's positive activations, set to zero by JumpReLU
EVAL_SEQUENCES = 32
FIT_TOKENS = 16_384  # tokens used to set thresholds and refit decoders


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def collect(
    model_name: str = "demo", n_tokens: int = N_TOKENS
) -> tuple[torch.nn.Module, list[Tensor], list[Tensor]]:
    """Base model plus ``mlp_in`` and ``mlp_out`` activations ``[T, d]`` per layer."""
    from spd_host.data import TokenDatasetSpec, iter_token_batches
    from spd_host.models import load_base_model, load_tokenizer
    from spd_host.topology import topology_of

    model = load_base_model(model_name)
    tok = load_tokenizer(model_name)
    topo = topology_of(model)
    L = topo.n_layers
    hooks = [f"{i}.mlp_in" for i in range(L)] + [f"{i}.mlp_out" for i in range(L)]
    xs: list[list[Tensor]] = [[] for _ in range(L)]
    ys: list[list[Tensor]] = [[] for _ in range(L)]
    spec = TokenDatasetSpec(source="demo", split="train", seq_len=SEQ_LEN, seed=SEED)
    for batch in iter_token_batches(spec, tok, batch_size=16, n_tokens=n_tokens):
        with torch.no_grad(), topo.capture(hooks) as acts:
            model(batch)
            for i in range(L):
                xs[i].append(acts[f"{i}.mlp_in"].reshape(-1, acts[f"{i}.mlp_in"].shape[-1]).float())
                ys[i].append(
                    acts[f"{i}.mlp_out"].reshape(-1, acts[f"{i}.mlp_out"].shape[-1]).float()
                )
    return model, [torch.cat(x) for x in xs], [torch.cat(y) for y in ys]


class _Sparse(torch.nn.Module):
    """ReLU encoders for ``n_src`` layers and decoders from each source to ``targets(i)``."""

    def __init__(self, d: int, n: int, n_layers: int, cross_layer: bool, ys: list[Tensor]):
        super().__init__()
        self.cross_layer = cross_layer
        self.L = n_layers
        self.W_enc = torch.nn.Parameter(torch.randn(n_layers, n, d) / math.sqrt(d))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_layers, n))
        n_targets = n_layers if cross_layer else 1
        dec = torch.randn(n_layers, n, n_targets, d)
        dec = dec / dec.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = torch.nn.Parameter(dec)  # [src, n, target offset (or 1), d]
        self.b_dec = torch.nn.Parameter(torch.stack([y.mean(0) for y in ys]))

    def encode(self, xs: list[Tensor]) -> list[Tensor]:
        return [torch.relu(x @ self.W_enc[i].T + self.b_enc[i]) for i, x in enumerate(xs)]

    def decode(self, acts: list[Tensor]) -> list[Tensor]:
        outs = []
        for j in range(self.L):
            out = self.b_dec[j]
            if self.cross_layer:
                for i in range(j + 1):
                    out = out + acts[i] @ self.W_dec[i, :, j - i]
            else:
                out = out + acts[j] @ self.W_dec[j, :, 0]
            outs.append(out)
        return outs

    def dec_norms(self) -> Tensor:
        """Per source layer and feature: norm of all its decoder vectors (valid targets only)."""
        norms = self.W_dec.norm(dim=-1)  # [src, n, targets]
        if self.cross_layer:
            mask = torch.ones(self.L, 1, self.L)
            for i in range(self.L):
                mask[i, :, self.L - i :] = 0
            norms = norms * mask
        return norms.pow(2).sum(-1).sqrt()


def train(xs: list[Tensor], ys: list[Tensor], *, cross_layer: bool, steps: int = STEPS) -> _Sparse:
    torch.manual_seed(SEED)
    L, d = len(xs), xs[0].shape[1]
    net = _Sparse(d, N_FEATURES, L, cross_layer, ys)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    var = torch.stack([y.var(0).sum() for y in ys])
    T = xs[0].shape[0]
    lam = torch.full((L,), 1e-2)  # one L1 coefficient per layer, steered to TARGET_L0
    gen = torch.Generator().manual_seed(SEED)
    for step in range(steps):
        idx = torch.randint(0, T, (BATCH,), generator=gen)
        bx = [x[idx] for x in xs]
        by = [y[idx] for y in ys]
        acts = net.encode(bx)
        outs = net.decode(acts)
        mse = (
            torch.stack([(o - y).pow(2).sum(-1).mean() for o, y in zip(outs, by, strict=True)])
            / var
        )
        norms = net.dec_norms()
        l1 = torch.stack([(a * norms[i]).sum(-1).mean() for i, a in enumerate(acts)])
        loss = mse.sum() + (lam * l1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, 2.0 * (1 - step / steps))
        l0s = torch.stack([(a > 0).float().sum(-1).mean() for a in acts]).detach()
        lam = torch.where(l0s > TARGET_L0, lam * 1.03, lam / 1.03)
        if step % 100 == 0 or step == steps - 1:
            _log(
                f"step {step}: fvu {[round(float(m), 3) for m in mse.detach()]} "
                f"L0 {[round(float(v), 1) for v in l0s]} lambda {[f'{float(v):.1e}' for v in lam]}"
            )
    return net


@torch.no_grad()
def finalise(net: _Sparse, xs: list[Tensor], ys: list[Tensor]) -> dict[str, Tensor]:
    """JumpReLU thresholds from activation quantiles, then least-squares decoders."""
    L = net.L
    W_enc, b_enc = net.W_enc.detach(), net.b_enc.detach()
    gen = torch.Generator().manual_seed(SEED)
    rows = torch.randperm(xs[0].shape[0], generator=gen)[:FIT_TOKENS]
    xs = [x[rows] for x in xs]
    ys = [y[rows] for y in ys]
    thresholds, acts = [], []
    for i in range(L):
        pre = xs[i] @ W_enc[i].T + b_enc[i]
        # per-feature quantile of the positive pre-activations (NaN where a feature never fires)
        pos = torch.where(pre > 0, pre, torch.full_like(pre, float("nan")))
        thr = torch.nanquantile(pos, THRESHOLD_QUANTILE, dim=0).nan_to_num(0.0)
        thresholds.append(thr)
        acts.append(pre * (pre > thr))
    n = W_enc.shape[1]
    dec = torch.zeros_like(net.W_dec)
    b_dec = torch.zeros_like(net.b_dec)
    for j in range(L):
        srcs = list(range(j + 1)) if net.cross_layer else [j]
        A = torch.cat([acts[i] for i in srcs] + [torch.ones(acts[0].shape[0], 1)], dim=1)
        ridge = 1e-3 * torch.eye(A.shape[1])
        ridge[-1, -1] = 0
        sol = torch.linalg.solve(A.T @ A + ridge * A.shape[0] / 1000, A.T @ ys[j])
        for k, i in enumerate(srcs):
            block = sol[k * n : (k + 1) * n]
            if net.cross_layer:
                dec[i, :, j - i] = block
            else:
                dec[i, :, 0] = block
        b_dec[j] = sol[-1]
    return {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "threshold": torch.stack(thresholds),
        "W_dec": dec,
        "b_dec": b_dec,
    }


def save_transcoders(w: dict[str, Tensor], out: Path, model_name: str = "demo") -> None:
    import yaml
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob("*.safetensors"):
        p.unlink()
    cfg = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": "spd-host/demo-transcoders",
    }
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for i in range(w["W_enc"].shape[0]):
        save_file(
            {
                "W_enc": w["W_enc"][i].contiguous(),
                "W_dec": w["W_dec"][i, :, 0].contiguous(),
                "b_enc": w["b_enc"][i].contiguous(),
                "b_dec": w["b_dec"][i].contiguous(),
                "activation_function.threshold": w["threshold"][i].contiguous(),
            },
            str(out / f"layer_{i}.safetensors"),
        )


def save_clt(w: dict[str, Tensor], out: Path, model_name: str = "demo") -> None:
    import yaml
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob("*.safetensors"):
        p.unlink()
    cfg = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model_name,
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "scan": "spd-host/demo-clt",
    }
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    L = w["W_enc"].shape[0]
    for i in range(L):
        save_file(
            {
                f"W_enc_{i}": w["W_enc"][i].contiguous(),
                f"b_enc_{i}": w["b_enc"][i].contiguous(),
                f"b_dec_{i}": w["b_dec"][i].contiguous(),
                f"threshold_{i}": w["threshold"][i].contiguous(),
            },
            str(out / f"W_enc_{i}.safetensors"),
        )
        save_file(
            {f"W_dec_{i}": w["W_dec"][i, :, : L - i].contiguous()},
            str(out / f"W_dec_{i}.safetensors"),
        )


def heldout_batches(tokenizer: Any, n_sequences: int = EVAL_SEQUENCES) -> Iterator[Tensor]:
    from spd_host.data import TokenDatasetSpec, iter_token_batches

    spec = TokenDatasetSpec(
        source="demo", split="heldout", seq_len=SEQ_LEN, seed=SEED, shuffle=False
    )
    yield from iter_token_batches(spec, tokenizer, batch_size=8, n_tokens=n_sequences * SEQ_LEN)


@contextmanager
def zero_ablate_mlps(model: torch.nn.Module) -> Iterator[None]:
    from spd_host.topology import topology_of

    topo = topology_of(model)
    with topo.replace({f"{i}.mlp_out": torch.zeros_like for i in range(topo.n_layers)}):
        yield


@torch.no_grad()
def evaluate(decomposition_id: str, n_sequences: int = EVAL_SEQUENCES) -> dict[str, Any]:
    """Mean L0 per site and next-token CE (clean / spliced / zero-ablated) on held-out text."""
    import torch.nn.functional as F

    from spd_host.adapter import HarvestOptions
    from spd_host.plugins import get_host

    host = get_host()
    adapter = host.load_adapter(decomposition_id)
    model = adapter.load_base_model()
    harvest = host.harvest_fn(adapter, HarvestOptions())
    totals = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    l0_sum = {s.name: 0.0 for s in adapter.sites}
    n_tok = 0

    def ce(logits: Tensor, tokens: Tensor) -> float:
        return float(
            F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        )

    for tokens in heldout_batches(adapter.load_tokenizer(), n_sequences):
        batch = harvest(tokens)
        for s, fired in batch.firings.items():
            l0_sum[s] += float(fired.sum())
        assert batch.next_token_logits is not None
        totals["clean"] += ce(batch.next_token_logits, tokens)
        with adapter.splice(model):  # type: ignore[attr-defined]
            totals["spliced"] += ce(model(tokens).logits, tokens)
        with zero_ablate_mlps(model):
            totals["zero_ablated"] += ce(model(tokens).logits, tokens)
        n_tok += tokens.numel()
    n_pred = n_tok - n_tok // SEQ_LEN
    return {
        "decomposition_id": decomposition_id,
        "heldout_sequences": n_sequences,
        "heldout_tokens": n_tok,
        "mean_l0": {s: round(v / n_tok, 3) for s, v in l0_sum.items()},
        "n_features_per_site": N_FEATURES,
        "ce": {k: round(v / n_pred, 4) for k, v in totals.items()},
        "seed": SEED,
        "train_tokens": N_TOKENS,
    }


def main(kind: str, out: Path, model_name: str = "demo", steps: int = STEPS) -> dict[str, Any]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # deterministic, and fast on a shared machine
    _log(f"collecting {N_TOKENS} tokens of activations from the demo model")
    _, xs, ys = collect(model_name)
    cross = kind == "clt"
    _log(
        f"training {'a CLT' if cross else 'per-layer transcoders'} ({N_FEATURES} features per layer)"
    )
    net = train(xs, ys, cross_layer=cross, steps=steps)
    weights = finalise(net, xs, ys)
    (save_clt if cross else save_transcoders)(weights, out, model_name)
    _log(f"saved to {out}; evaluating through the real loader")
    metrics = evaluate(f"{kind}:{out}")
    metrics["steps"] = steps
    metrics["decomposition_id"] = f"{kind}:demo"
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _log(json.dumps(metrics, indent=2))
    return metrics
