"""Atomic checkpoints of an accumulator: safetensors for tensors, JSON for the rest.

A checkpoint is ``state-<batches>.safetensors`` plus ``state.json`` naming it. The tensor
file is written under a temporary name and renamed, then the JSON is written the same way;
the JSON's rename is the commit point, so a crash at any moment leaves either the previous
checkpoint or the new one, never a mix. Older tensor files are removed after the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from spd_host.errors import FormatError
from spd_host.harvest.accumulator import HarvestAccumulator
from spd_host.harvest.tensor_file import save_tensors_into_place

STATE_JSON = "state.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def save_checkpoint(directory: Path, acc: HarvestAccumulator, extra: dict[str, Any]) -> Path:
    """Write the accumulator's state atomically; ``extra`` lands in the JSON (e.g. next batch)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = acc.state()
    name = f"state-{acc.n_batches:09d}.safetensors"
    save_tensors_into_place(tensors, directory / name, tag=f"-{os.getpid()}")
    meta = {**meta, **extra, "tensors": name}
    atomic_write_text(directory / STATE_JSON, json.dumps(meta, indent=1))
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / STATE_JSON


def load_checkpoint(
    directory: Path, device: str | None = None
) -> tuple[HarvestAccumulator, dict[str, Any]] | None:
    """The last committed state in ``directory`` (on ``device``, default the recorded one; CPU
    for a merge), or None when there is none."""
    meta_path = directory / STATE_JSON
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(directory / meta["tensors"]))
    except (OSError, ValueError, KeyError) as err:
        raise FormatError(
            f"harvest checkpoint in {directory} is unreadable: {err}",
            hint="delete that directory to start the harvest over",
        ) from err
    return HarvestAccumulator.from_state(tensors, meta, device or "cpu"), meta
