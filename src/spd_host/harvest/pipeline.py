"""Overlap the model with the accumulation: one worker thread applies the updates.

The harvest loop alternates two costs: the plugin's HarvestFn (forward, encode, validation)
and ``HarvestAccumulator.update``. Run one after the other on one thread, a batch costs their
sum. torch releases the GIL inside its ops, so the accumulation of batch ``i`` can run on a
second thread while the main thread computes batch ``i + 1``: a batch then costs about the
longer of the two.

Why results stay bit-identical to the sequential loop: a single worker applies the updates,
in submission order, each with its global batch index (every random draw is seeded by it), so
the accumulator sees exactly the calls it would have seen on one thread. Only *when* an update
runs moves, never what it computes.

Memory stays bounded: the hand-off holds at most ``depth`` batches (default 1), so at most
three batches' tensors are alive: the one being accumulated, the one waiting, the one the
model is computing.

Devices. On CUDA the worker enqueues each update on the stream that was current in the main
thread when the batch was submitted (the default stream, unless the plugin made another one
current): one stream for the model and the accumulation, so stream order puts every read of
a batch after the kernels that produced it, and the caching allocator, which reuses a freed
block on its allocation stream, never hands out memory an update is still reading. The host
thread queues the next forward while the device accumulates; the device runs them in
order. A plugin that keeps a side stream without making it current must synchronise it
before returning (ordinary torch practice for any consumer). On the CPU there is nothing to
order: an op has finished when it returns.

Threads (CPU). ``torch.set_num_threads`` is process-wide: each Python thread sizes its own
intra-op team from it, and with a size of 1 every op runs on its calling thread. So with one
torch thread a pipelined harvest uses two cores (model and accumulation), and with ``n``
threads up to ``2n`` busy threads may compete for the cores.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

Apply = Callable[[Any, int], None]
"""``(batch, global_batch) -> None``: the update the worker applies (``acc.update``)."""


class AccumulationPipeline:
    """A bounded, ordered hand-off from the main thread to one accumulation worker.

    ``submit`` queues ``(batch, global batch)`` (blocking while ``depth`` are waiting);
    ``drain`` waits until every submitted batch is applied (checkpoints, the end of the run);
    ``close`` (always, in ``finally``) drops what has not started, waits for the update in
    progress and joins the thread. An exception raised by an update is re-raised, as the same
    object, in the main thread by the next ``submit`` / ``drain`` (or ``raise_error``); the
    batches queued behind it are dropped, as the sequential loop would never have run them.
    """

    def __init__(
        self,
        apply: Apply,
        *,
        depth: int = 1,
        device: str | torch.device = "cpu",
        on_applied: Callable[[Any], None] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._apply = apply
        self._depth = depth
        self._device = torch.device(device)
        self._on_applied = on_applied
        self._cuda = self._device.type == "cuda"
        self._cond = threading.Condition()
        self._pending: deque[tuple[Any, int, Any]] = deque()
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        # seconds: the worker applying / waiting for a batch; the main thread waiting for the
        # worker (a free slot or a drain). Which side bounds the rate, for benchmarks.
        self.timings = {"accumulate_s": 0.0, "worker_idle_s": 0.0, "main_blocked_s": 0.0}
        self._thread = threading.Thread(
            target=self._work, name="spd-host-harvest-accumulate", daemon=True
        )
        self._thread.start()

    # -- main thread ---------------------------------------------------------------------------
    def submit(self, batch: Any, global_batch: int) -> None:
        """Queue one batch after the ones already queued; raises an earlier update's error."""
        stream = torch.cuda.current_stream(self._device) if self._cuda else None
        with self._cond:
            t0 = time.perf_counter()
            while len(self._pending) >= self._depth and self._error is None:
                self._cond.wait()
            self.timings["main_blocked_s"] += time.perf_counter() - t0
            self._raise_locked()
            if self._closed:
                raise RuntimeError("submit on a closed AccumulationPipeline")
            self._pending.append((batch, global_batch, stream))
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted batch is applied; raises an update's error."""
        with self._cond:
            t0 = time.perf_counter()
            while (self._pending or self._busy) and self._error is None:
                self._cond.wait()
            self.timings["main_blocked_s"] += time.perf_counter() - t0
            self._raise_locked()

    def raise_error(self) -> None:
        """Re-raise an update's error, if one happened (without waiting)."""
        with self._cond:
            self._raise_locked()

    @property
    def error(self) -> BaseException | None:
        with self._cond:
            return self._error

    def close(self) -> None:
        """Drop batches not yet started, wait for the one in progress, join the worker."""
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> AccumulationPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_locked(self) -> None:
        if self._error is not None:
            raise self._error

    # -- worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        if self._cuda:
            with torch.cuda.device(self._device):
                self._loop()
        else:
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                t0 = time.perf_counter()
                while not self._pending and not self._closed:
                    self._cond.wait()
                self.timings["worker_idle_s"] += time.perf_counter() - t0
                if not self._pending:  # closed and nothing left
                    return
                batch, global_batch, stream = self._pending.popleft()
                self._busy = True
                self._cond.notify_all()  # a slot is free for the main thread
            try:
                t0 = time.perf_counter()
                with torch.no_grad(), _on_stream(stream):
                    self._apply(batch, global_batch)
                self.timings["accumulate_s"] += time.perf_counter() - t0
                if self._on_applied is not None:
                    self._on_applied(batch)
            except BaseException as err:  # handed to the main thread as is
                with self._cond:
                    self._error = err
                    self._pending.clear()
                    self._busy = False
                    self._cond.notify_all()
                return
            del batch, stream  # do not keep this batch's tensors alive while waiting
            with self._cond:
                self._busy = False
                self._cond.notify_all()


def _on_stream(stream: Any) -> Any:
    """``torch.cuda.stream(stream)`` for a CUDA stream, else nothing to switch."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


class InlineAccumulation:
    """The sequential path with the pipeline's interface: ``submit`` applies at once.

    ``HarvestConfig(pipeline=False)``: for plugins that reuse their output buffers between
    calls, for debugging, and as the reference the pipelined path is tested against.
    """

    def __init__(self, apply: Apply, *, on_applied: Callable[[Any], None] | None = None) -> None:
        self._apply = apply
        self._on_applied = on_applied
        self.timings = {"accumulate_s": 0.0}

    def submit(self, batch: Any, global_batch: int) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            self._apply(batch, global_batch)
        self.timings["accumulate_s"] += time.perf_counter() - t0
        if self._on_applied is not None:
            self._on_applied(batch)

    def drain(self) -> None:
        pass

    def raise_error(self) -> None:
        pass

    @property
    def error(self) -> BaseException | None:
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> InlineAccumulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
