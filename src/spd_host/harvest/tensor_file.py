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
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

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
    with Path(path).open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, t in tensors.items():
            dtype, shape, nbytes = specs[name]
            if isinstance(t, Lazy) and t.chunks is not None:
                _write_chunks(fh, name, t.chunks(), dtype, shape)
                continue
            x = t.make() if isinstance(t, Lazy) else t
            if x.dtype != dtype or tuple(x.shape) != shape:
                raise ValueError(
                    f"tensor {name!r} came out as {x.dtype} {list(x.shape)}, "
                    f"announced {dtype} {list(shape)}"
                )
            if nbytes:
                x = x.detach().to("cpu").contiguous().reshape(-1)
                fh.write(x.view(torch.uint8).numpy().data)
            del x


def _write_chunks(
    fh: BinaryIO,
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
            x = x.detach().to("cpu").contiguous().reshape(-1)
            fh.write(x.view(torch.uint8).numpy().data)
        del x
    if rows != (shape[0] if shape else 1):
        raise ValueError(f"tensor {name!r}: chunks held {rows} rows, announced {list(shape)}")
