"""Fixtures for eval tests: a harvested toy decomposition and the local LLM server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# the autointerp tests' local LLM server (standard library only) is shared with these tests
sys.path.insert(0, str(Path(__file__).parents[1] / "autointerp"))

from tests.evals.toy_plugin import VOCAB, ToyPlugin

SEQ, BATCH, N_BATCHES = 16, 8, 6
THRESHOLD = 2.0  # about 5% of the toy's hidden units fire per token

# many single-window forwards: thread start-up costs more than the maths on a shared machine
torch.set_num_threads(1)


def toy_batches(rank: int, world_size: int, start_batch: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    for i in range(N_BATCHES):
        b = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        if i >= start_batch and i % world_size == rank:
            yield b


@pytest.fixture
def toy_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from spd_host.plugins import temporary_plugins

    for name in ("ANTHROPIC_API_KEY", "OPENROUTER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with temporary_plugins(("toytc", ToyPlugin()), entry_points=False) as host:
        yield host


@pytest.fixture
def harvested(toy_host: object) -> str:
    from spd_host.harvest import HarvestConfig, run_harvest

    config = HarvestConfig(
        n_tokens=SEQ * BATCH * N_BATCHES,
        batch_size=BATCH,
        seq_len=SEQ,
        examples_per_component=8,
        context_tokens=4,
        output_top_k=5,
        min_token_support=1,
        threshold=THRESHOLD,
    )
    run_harvest("toytc:demo", config, batches=toy_batches, progress=False)
    return "toytc:demo"
