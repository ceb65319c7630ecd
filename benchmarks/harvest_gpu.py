"""GPU harvest benchmark: overhead over forward + encode on CUDA, and CUDA == CPU bit for bit.

One short prepared script for one GPU (a few minutes on an H200). It writes its own fixtures
(``_fixtures.py``: a 12 x 768 GPT-2, vocab 50,257, random init, with a 131,072-latent TopK SAE,
k = 64, on ``blocks.6.hook_resid_post`` and a 32,768-latent JumpReLU transcoder at layer 8, in
SAELens layout) and draws Zipf token batches of 16 x 1024 (``_tokens.py``). Then:

1. Overhead: ``--repeats`` times, back to back in this process, ``bare`` (the base model's
   forward with the encoders' hook points captured + ``adapter.encode_captured``, on the
   device, synchronised) and ``harvest`` (``run_harvest`` with ``device=<device>`` end to end,
   model load included and also reported separately). Ratio per repeat; median [min-max].
   GPU memory: ``torch.cuda.max_memory_allocated`` per phase.
2. Bit-for-bit slice: a device harvest of ``--slice-batches`` batches through a recording
   wrapper of the real HarvestFn (so the device run sees exactly the plugin's output), then a
   CPU harvest replaying the recorded HarvestBatches; every array of ``stats.safetensors``
   and ``examples.safetensors`` must be equal (``torch.equal``, dtype and shape included).
   Feeding both runs the same batches isolates the harvest engine: the model's own forward
   is not bit-identical across devices and is not what is being tested.

Figures go to ``$OUT/harvest_gpu.json`` (``--out`` overrides; default ``.`` when OUT is unset)
and to stdout. On a machine without a GPU, ``--device cpu --tiny`` runs the same code on a
2 x 64 model in seconds (the slice check then compares CPU with CPU).

    PYTHONUNBUFFERED=1 python benchmarks/harvest_gpu.py                   # on the GPU machine
    python benchmarks/harvest_gpu.py --device cpu --tiny --tokens 4096    # here
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent), str(HERE)]

import _fixtures  # noqa: E402
import _tokens  # noqa: E402
import torch  # noqa: E402
from _harness import ToyAdapter, ToyPlugin, _hookimpls, spread  # noqa: E402

from spd_host.models import no_cache_kwargs  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def to_device(obj: Any, device: str) -> Any:
    """A copy of a HarvestBatch (or any nest of dataclasses, mappings, tensors) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(
            **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        )
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def bare_seconds(case: Any, batches: list[torch.Tensor], device: str) -> float:
    from spd_host.plugins import get_host
    from spd_host.topology import topology_of

    adapter: Any = get_host().load_adapter(case.decomposition_id)
    model = adapter.load_base_model().to(device)
    adapter.to(device)
    topo = topology_of(model)
    hooks = adapter.input_hook_points()

    def step(t: torch.Tensor) -> None:
        with torch.no_grad(), topo.capture(hooks) as captured:
            model(t.to(device), **no_cache_kwargs(model))
            adapter.encode_captured(captured)

    step(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for t in batches:
        step(t)
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds


def source_of(batches: list[torch.Tensor]) -> Any:
    def source(rank: int, world: int, start: int) -> Iterator[torch.Tensor]:
        yield from batches[start * world + rank :: world]

    return source


def harvest(
    decomposition_id: str, batches: list[torch.Tensor], device: str, out: Path, plugin: Any = None
) -> float:
    import contextlib

    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.plugins import temporary_plugins

    B, S = batches[0].shape
    config = HarvestConfig(n_tokens=len(batches) * B * S, batch_size=B, seq_len=S, device=device)
    ctx: Any = (
        temporary_plugins(("replay", plugin), entry_points=True)
        if plugin is not None
        else contextlib.nullcontext()
    )
    with ctx:
        t0 = time.perf_counter()
        run_harvest(decomposition_id, config, out=out, batches=source_of(batches), progress=False)
        sync(device)
        return time.perf_counter() - t0


class Replay(ToyPlugin):
    """``replay:slice``: in record mode wraps the real HarvestFn and keeps a CPU copy of each
    batch; in replay mode hands those copies back, moved to the harvest's device."""

    def __init__(self, real_id: str, recorded: dict[bytes, Any] | None) -> None:
        from spd_host import adapter as A
        from spd_host.plugins import get_host

        self.host = get_host()
        self.real = self.host.load_adapter(real_id)
        self.recorded = recorded
        self.store: dict[bytes, Any] = {}
        super().__init__(
            ToyAdapter(
                list(self.real.sites),
                tuple(self.real.activation_types),
                fn=lambda t: None,
                decomposition_id="replay:slice",
                method=A.MethodInfo(name="replay", description="replay"),
                defaults=A.DecompositionDefaults(),
            )
        )

    def load_decomposition(self, decomposition_id: Any) -> Any:
        return self.adapter if str(decomposition_id).startswith("replay:") else None

    def harvest_fn(self, adapter: Any, options: Any) -> Any:
        if adapter is not self.adapter:
            return None
        if self.recorded is not None:
            recorded, device = self.recorded, options.device
            return lambda t: to_device(recorded[t.cpu().numpy().tobytes()], device)
        inner = self.host.harvest_fn(self.real, options)

        def record(t: torch.Tensor) -> Any:
            batch = inner(t)
            self.store[t.cpu().numpy().tobytes()] = to_device(batch, "cpu")
            return batch

        return record


def compare_dirs(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    diffs, n = [], 0
    for name in ("stats.safetensors", "examples.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        if set(ta) != set(tb):
            diffs.append(f"{name}: keys differ {sorted(set(ta) ^ set(tb))}")
        for k in sorted(set(ta) & set(tb)):
            n += 1
            if (
                ta[k].dtype != tb[k].dtype
                or ta[k].shape != tb[k].shape
                or not torch.equal(ta[k], tb[k])
            ):
                diffs.append(f"{name}:{k}")
    return {"arrays_compared": n, "arrays_different": diffs, "bit_identical": not diffs and n > 0}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokens", type=int, default=1_048_576)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slice-batches", type=int, default=4)
    p.add_argument("--fixtures", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu)"
    )
    args = p.parse_args()
    dev = args.device
    if args.threads or not dev.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    os.environ.setdefault("SPD_HOST_HOME", tempfile.mkdtemp(prefix="spd_host_home_"))
    root = args.fixtures or Path(tempfile.gettempdir()) / "spd_host_bench_fixtures"
    t_fix = time.perf_counter()
    case = _fixtures.build_case("gpu", root, tiny=args.tiny)
    B, S = case.batch_size, case.seq_len
    batches = _tokens.make_batches(case.vocab, B, S, max(1, args.tokens // (B * S)))
    n_tok = len(batches) * B * S
    report: dict[str, Any] = {
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "case": case.decomposition_id,
        "tiny": args.tiny,
        "tokens": n_tok,
        "batch": [B, S],
        "fixtures_seconds": round(time.perf_counter() - t_fix, 1),
    }
    print(json.dumps(report), flush=True)
    from spd_host.plugins import get_host

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            bare = bare_seconds(case, batches, dev)
            gpu_bare = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
            t0 = time.perf_counter()
            get_host().load_adapter(case.decomposition_id).load_base_model()
            load = time.perf_counter() - t0
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            hv = harvest(case.decomposition_id, batches, dev, Path(tmp) / f"run{r}")
            gpu_hv = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
            run = {
                "repeat": r,
                "bare_seconds": round(bare, 3),
                "harvest_seconds": round(hv, 3),
                "load_seconds": round(load, 3),
                "overhead": round(hv / bare, 4),
                "overhead_excl_load": round((hv - load) / bare, 4),
                "bare_tokens_per_s": round(n_tok / bare),
                "harvest_tokens_per_s": round(n_tok / hv),
                "gpu_peak_gib_bare": gpu_bare,
                "gpu_peak_gib_harvest": gpu_hv,
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
        report["runs"] = runs
        report["summary"] = {
            k: spread([x[k] for x in runs])
            for k in ("overhead", "overhead_excl_load", "bare_tokens_per_s", "harvest_tokens_per_s")
        }
        # bit-for-bit slice: device run through a recorder, CPU run replaying its batches
        sl = batches[: args.slice_batches]
        rec = Replay(case.decomposition_id, None)
        harvest("replay:slice", sl, dev, Path(tmp) / "slice-dev", _hookimpls(rec))
        rep = Replay(case.decomposition_id, rec.store)
        harvest("replay:slice", sl, "cpu", Path(tmp) / "slice-cpu", _hookimpls(rep))
        report["slice"] = {
            "batches": len(sl),
            "tokens": len(sl) * B * S,
            **compare_dirs(Path(tmp) / "slice-dev", Path(tmp) / "slice-cpu"),
        }
    print(json.dumps({"summary": report["summary"], "slice": report["slice"]}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harvest_gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"wrote {args.out / 'harvest_gpu.json'}; overhead median "
        f"{statistics.median(x['overhead'] for x in runs):.3f}; slice bit-identical: "
        f"{report['slice']['bit_identical']}"
    )


if __name__ == "__main__":
    main()
