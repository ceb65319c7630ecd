"""Pipelined harvest (accumulation on a worker thread) against the sequential loop.

The reference for every statistic is the sequential path (``pipeline=False``, the engine as it
was before pipelining); the pipelined run must give the same bits, checkpoint exactly the state
after the batch it names, surface a worker's error in the caller, and leave no thread behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from spd_host.adapter import HarvestBatch, HarvestOptions, MethodInfo, SparseActivity
from spd_host.errors import HarvestBatchError
from spd_host.harvest import HarvestConfig, run_harvest
from spd_host.harvest.checkpoint import load_checkpoint
from spd_host.harvest.pipeline import AccumulationPipeline
from spd_host.harvest.runner import run_dir_name
from spd_host.hookspecs import hookimpl
from spd_host.plugins import temporary_plugins
from tests.harvest import toy_plugin
from tests.harvest.compare import assert_same_results
from tests.harvest.conftest import BATCH, SEQ, harvest_toy, toy_config

WORKER = "spd-host-harvest-accumulate"


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WORKER]


def _state_tensors(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, object], int]:
    found = load_checkpoint(state_dir)
    assert found is not None
    acc, meta = found
    tensors, acc_meta = acc.state()
    acc_meta = {k: v for k, v in acc_meta.items() if k != "config"}
    return tensors, acc_meta, int(meta["next_local_batch"])


def _assert_same_state(a: Path, b: Path) -> None:
    ta, ma, na = _state_tensors(a)
    tb, mb, nb = _state_tensors(b)
    assert na == nb
    assert ma == mb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _source_with(
    at: int, make: Callable[[int], torch.Tensor | BaseException]
) -> Callable[[int, int, int], Iterator[torch.Tensor]]:
    """The toy source, except global batch ``at``: ``make(at)`` is yielded, or raised."""

    def source(rank: int, world_size: int, start: int) -> Iterator[torch.Tensor]:
        i = start
        while True:
            g = rank + i * world_size
            if g == at:
                item = make(g)
                if isinstance(item, BaseException):
                    raise item
                yield item
            else:
                yield toy_plugin.toy_batch(g, BATCH, SEQ)
            i += 1

    return source


def test_deferred_top_k_is_computed_on_the_worker_with_the_same_bits(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``DeferredNextTokenTopK`` runs on the accumulation thread when pipelined, on the main
    thread when not, and gives the results the immediate top-k gives, bit for bit."""
    monkeypatch.setattr(toy_plugin, "FORM", "topk")
    now = harvest_toy(tmp_path / "now", toy_config(pipeline=True))
    monkeypatch.setattr(toy_plugin, "FORM", "deferred")
    threads = toy_plugin.DEFERRED_THREADS
    threads.clear()
    pipe = harvest_toy(tmp_path / "pipe", toy_config(pipeline=True))
    n_batches = 2400 // (BATCH * SEQ)
    assert threads == ["spd-host-harvest-accumulate"] * n_batches
    threads.clear()
    seq = harvest_toy(tmp_path / "seq", toy_config(pipeline=False))
    assert threads == [threading.main_thread().name] * n_batches
    assert_same_results(now.path, pipe.path, reservoir=True)
    assert_same_results(now.path, seq.path, reservoir=True)


@pytest.mark.parametrize("form", ["dense", "topk", "deferred"])
def test_pipelined_equals_sequential(
    toy_host: object, tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toy_plugin, "FORM", form)
    seq = harvest_toy(tmp_path / "seq", toy_config(pipeline=False))
    pipe = harvest_toy(tmp_path / "pipe", toy_config(pipeline=True))
    assert seq.n_tokens == pipe.n_tokens == 2400
    assert_same_results(seq.path, pipe.path, reservoir=True)
    assert not _workers()
    split = pipe.meta["pipeline"]
    assert set(split) == {"accumulate_s", "worker_idle_s", "main_blocked_s"}
    assert 0 < split["accumulate_s"] < pipe.meta["seconds"]
    assert set(seq.meta["pipeline"]) == {"accumulate_s"}


def test_pipeline_is_not_part_of_the_run_identity() -> None:
    on, off = toy_config(pipeline=True), toy_config(pipeline=False)
    assert on.identity() == off.identity()
    assert toy_config(background_merge=False).identity() == on.identity()
    assert "background_merge" not in on.identity()
    assert "pipeline" not in on.identity()
    assert run_dir_name("toy:demo", on) == run_dir_name("toy:demo", off)
    assert HarvestConfig().pipeline is True


