"""Shared machinery of the harvest benchmarks: one phase per child process, repeats, tables.

A *phase* runs in its own child process so that its peak RSS is its own: the parent starts it
with ``subprocess.Popen`` and reaps it with ``os.wait4``, whose ``ru_maxrss`` is that child's
peak resident set (KiB on Linux), not the running maximum over all children that
``getrusage(RUSAGE_CHILDREN)`` would give. Phases of one repeat run back to back, so every
ratio compares runs made under the same machine load.

Phases (``python benchmarks/_harness.py --phase P --case C --tokens N``):

- ``bare``: the decomposition's own forward + encode on the pre-tokenised batches — the base
  model's forward with its input hook points captured, then ``adapter.encode_captured`` (for
  the synthetic case: the toy HarvestFn). No HarvestBatch, no validation, no accumulation.
  Model loading and one warm-up batch are not timed.
- ``harvest``: ``run_harvest`` end to end on the same batches (plugin HarvestFn, validation,
  accumulation, checkpoints every 50 batches, the final write), model loading included.
- ``delphi``: delphi's ``LatentCache.run`` + ``save_splits`` on the same model, dictionaries
  and batches, in the delphi venv (``_delphi_child.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DELPHI_PYTHON = Path(os.environ.get("SPD_HOST_DELPHI_PYTHON", "/work/wt/_bench_venv/bin/python"))


# ----------------------------------------------------------------------------- parent side
def run_phase(
    phase: str,
    case: str,
    tokens: int,
    *,
    threads: int,
    extra: Sequence[str] = (),
    python: str | None = None,
    rss_limit_gib: float | None = None,
) -> dict[str, Any]:
    """Run one phase in a child process; its JSON result plus ``peak_rss_mib`` and ``wall_s``.

    ``rss_limit_gib``: kill the child (and raise) if its RSS passes this many GiB.
    """
    script = HERE / ("_delphi_child.py" if phase == "delphi" else "_harness.py")
    exe = str(DELPHI_PYTHON) if phase == "delphi" else (python or sys.executable)
    cmd = [
        exe,
        str(script),
        "--phase",
        phase,
        "--case",
        case,
        "--tokens",
        str(tokens),
        "--threads",
        str(threads),
        *extra,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), str(HERE), env.get("PYTHONPATH", "")]
    )
    if phase == "delphi":
        env["PYTHONPATH"] = str(HERE)  # the delphi venv sees only torch/transformers/delphi
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        killed: list[float] = []
        if rss_limit_gib:
            threading.Thread(
                target=_rss_guard, args=(proc.pid, rss_limit_gib, killed), daemon=True
            ).start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        raise RuntimeError(
            f"phase {phase} ({case}, {tokens} tokens) killed: its RSS passed "
            f"{rss_limit_gib} GiB (--rss-limit-gib) after {killed[0]:.0f} s"
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"phase {phase} ({case}, {tokens} tokens) failed "
            f"(exit {proc.returncode}):\n{stderr[-4000:]}"
        )
    res: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    res["child_wall_s"] = round(wall, 2)
    # CPU seconds of the whole child (all its threads): against the wall time on a machine of
    # n cores this says whether a phase was short of cores or waiting
    res["child_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    return res


def _rss_guard(pid: int, limit_gib: float, killed: list[float]) -> None:
    """Kill ``pid`` if its resident set passes ``limit_gib`` (a shared machine must not OOM)."""
    import signal

    page = os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    while True:
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            return
        if rss > limit_gib * 2**30:
            killed.append(time.perf_counter() - t0)
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.5)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and (max - min) / median of repeated measurements."""
    med = statistics.median(values)
    return {
        "median": round(med, 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "spread_pct": round(100 * (max(values) - min(values)) / med, 1) if med else 0.0,
        "n": len(values),
    }


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-markdown table (pasted as is into RESULTS.md)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
    print(f"\nwrote {path}")


def machine() -> dict[str, Any]:
    import platform

    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
    }


