"""Reading config files and safetensors headers with errors that name the file and tensor.

Shapes are read from safetensors headers (``safe_open(...).get_slice(name).get_shape()``) so
that listing a decomposition's sites never loads its weights; tensors are read one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spd_host.errors import FormatError
from spd_host.safe_yaml import load_yaml


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FormatError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = load_yaml(path.read_text(), path)  # refuses alias bombs
    except FileNotFoundError as err:
        raise FormatError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise FormatError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


class TensorFile:
    """One safetensors file: its keys and shapes from the header; tensors on demand."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        if not path.is_file():
            raise FormatError(
                f"{path}: file not found",
                hint="the directory is incomplete; download or export it again",
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                self.shapes: dict[str, tuple[int, ...]] = {
                    k: tuple(f.get_slice(k).get_shape())
                    for k in f.keys()  # noqa: SIM118
                }
        except Exception as err:  # safetensors raises SafetensorError / OSError variants
            raise FormatError(f"{path}: not a readable safetensors file ({err})") from err

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        self.require(key)
        return self.shapes[key]

    def require(self, key: str) -> None:
        if key not in self.shapes:
            raise FormatError(
                f"{self.path}: missing tensor {key!r} (found: {sorted(self.shapes)})",
                hint="the file is incomplete or was written by a different library/version",
            )

    def expect(self, key: str, shape: tuple[int, ...], what: str = "") -> None:
        got = self.shape(key)
        if got != tuple(shape):
            extra = f" ({what})" if what else ""
            raise FormatError(
                f"{self.path}: tensor {key!r} has shape {list(got)}, expected {list(shape)}{extra}",
                hint="the file does not match its config or its sibling tensors",
            )

    def get(self, key: str, dtype: torch.dtype | None = torch.float32) -> Tensor:
        from safetensors import safe_open

        self.require(key)
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            t = f.get_tensor(key)
        return t if dtype is None else t.to(dtype)

    def get_slice(self, key: str, index: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        """``tensor[index]`` read from disk without loading the rest of the tensor."""
        from safetensors import safe_open

        self.require(key)
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_slice(key)[index].to(dtype)


def decomposition_dir(decomposition_id: Any, *, demo_dir: Path, trainer: str) -> Path | None:
    """Where a transcoder/CLT decomposition's files are: the bundled demo, or ``fetch_source``.

    Returns ``None`` for short IDs, which these methods do not own. ``trainer`` is the module
    that rebuilds the demo, named in the error when the demo assets are missing.
    """
    from spd_host.errors import SourceNotFoundError
    from spd_host.ids import SourceKind, fetch_source

    if decomposition_id.kind is SourceKind.DEMO:
        if not (demo_dir / "config.yaml").is_file():
            raise SourceNotFoundError(
                f"{decomposition_id.method}:demo is not installed ({demo_dir} is missing)",
                hint=f"build it with: python -m {trainer}",
            )
        return demo_dir
    if decomposition_id.kind is SourceKind.SHORT:
        return None
    return fetch_source(decomposition_id)


def read_torch_state_dict(path: Path, *, hint: str) -> dict[str, Tensor]:
    """A ``torch.save``d state dict, read with ``weights_only=True`` (memory-mapped when the file
    allows): tensors only; a pickled object is refused and named, never run.

    ``hint`` says what the file should be (it differs per format).
    """
    import pickle
    import re

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"an object of type {found.group(1)}" if found else "a non-tensor object"
        raise FormatError(
            f"{path}: not a readable torch state dict: refused to unpickle the checkpoint: it "
            f"holds {what}",
            hint=f"{hint}; re-save it with torch.save(model.state_dict(), ...) in a trusted "
            "environment",
        ) from err
    except Exception as err:  # RuntimeError, EOFError, OSError, ... all mean "unreadable"
        raise FormatError(
            f"{path}: not a readable torch state dict ({type(err).__name__}: {str(err)[:200]})",
            hint=hint,
        ) from err
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise FormatError(
            f"{path}: expected a state dict of named tensors, got {type(obj).__name__}", hint=hint
        )
    return dict(obj)
