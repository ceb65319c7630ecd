"""``spd-host serve`` on a synthetic 1,000,000-component harvest: index and component page latency.

The harvest is made through the public path (``run_harvest`` with a toy plugin registered by
``temporary_plugins``, as ``benchmarks/harvest_bench.py`` does): 8 sites x 125,000 components,
a 5,000-token vocabulary, Zipf-popular components with ``--l0`` firings per site per token.
Then a real uvicorn server is started on a free loopback port and pages are fetched over HTTP:

- the index cache build (once per harvest; later starts reuse it),
- the index page: default order, sorted by max activation, filtered by site + density range,
  a label/token search, a deep page (offset 500,000),
- component pages of random alive components (first request and repeated).

The top-token search pass runs in a background thread while pages are timed (the worst case).

    python benchmarks/serve_bench.py                 # 1,000,000 components
    python benchmarks/serve_bench.py --per-site 2000 # quick check
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harvest_bench import BenchAdapter, BenchPlugin  # noqa: E402  (the same synthetic method)

from spd_host.adapter import HarvestBatch, Site  # noqa: E402

DID = "bench:demo"


def make_adapter(n_sites: int, C: int, V: int, l0: int) -> BenchAdapter:
    popularity = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** 0.8
    perms = [torch.randperm(C, generator=torch.Generator().manual_seed(s)) for s in range(n_sites)]
    U = torch.randn(32, V, generator=torch.Generator().manual_seed(9)) * 1.5

    @torch.no_grad()
    def fn(tokens: torch.Tensor) -> HarvestBatch:
        B, S = tokens.shape
        N = B * S
        g = torch.Generator().manual_seed(int(tokens[0, 0]) * 7919 + int(tokens[0, 1]))
        firings, acts = {}, {}
        for s in range(n_sites):
            idx = perms[s][torch.multinomial(popularity, N * l0, replacement=True, generator=g)]
            a = torch.zeros(N, C)
            a.scatter_(1, idx.view(N, l0), torch.rand(N, l0, generator=g) * 3 + 0.01)
            firings[f"{s}.mlp"] = (a > 0).view(B, S, C)
            acts[f"{s}.mlp"] = {"act": a.view(B, S, C)}
        logits = (torch.randn(N, 32, generator=g) @ U).view(B, S, V)
        return HarvestBatch(
            tokens=tokens, firings=firings, activations=acts, next_token_logits=logits
        )

    sites = [
        Site(name=f"{s}.mlp", n_components=C, reads_from=f"{s}.mlp_in", writes_to=(f"{s}.mlp_out",))
        for s in range(n_sites)
    ]
    return BenchAdapter(sites, ("act",), fn)


def batches(V: int, B: int, S: int) -> Callable[[int, int, int], Iterator[torch.Tensor]]:
    def source(rank: int, world: int, start: int) -> Iterator[torch.Tensor]:
        i = start
        while True:
            yield torch.randint(
                0, V, (B, S), generator=torch.Generator().manual_seed(rank + i * world)
            )
            i += 1

    return source


def fetch(url: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
        status = r.status
    return time.perf_counter() - t0, status, len(body)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--per-site", type=int, default=125_000)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import os

    import uvicorn

    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.plugins import temporary_plugins

    adapter = make_adapter(args.sites, args.per_site, args.vocab, args.l0)
    B, S = 2, 64
    result: dict[str, Any] = {"components": args.sites * args.per_site}
    with (
        tempfile.TemporaryDirectory() as tmp,
        temporary_plugins(("bench", BenchPlugin(adapter)), entry_points=False),
    ):
        os.environ["SPD_HOST_HOME"] = tmp
        config = HarvestConfig(
            n_tokens=args.n_batches * B * S, batch_size=B, seq_len=S, examples_per_component=8,
            context_tokens=8, checkpoint_every=1000, cooccurrence_fraction=0.2,
        )  # fmt: skip
        t0 = time.perf_counter()
        repo = run_harvest(DID, config, batches=batches(args.vocab, B, S), progress=False)
        assert repo is not None
        result["harvest_seconds"] = round(time.perf_counter() - t0, 2)

        from spd_host.viewer.app import Viewer, create_app
        from spd_host.viewer.source import open_sources

        t0 = time.perf_counter()
        viewer = Viewer(open_sources([DID]))
        result["index_build_seconds_first_start"] = round(time.perf_counter() - t0, 2)
        viewer.close()
        t0 = time.perf_counter()
        viewer = Viewer(open_sources([DID]))  # a second start reuses the cache
        result["index_open_seconds_later_starts"] = round(time.perf_counter() - t0, 3)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(create_app(viewer), host="127.0.0.1", port=port, log_level="warning")
        )
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        pages = {
            "index default (density desc)": "/d/0/",
            "index sorted by max act": "/d/0/?sort=max&desc=1",
            "index site + density filter": "/d/0/?site=3.mlp&dmin=0.001&dmax=0.5&sort=density&desc=0",
            "index search": "/d/0/?q=zzz",
            "index deep page (offset 500k)": "/d/0/?sort=key&desc=0&page=10001",
        }
        timings: dict[str, Any] = {}
        for name, path in pages.items():
            first = fetch(base + path)
            again = [fetch(base + path)[0] for _ in range(3)]
            timings[name] = {
                "status": first[1],
                "first_s": round(first[0], 3),
                "repeat_s": round(min(again), 3),
            }
        alive = viewer.indexes[0].keys(
            __import__("spd_host.viewer.index", fromlist=["IndexQuery"]).IndexQuery(
                alive="alive", sort="density"
            ),
            limit=5000,
        )
        rng = random.Random(0)
        comp = []
        for key in rng.sample(alive, min(5, len(alive))):
            t, status, size = fetch(f"{base}/d/0/c/{key}")
            comp.append({"key": key, "status": status, "seconds": round(t, 3), "bytes": size})
        timings["component pages"] = comp
        result["pages"] = timings
        result["token_index_status_at_end"] = viewer.indexes[0].status()
        server.should_exit = True
        th.join(timeout=10)
        viewer.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
