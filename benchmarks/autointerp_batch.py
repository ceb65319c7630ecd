"""Autointerp at scale: the batch path vs the synchronous path, on one loopback server.

``python benchmarks/autointerp_batch.py [--n 20000] [--providers openai anthropic]``

N synthetic components (``tests/autointerp/factories.make_many``: one example each, a
``MARK<i>`` token so every answer is told apart) are labelled by each mode in a fresh label
store, through the real ``openai`` / ``anthropic`` SDKs against the loopback server of the
tests (``tests/autointerp/batch_server.py``, in this parent process, answering every request
with 100 input / 40 output tokens). Each run is its own child process, reaped with
``os.wait4`` so ``ru_maxrss`` is that child's own peak RSS (the server's memory is not in it).

Reported per mode: HTTP calls the server received (every create, upload, poll, download, or
each synchronous request), wall time of the child (interpreter start-up included), its peak
RSS, what the run billed (list prices for sync, batch prices for batch, both from
pricing.yaml) and labels stored. The loopback batch ends ``--batch-delay`` seconds after its
creation; a real provider's batch takes minutes to hours, so the batch wall time here is the
client's own overhead plus that delay, not a provider's turnaround.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests" / "autointerp"
MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}


def child(args: argparse.Namespace) -> None:
    """One labelling run (in its own process); prints the run report as JSON."""
    sys.path.insert(0, str(TESTS))
    from factories import make_many

    from spd_host.autointerp.config import AutointerpConfig
    from spd_host.autointerp.runner import label_components

    config = AutointerpConfig(
        provider=args.provider,
        model=MODELS[args.provider],
        base_url=args.url,
        batch=args.mode == "batch",
        poll_interval_s=args.poll_interval,
        max_concurrent=args.concurrency,
        timeout_s=120.0,
    )
    report = label_components(
        make_many(args.n), config, db_path=Path(args.db), harvest_id="h", decomposition_id="b:demo"
    )
    print(report.model_dump_json())


def run_child(
    mode: str, provider: str, url: str, db: Path, a: argparse.Namespace
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.setdefault("ANTHROPIC_API_KEY", "sk-bench")
    env.setdefault("OPENAI_API_KEY", "sk-bench")
    cmd = [sys.executable, __file__, "--child", mode, "--provider", provider, "--url", url,
           "--db", str(db), "--n", str(a.n), "--poll-interval", str(a.poll_interval),
           "--concurrency", str(a.concurrency)]  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{mode}/{provider} failed:\n{err.read().decode()[-3000:]}")
        report = json.loads(out.read().decode().strip().splitlines()[-1])
    with sqlite3.connect(db) as conn:
        (n_ok,) = conn.execute("SELECT COUNT(*) FROM labels WHERE status='ok'").fetchone()
    return {
        "report": report,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "labels": n_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--providers", nargs="+", default=["openai", "anthropic"])
    parser.add_argument("--modes", nargs="+", default=["sync", "batch"])
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--batch-delay", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32, help="sync: requests in flight")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "autointerp_batch.json")
    parser.add_argument("--child", choices=["sync", "batch"])
    parser.add_argument("--provider")
    parser.add_argument("--url")
    parser.add_argument("--db")
    a = parser.parse_args()
    if a.child:
        a.mode = a.child
        child(a)
        return

    sys.path.insert(0, str(TESTS))
    from batch_server import BatchPlan, BatchServer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for provider in a.providers:
            for mode in a.modes:
                plan = BatchPlan(delay=a.batch_delay)
                with BatchServer(batch_plan=lambda n, p=plan: p) as server:
                    url = server.anthropic_url if provider == "anthropic" else server.openai_url
                    got = run_child(mode, provider, url, Path(tmp) / f"{provider}-{mode}.db", a)
                    calls = len(server.calls)
                    batches = len(server.creates)
                r = got["report"]
                row = {
                    "provider": provider, "model": r["model"], "mode": mode, "n": a.n,
                    "http_calls": calls, "batches": batches, "wall_s": round(got["wall_s"], 1),
                    "peak_rss_mib": round(got["peak_rss_mib"], 1), "spent_usd": r["spent_usd"],
                    "labels": got["labels"], "failed": r["n_failed"],
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)  # a benchmark script: printing is its job
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1) + "\n")
    print()
    print(
        "| provider / model | mode | components | HTTP calls | batches | wall (s) | peak RSS (MiB) | billed (USD) | labels |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['provider']} / `{r['model']}` | {r['mode']} | {r['n']:,} | {r['http_calls']:,} | "
              f"{r['batches']} | {r['wall_s']} | {r['peak_rss_mib']} | ${r['spent_usd']:.4f} | {r['labels']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
