"""Fixtures for harvest tests: the toy plugin registered, and a finished toy harvest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest
from spd_host.plugins import temporary_plugins
from tests.harvest import toy_plugin

# small tensors: one thread avoids OpenMP spin-waiting on a shared, loaded machine
torch.set_num_threads(1)

SEQ = 12
BATCH = 4


def toy_config(**kw: object) -> HarvestConfig:
    base: dict[str, object] = dict(
        n_tokens=2400,
        batch_size=BATCH,
        seq_len=SEQ,
        examples_per_component=5,
        context_tokens=3,
        checkpoint_every=2,
        seed=0,
        output_top_k=5,
        min_token_support=2,
        cooccurrence_fraction=1.0,
    )
    base.update(kw)
    return HarvestConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def toy_host() -> Iterator[object]:
    with temporary_plugins(("toy", toy_plugin), entry_points=False) as host:
        yield host


def harvest_toy(out: Path, config: HarvestConfig | None = None, **kw: object) -> HarvestRepo:
    config = config or toy_config()
    repo = run_harvest(
        "toy:demo",
        config,
        out=out,
        batches=toy_plugin.toy_source(config.batch_size, SEQ),
        progress=False,
        **kw,  # type: ignore[arg-type]
    )
    assert repo is not None
    return repo


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HarvestRepo]:
    out = tmp_path_factory.mktemp("toy_harvest")
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        yield harvest_toy(out)