def test_pipelined_stop_then_resume_is_bit_identical(toy_host: object, tmp_path: Path) -> None:
    # the checkpoint left by a stopped pipelined run is the sequential state after 7 batches
    harvest_stopped = tmp_path / "pipe"
    for out, pipeline in ((harvest_stopped, True), (tmp_path / "seq", False)):
        r = run_harvest(
            "toy:demo",
            toy_config(pipeline=pipeline),
            out=out,
            batches=toy_plugin.toy_source(BATCH, SEQ),
            progress=False,
            stop_after=7,
        )
        assert r is None
    assert (
        json.loads((harvest_stopped / "state" / "state.json").read_text())["next_local_batch"] == 7
    )
    _assert_same_state(harvest_stopped / "state", tmp_path / "seq" / "state")
    # resumed (pipelined) to the end: the bits of an uninterrupted sequential run
    resumed = harvest_toy(harvest_stopped, toy_config(pipeline=True))
    whole = harvest_toy(tmp_path / "whole", toy_config(pipeline=False))
    assert_same_results(whole.path, resumed.path, reservoir=True)
    assert not _workers()


def test_periodic_checkpoint_is_the_state_after_its_batch(toy_host: object, tmp_path: Path) -> None:
    """A run that dies at batch 31 leaves a periodic checkpoint; whichever batch it names,
    it holds exactly the sequential state after that batch, and resuming ends bit-identical."""
    broken = _source_with(31, lambda g: RuntimeError("disk gone"))
    with pytest.raises(RuntimeError, match="disk gone"):
        run_harvest(
            "toy:demo",
            toy_config(pipeline=True),
            out=tmp_path / "pipe",
            batches=broken,
            progress=False,
        )
    assert not _workers()
    n = json.loads((tmp_path / "pipe" / "state" / "state.json").read_text())["next_local_batch"]
    assert 2 <= n <= 30 and n % 2 == 0  # checkpoint_every=2 (the pacer may skip some)
    r = run_harvest(
        "toy:demo",
        toy_config(pipeline=False),
        out=tmp_path / "seq",
        batches=toy_plugin.toy_source(BATCH, SEQ),
        progress=False,
        stop_after=n,
    )
    assert r is None
    _assert_same_state(tmp_path / "pipe" / "state", tmp_path / "seq" / "state")
    resumed = harvest_toy(tmp_path / "pipe", toy_config(pipeline=True))
    whole = harvest_toy(tmp_path / "whole", toy_config(pipeline=False))
    assert_same_results(whole.path, resumed.path, reservoir=True)


class DuplicatingToy:
    """The toy plugin (sparse form), except that the ``bad``-th call lists an entry twice:
    the validation lets it through and the accumulator's repeat check (on the worker when
    pipelined) refuses it."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    @hookimpl
    def register_methods(self, register: Callable[[MethodInfo], None]) -> None:
        register(DUP_METHOD)

    @hookimpl
    def load_decomposition(self, decomposition_id: Any) -> Any:
        return toy_plugin.ToyAdapter(decomposition_id="dup:demo", method=DUP_METHOD)

    @hookimpl
    def harvest_fn(self, adapter: Any, options: HarvestOptions) -> Any:
        inner = toy_plugin.toy_harvest_fn(options.threshold, options)
        calls = [0]

        def fn(tokens: torch.Tensor) -> HarvestBatch:
            batch = inner(tokens)
            calls[0] += 1
            if calls[0] - 1 == self.bad:
                sp = batch.sparse["0.mlp"]
                twice = SparseActivity(
                    torch.cat([sp.position, sp.position[:1]]),
                    torch.cat([sp.component, sp.component[:1]]),
                    {t: torch.cat([v, v[:1]]) for t, v in sp.values.items()},
                )
                batch = dataclasses.replace(batch, sparse={**batch.sparse, "0.mlp": twice})
            return batch

        return fn


DUP_METHOD = MethodInfo(name="dup", description="The toy decomposition, with a faulty batch.")
DUPLICATE = "lists a .position, component. entry twice"


def _harvest_dup(out: Path, bad: int, source: Any = None, **cfg: object) -> Any:
    with temporary_plugins(("dup", DuplicatingToy(bad)), entry_points=False):
        return run_harvest(
            "dup:demo",
            toy_config(**cfg),
            out=out,
            batches=source or toy_plugin.toy_source(BATCH, SEQ),
            progress=False,
        )


@pytest.mark.parametrize("pipeline", [True, False])
def test_worker_error_surfaces_as_the_same_error(
    tmp_path: Path, pipeline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 5 is refused by the accumulator (on the worker when pipelined) and batch 6's
    tokens cannot be read: batch 5's error is the one raised, as in the sequential loop."""
    monkeypatch.setattr(toy_plugin, "FORM", "sparse")
    broken = _source_with(6, lambda g: RuntimeError("source broke after the bad batch"))
    with pytest.raises(HarvestBatchError, match=DUPLICATE):
        _harvest_dup(tmp_path / "out", 5, broken, pipeline=pipeline)
    assert not _workers()


