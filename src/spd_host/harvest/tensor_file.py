"""Writing safetensors files one tensor at a time, without a second copy of the state.

Why not ``safetensors.torch.save_file``: it turns every tensor into a ``bytes`` object before
writing, so a checkpoint or a result file briefly needs twice the state's memory, and the
result writer also had to build every output array (the example banks in CSR order, as large
as the banks themselves) before the call. At a million components that doubled the harvest's
peak. Here the header is computed from each tensor's dtype and shape, and each tensor is then
produced (``Lazy``: built only when its turn comes, dropped after) and written straight from
its memory. The file is the standard format (8-byte little-endian header length, JSON header
with ``dtype``/``shape``/``data_offsets``, padded with spaces to 8 bytes, then the data in
header order), read by ``safetensors.safe_open`` / ``load_file`` like any other.

The bytes are handed to one writer thread through a queue of ``WRITE_DEPTH`` buffers, so
building the next tensor or chunk (restoring example windows, transposing co-occurrence) runs
while the previous one goes to disk: file writes release the GIL. At a million components the
result write was ~35 s of building and ~35 s of writing one after the other (profile). The
bytes and their order are the same as a sequential write; ``save_tensors`` returns only once
everything is written (or raises the writer's error), so a caller may change its tensors
afterwards. Large files bypass the page cache (``direct_io``: same bytes, far less system
time per GB).
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from spd_host.harvest.direct_io import BufferedSink, DirectSink, open_sink

Sink = BufferedSink | DirectSink

_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


@dataclass(frozen=True)
class Lazy:
    """A tensor of known dtype and shape, built by ``make`` when it is written.

    ``chunks``, when given, yields the tensor as consecutive slices along its first dimension
    instead (the writer writes each and drops it), so an array as large as a bank field is
    never whole in memory; ``make`` still builds the whole tensor, for callers that want it.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    chunks: Callable[[], Iterator[torch.Tensor]] | None = None


Entry = torch.Tensor | Lazy

WRITE_DEPTH = 2
"""Buffers queued for the writer thread (each at most one chunk or one tensor)."""


class _Writer:
    """One thread writing queued byte buffers to a file, in order.

    ``put`` blocks while ``WRITE_DEPTH`` buffers wait, and raises the writer's error (an
    ``OSError`` such as a full disk) once it has one; ``close`` waits for the queue to drain.
    """

    def __init__(self, fh: Sink) -> None:
        self._fh = fh
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=WRITE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spd-host-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (x := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._fh.write(x.numpy().data)
                except BaseException as e:  # handed to the caller's thread by put or close
                    self._error = e
            del x

    def put(self, x: torch.Tensor) -> None:
        """Queue the bytes of ``x`` (a tensor that nobody changes until ``close``)."""
        self._raise()
        self._queue.put(x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _spec(t: Entry) -> tuple[torch.dtype, tuple[int, ...]]:
    if isinstance(t, Lazy):
        return t.dtype, tuple(int(x) for x in t.shape)
    return t.dtype, tuple(int(x) for x in t.shape)


def save_tensors(tensors: Mapping[str, Entry], path: Path | str) -> None:
    """Write ``tensors`` to ``path`` (a safetensors file; the caller renames it into place)."""
    header: dict[str, object] = {}
    offset = 0
    specs = {}
    for name, t in tensors.items():
        dtype, shape = _spec(t)
        if dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        specs[name] = (dtype, shape, nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh = open_sink(path, 8 + len(raw) + offset)  # O_DIRECT for large files (direct_io.py)
    try:
        fh.write(memoryview(struct.pack("<Q", len(raw))))
        fh.write(memoryview(raw))
        writer = _Writer(fh)
        try:
            for name, t in tensors.items():
                dtype, shape, nbytes = specs[name]
                if isinstance(t, Lazy) and t.chunks is not None:
                    _write_chunks(writer, name, t.chunks(), dtype, shape)
                    continue
                x = t.make() if isinstance(t, Lazy) else t
                if x.dtype != dtype or tuple(x.shape) != shape:
                    raise ValueError(
                        f"tensor {name!r} came out as {x.dtype} {list(x.shape)}, "
                        f"announced {dtype} {list(shape)}"
                    )
                if nbytes:
                    writer.put(x)
                del x
        finally:
            writer.close()
    except BaseException:
        fh.abort()  # the caller removes the partial file; nothing more to flush
        raise
    fh.close()


def save_tensors_into_place(tensors: Mapping[str, Entry], target: Path, *, tag: str = "") -> None:
    """``save_tensors`` to a temporary name beside ``target`` (``.<name>.tmp<tag>``), renamed
    onto it once complete, so a reader never sees a partial file. On any failure the partial
    file is removed: on a full disk it must not keep holding the space."""
    tmp = target.with_name(f".{target.name}.tmp{tag}")
    try:
        save_tensors(tensors, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)


def _write_chunks(
    writer: _Writer,
    name: str,
    chunks: Iterator[torch.Tensor],
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> None:
    """Write first-dimension slices back to back (C order: the whole tensor's bytes)."""
    rows = 0
    for x in chunks:
        if x.dtype != dtype or tuple(x.shape[1:]) != shape[1:]:
            raise ValueError(
                f"tensor {name!r}: a chunk came out as {x.dtype} {list(x.shape)}, "
                f"announced {dtype} {list(shape)}"
            )
        rows += int(x.shape[0])
        if x.numel():
            writer.put(x)
        del x
    if rows != (shape[0] if shape else 1):
        raise ValueError(f"tensor {name!r}: chunks held {rows} rows, announced {list(shape)}")
