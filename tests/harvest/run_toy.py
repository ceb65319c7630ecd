"""Run a toy harvest from the command line (used by the torchrun and SIGKILL tests)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spd_host.harvest import HarvestConfig, run_harvest  # noqa: E402
from spd_host.plugins import temporary_plugins  # noqa: E402
from tests.harvest import toy_plugin  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n-tokens", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    config = HarvestConfig(
        n_tokens=a.n_tokens, batch_size=a.batch_size, seq_len=12, examples_per_component=5,
        context_tokens=3, checkpoint_every=a.checkpoint_every, seed=a.seed, output_top_k=5, min_token_support=2,
    )
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        run_harvest("toy:demo", config, out=Path(a.out), batches=toy_plugin.toy_source(a.batch_size, 12), progress=False)


if __name__ == "__main__":
    main()