def sweep_parser(
    doc: str | None, *, cases: Sequence[str], tokens: str, repeats: int
) -> argparse.ArgumentParser:
    """The options every sweep script shares (``--case`` defaults to the first of ``cases``);
    a script adds its own on top."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--case", choices=list(cases), default=cases[0])
    p.add_argument("--tokens", default=tokens, help="comma-separated token counts")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--rss-limit-gib", type=float, default=12.0, help="kill a phase whose RSS passes this"
    )
    p.add_argument("--json", type=Path, default=None)
    return p


def profiled_harvest(script: str, case: str, n_tokens: int, threads: int) -> str:
    """One extra harvest phase under cProfile; returns the path of its text profile."""
    path = Path(__file__).resolve().parent / f"{script}-{case}.profile.txt"
    run_phase("harvest", case, n_tokens, threads=threads, extra=["--profile", str(path)])
    return str(path)


def sweep(
    case: str,
    token_counts: Sequence[int],
    repeats: int,
    phases: Sequence[str],
    *,
    threads: int,
    extra: dict[str, Sequence[str]] | None = None,
    log: Callable[[str], None] = print,
    rss_limit_gib: float | None = None,
) -> list[dict[str, Any]]:
    """Every phase at every token count, ``repeats`` times; phases of one repeat back to back."""
    runs: list[dict[str, Any]] = []
    for n in token_counts:
        for r in range(repeats):
            for ph in phases:
                res = run_phase(
                    ph,
                    case,
                    n,
                    threads=threads,
                    extra=(extra or {}).get(ph, ()),
                    rss_limit_gib=rss_limit_gib,
                )
                res["repeat"] = r
                runs.append(res)
                log(
                    f"  {case} {n:>9} tok  repeat {r}  {ph:<8} {res['seconds']:>9.2f} s  "
                    f"{res['tokens_per_s']:>9.1f} tok/s  peak RSS {res['peak_rss_mib']:>8.0f} MiB"
                )
    return runs


def summarise(runs: list[dict[str, Any]], phases: Sequence[str]) -> list[dict[str, Any]]:
    """Per token count: each phase's seconds / tok/s / peak RSS, and ratios per repeat."""
    out = []
    for n in sorted({r["tokens"] for r in runs}):
        at = [r for r in runs if r["tokens"] == n]
        row: dict[str, Any] = {"tokens": n}
        for ph in phases:
            rs = sorted((r for r in at if r["phase"] == ph), key=lambda r: r["repeat"])
            if not rs:
                continue
            row[ph] = {
                "seconds": spread([r["seconds"] for r in rs]),
                "tokens_per_s": spread([r["tokens_per_s"] for r in rs]),
                "us_per_token": spread([1e6 * r["seconds"] / n for r in rs]),
                "peak_rss_mib": spread([r["peak_rss_mib"] for r in rs]),
            }
        by_rep: dict[int, dict[str, dict[str, Any]]] = {}
        for r in at:
            by_rep.setdefault(r["repeat"], {})[r["phase"]] = r
        if "bare" in phases and "harvest" in phases:
            pairs = [v for v in by_rep.values() if "bare" in v and "harvest" in v]
            row["overhead"] = spread(
                [v["harvest"]["seconds"] / v["bare"]["seconds"] for v in pairs]
            )
            row["overhead_excl_load"] = spread(
                [
                    (v["harvest"]["seconds"] - v["harvest"].get("load_seconds", 0.0))
                    / v["bare"]["seconds"]
                    for v in pairs
                ]
            )
        if "delphi" in phases and "harvest" in phases:
            pairs = [v for v in by_rep.values() if "delphi" in v and "harvest" in v]
            row["harvest_over_delphi_seconds"] = spread(
                [v["harvest"]["seconds"] / v["delphi"]["seconds"] for v in pairs]
            )
            row["harvest_over_delphi_rss"] = spread(
                [v["harvest"]["peak_rss_mib"] / v["delphi"]["peak_rss_mib"] for v in pairs]
            )
        out.append(row)
    return out