def test_worker_error_on_the_last_batch_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toy_plugin, "FORM", "sparse")
    last = 2400 // (BATCH * SEQ) - 1
    with pytest.raises(HarvestBatchError, match=DUPLICATE):
        _harvest_dup(tmp_path / "out", last)
    assert not _workers()
    assert not (tmp_path / "out" / "harvest.json").exists()
    # the last periodic checkpoint is from before the bad batch
    n = json.loads((tmp_path / "out" / "state" / "state.json").read_text())["next_local_batch"]
    assert n <= last


def test_ctrl_c_stops_promptly_and_the_checkpoint_resumes(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spd_host.harvest import runner

    monkeypatch.setenv("TOY_SLEEP", "0.05")  # 50 batches: ~2.5 s, the signal lands mid-run
    # every due checkpoint is taken: on a loaded machine a slow first checkpoint made the pacer
    # skip the rest of the run, so batch 6 was never checkpointed and the run ended first
    monkeypatch.setattr(runner.CheckpointPacer, "RATIO", 0.0)
    out = tmp_path / "pipe"
    state = out / "state" / "state.json"
    sent: list[float] = []

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if state.exists() and json.loads(state.read_text())["next_local_batch"] >= 6:
                break
            time.sleep(0.005)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler for this test: an earlier test in the same process may have
    # left another one installed (the full suite failed here while the test alone passed)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    killer = threading.Thread(target=interrupt)
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            harvest_toy(out, toy_config(pipeline=True))
    finally:
        killer.join()
        signal.signal(signal.SIGINT, inherited)
    assert time.monotonic() - sent[0] < 2.0  # prompt: at most the batch in progress
    assert not _workers()
    assert not (out / "harvest.json").exists()
    assert load_checkpoint(out / "state") is not None  # the last periodic checkpoint is valid
    monkeypatch.delenv("TOY_SLEEP")
    resumed = harvest_toy(out, toy_config(pipeline=True))
    whole = harvest_toy(tmp_path / "whole", toy_config(pipeline=False))
    assert_same_results(whole.path, resumed.path, reservoir=True)


# -- the hand-off itself -----------------------------------------------------------------------
def test_pipeline_applies_in_order_with_bounded_depth() -> None:
    applied: list[int] = []
    live = {"now": 0, "max": 0}
    lock = threading.Lock()

    def apply(batch: object, g: int) -> None:
        time.sleep(0.002 * (g % 3))  # uneven update times
        applied.append(g)

    def done(batch: object) -> None:
        with lock:
            live["now"] -= 1

    with AccumulationPipeline(apply, depth=1, on_applied=done) as pipe:
        for g in range(40):
            with lock:
                live["now"] += 1
                live["max"] = max(live["max"], live["now"])
            pipe.submit(object(), g)
        pipe.drain()
        assert applied == list(range(40))
    # submitted but not yet applied, counted at a submit: one in progress, one waiting, this one
    assert live["max"] <= 3
    assert not _workers()


def test_pipeline_reraises_the_worker_exception_object() -> None:
    boom = ValueError("update failed")

    def apply(batch: object, g: int) -> None:
        if g == 2:
            raise boom

    pipe = AccumulationPipeline(apply)
    try:
        with pytest.raises(ValueError) as info:
            for g in range(10):
                pipe.submit(object(), g)
            pipe.drain()
        assert info.value is boom
    finally:
        pipe.close()
    assert not _workers()


def test_no_periodic_checkpoint_after_the_last_batch(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 batches, a checkpoint due every 2: the periodic ones stop before batch 50, whose
    state goes straight into the results (single process) or the shard's final state."""
    from spd_host.harvest import runner

    saved: list[tuple[int, bool]] = []
    real = runner.save_checkpoint

    def recording(state_dir: Path, acc: Any, meta: dict[str, Any]) -> None:
        saved.append((int(meta["next_local_batch"]), bool(meta.get("complete"))))
        real(state_dir, acc, meta)

    monkeypatch.setattr(runner, "save_checkpoint", recording)
    monkeypatch.setattr(runner.CheckpointPacer, "RATIO", 0.0)  # every due checkpoint is taken
    harvest_toy(tmp_path / "one", toy_config(pipeline=True))
    assert [n for n, _ in saved] == list(range(2, 50, 2))
    saved.clear()
    for rank in (0, 1):
        run_harvest(
            "toy:demo",
            toy_config(),
            out=tmp_path / "two",
            batches=toy_plugin.toy_source(BATCH, SEQ),
            progress=False,
            rank=rank,
            world_size=2,
        )
    # 25 batches per rank: periodic at 2..24, then the final (complete) state at 25
    per_rank = [(n, c) for n in range(2, 25, 2) for c in (False,)] + [(25, True)]
    assert saved == per_rank * 2