# ----------------------------------------------------------------------------- synthetic case
SYN_SITES, SYN_C, SYN_V, SYN_L0 = 8, 125_000, 50_000, 32


@dataclass
class ToyAdapter:
    """A decomposition with no model: its HarvestFn draws synthetic sparse activity."""

    sites: list[Any]
    activation_types: tuple[str, ...]
    fn: Callable[[Any], Any]
    decomposition_id: str = "bench:synthetic"
    method: Any = None
    base_model_name: str = "none"
    defaults: Any = field(default=None)

    def load_base_model(self) -> Any:
        return None

    def load_tokenizer(self) -> Any:
        return None


def synthetic_adapter(device: str = "cpu") -> ToyAdapter:
    """1,000,000 components (8 sites x 125,000), vocab 50,000, 32 firings per site per token.

    Components are Zipf-popular (``p ∝ rank^-0.8``, a fixed permutation per site), so a few
    hundred thousand are alive after 100k tokens and the rest stay dead, as in a real
    dictionary. The activity is handed to the host *sparsely* (``SparseActivity``) when the
    host's contract has that form, else densely; next-token information as ``NextTokenTopK``
    when the host asks for it (``HarvestOptions.next_token_top_k``), else as full logits.
    """
    import torch

    from spd_host import adapter as A

    popularity = 1.0 / torch.arange(1, SYN_C + 1, dtype=torch.float64) ** 0.8
    perms = [
        torch.randperm(SYN_C, generator=torch.Generator().manual_seed(s)) for s in range(SYN_SITES)
    ]
    U = torch.randn(64, SYN_V, generator=torch.Generator().manual_seed(99)) * 1.5
    dev = torch.device(device)
    U = U.to(dev)
    sparse_cls = getattr(A, "SparseActivity", None)
    topk_of = getattr(A, "next_token_topk_of", None)
    state: dict[str, Any] = {"top_k": None}

    @torch.no_grad()
    def fn(tokens: Any) -> Any:
        B, S = tokens.shape
        N = B * S
        g = torch.Generator().manual_seed(int(tokens[0, 0]) * 7919 + int(tokens[0, 1]))
        firings, acts, sparse = {}, {}, {}
        for s in range(SYN_SITES):
            idx = torch.multinomial(popularity, N * SYN_L0, replacement=True, generator=g)
            comp = perms[s][idx]
            pos = torch.arange(N).repeat_interleave(SYN_L0)
            key = torch.unique(pos * SYN_C + comp)  # distinct (position, component) entries
            vals = torch.rand(key.numel(), generator=g) * 3 + 0.01
            name = f"{s}.mlp"
            if sparse_cls is not None:
                sparse[name] = sparse_cls(
                    position=(key // SYN_C).to(dev),
                    component=(key % SYN_C).to(dev),
                    values={"act": vals.to(dev)},
                )
            else:
                a = torch.zeros(N * SYN_C)
                a[key] = vals
                a = a.view(B, S, SYN_C)
                firings[name] = a > 0
                acts[name] = {"act": a}
        h = torch.randn(N, 64, generator=g).to(dev)
        logits = (h @ U).view(B, S, SYN_V)
        kw: dict[str, Any] = {}
        if sparse:
            kw["sparse"] = sparse
        if state["top_k"] is not None and topk_of is not None:
            kw["next_token_topk"] = topk_of(logits, state["top_k"])
        else:
            kw["next_token_logits"] = logits
        return A.HarvestBatch(tokens=tokens.to(dev), firings=firings, activations=acts, **kw)

    sites = [
        A.Site(
            name=f"{s}.mlp",
            n_components=SYN_C,
            reads_from=f"{s}.mlp_in",
            writes_to=(f"{s}.mlp_out",),
        )
        for s in range(SYN_SITES)
    ]
    ad = ToyAdapter(
        sites,
        ("act",),
        fn,
        method=A.MethodInfo(name="bench", description="synthetic"),
        defaults=A.DecompositionDefaults(),
    )
    ad.fn_state = state  # type: ignore[attr-defined]
    return ad


class ToyPlugin:
    """Registers one ToyAdapter under the method name ``bench``."""

    def __init__(self, adapter: ToyAdapter) -> None:
        self.adapter = adapter

    def register_methods(self, register: Callable[[Any], None]) -> None:
        register(self.adapter.method)

    def load_decomposition(self, decomposition_id: Any) -> Any:
        return self.adapter if str(decomposition_id).startswith("bench:") else None

    def harvest_fn(self, adapter: Any, options: Any) -> Any:
        if adapter is not self.adapter:
            return None
        self.adapter.fn_state["top_k"] = getattr(options, "next_token_top_k", None)  # type: ignore[attr-defined]
        return self.adapter.fn


def _hookimpls(plugin: ToyPlugin) -> ToyPlugin:
    from spd_host.hookspecs import hookimpl

    for name in ("register_methods", "load_decomposition", "harvest_fn"):
        hookimpl(getattr(type(plugin), name))
    return plugin


# ----------------------------------------------------------------------------- child side
def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(args: argparse.Namespace) -> dict[str, Any]:
    import _fixtures
    import _tokens
    import torch

    torch.set_num_threads(args.threads)
    synthetic = args.case == "synthetic-1m"
    if synthetic:
        from spd_host import adapter as A

        # dense [B, S, 125000] x 8 sites is 0.5 GB per sequence: small batches unless sparse
        bs = args.batch_size or (16 if hasattr(A, "SparseActivity") else 2)
        case = _fixtures.Case("synthetic-1m", "bench:synthetic", SYN_V, bs, 128)
    else:
        case = _fixtures.build_case(args.case, Path(args.fixtures), tiny=args.tiny)
    B, S = args.batch_size or case.batch_size, case.seq_len
    n_batches = max(1, args.tokens // (B * S))
    batches = _tokens.make_batches(case.vocab, B, S, n_batches)
    n_tokens = n_batches * B * S
    res: dict[str, Any] = {
        "case": case.name,
        "phase": args.phase,
        "tokens": n_tokens,
        "batch": [B, S],
        "threads": args.threads,
        "device": args.device,
    }
    if args.phase == "bare":
        res.update(_bare(case, batches, args, synthetic))
    elif args.phase == "harvest":
        res.update(_harvest(case, batches, args, synthetic))
    else:
        raise ValueError(f"unknown phase {args.phase!r}")
    res["tokens_per_s"] = round(n_tokens / res["seconds"], 1)
    return res


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bare(
    case: Any, batches: list[Any], args: argparse.Namespace, synthetic: bool
) -> dict[str, Any]:
    import torch

    if synthetic:
        fn = synthetic_adapter(args.device).fn
        fn(batches[0])
        t0 = time.perf_counter()
        for t in batches:
            fn(t)
        return {"seconds": round(time.perf_counter() - t0, 3)}
    from spd_host.plugins import get_host
    from spd_host.topology import topology_of

    adapter: Any = get_host().load_adapter(case.decomposition_id)
    model = adapter.load_base_model().to(args.device)
    adapter.to(args.device)
    topo = topology_of(model)
    hooks = adapter.input_hook_points()
    fired = 0
    try:  # no KV cache, as the harvest's own forward (engines before it had no helper)
        from spd_host.models import no_cache_kwargs

        kwargs = no_cache_kwargs(model)
    except ImportError:
        kwargs = {}

    def step(t: Any) -> Any:
        with torch.no_grad(), topo.capture(hooks) as captured:
            out = model(t.to(args.device), **kwargs)
            acts = adapter.encode_captured(captured)
        return out, acts

    step(batches[0])
    _sync(args.device)
    seconds = 0.0
    for t in batches:
        t0 = time.perf_counter()
        _, acts = step(t)
        _sync(args.device)
        seconds += time.perf_counter() - t0
        fired += sum(int(torch.count_nonzero(a > 0)) for a in acts.values())
    return {"seconds": round(seconds, 3), "total_firings": fired}


def _harvest(
    case: Any, batches: list[Any], args: argparse.Namespace, synthetic: bool
) -> dict[str, Any]:
    import contextlib

    import torch

    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.plugins import temporary_plugins

    B, S = batches[0].shape
    config = HarvestConfig(
        n_tokens=len(batches) * B * S,
        batch_size=B,
        seq_len=S,
        device=args.device,
        **json.loads(args.config),
    )

    def source(rank: int, world: int, start: int) -> Iterator[Any]:
        yield from batches[start * world + rank :: world]

    ctx: Any = contextlib.nullcontext()
    if synthetic:
        ctx = temporary_plugins(
            ("bench", _hookimpls(ToyPlugin(synthetic_adapter(args.device)))), entry_points=False
        )
    prof = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, ctx:
        load_s = 0.0
        if not synthetic:
            # warm the imports and the page cache (the bare phase does not time them either),
            # then time one more load: run_harvest loads the model itself, and the report
            # gives the overhead with and without that load
            from spd_host.plugins import get_host

            get_host().load_adapter(case.decomposition_id).load_base_model()
            gc.collect()  # one model at a time: the warm-up must not raise the peak RSS
            t0 = time.perf_counter()
            get_host().load_adapter(case.decomposition_id).load_base_model()
            load_s = time.perf_counter() - t0
            gc.collect()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = Path(tmp) / "run"
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        repo = run_harvest(case.decomposition_id, config, out=out, batches=source, progress=False)
        _sync(args.device)
        seconds = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
        assert repo is not None
        counts = repo._tensor("firing_count")
        res: dict[str, Any] = {
            "peak_rss_mib_before_run_harvest": round(rss_before, 1),
            "seconds": round(seconds, 3),
            "load_seconds": round(load_s, 3),
            "alive_components": int((counts > 0).sum()),
            "components": int(counts.numel()),
            "total_firings": int(counts.sum()),
            "result_bytes_on_disk": _disk_bytes(out),
            # run_harvest's own clock stops before the result write: the rest is the write
            "seconds_before_write": round(float(repo.meta.get("seconds") or 0.0), 3),
            "pipeline_split_s": repo.meta.get("pipeline"),
        }
        if args.keep_stats:
            from safetensors.torch import load_file

            stats = {f"stats/{k}": v for k, v in load_file(str(out / "stats.safetensors")).items()}
            stats |= {
                f"examples/{k}": v for k, v in load_file(str(out / "examples.safetensors")).items()
            }
            torch.save(stats, args.keep_stats)
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_lines)
        Path(args.profile).write_text(buf.getvalue())
        res["profile_file"] = args.profile
    return res


def child_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="one benchmark phase (run by the benchmark scripts)")
    p.add_argument("--phase", required=True, choices=["bare", "harvest"])
    p.add_argument("--case", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--fixtures",
        default=str(
            Path(os.environ.get("SPD_HOST_BENCH_FIXTURES", "/tmp/spd_host_bench_fixtures"))
        ),
    )
    p.add_argument("--config", default="{}", help="extra HarvestConfig fields as JSON")
    p.add_argument("--profile", default=None, help="write a cProfile of the harvest here")
    p.add_argument("--profile-lines", type=int, default=25)
    p.add_argument("--keep-stats", default=None, help="torch.save the result arrays here")
    p.add_argument("--tmp", default=None, help="where the harvest writes (default: $TMPDIR)")
    return p


if __name__ == "__main__":
    print(json.dumps(child(child_parser().parse_args())))
