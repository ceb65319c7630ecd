"""Read the trained decomposition out of an orbax checkpoint item, as numpy arrays.

param-decomp saves ``Decomposition(components, ci_fn)`` (equinox modules and registered
dataclasses) with ``ocp.args.StandardSave``; restored without a target structure, orbax gives
the same tree as nested dicts (attribute and dict keys), lists (tuples and lists) and ``None``
(absent optional leaves, e.g. a GELU block's ``gate``). Older runs hold one ``default`` item with
the whole ``TrainState``; only its ``components`` and ``ci_fn`` subtrees are kept.

orbax-checkpoint is the optional extra ``spd-host[jax]``; importing it is deferred to the read.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from spd_host.errors import FormatError, SpdHostError

EXTRA_HINT = "install the optional extra: pip install 'spd-host[jax]' (orbax-checkpoint, jax CPU)"


class MissingExtraError(SpdHostError):
    """An optional dependency needed for this input is not installed."""


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise MissingExtraError(
            f"reading param-decomp (orbax) checkpoints needs orbax-checkpoint ({err})",
            hint=EXTRA_HINT,
        ) from err
    return ocp


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_to_numpy(v) for v in tree]
    if tree is None:
        return None
    return np.asarray(tree)


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """orbax logs through absl and the root logger (e.g. about the saving run's devices, which
    host-numpy restores do not need); silence both for the read only."""
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _restore(item_dir: Path, *, metadata: bool) -> Any:
    """The item's metadata tree, or its arrays restored as host numpy.

    Arrays are restored with ``RestoreArgs(restore_type=np.ndarray)`` for every leaf (as
    param-decomp's own ``restore_decomposition_to_host``): a run saved from a device mesh
    records shardings over devices this machine does not have, which a plain restore refuses.
    Only ``components`` and ``ci_fn`` are read (``partial_restore``, as its
    ``_legacy_partial_restore``), so an older ``default`` item's optimizer states stay on disk.
    """
    ocp = _orbax()
    try:
        with _quiet_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpointer = ocp.PyTreeCheckpointer()
            meta = checkpointer.metadata(item_dir.resolve())
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
            if metadata:
                return tree
            import jax

            if not isinstance(tree, dict) or not {"components", "ci_fn"} <= set(tree):
                return tree  # reported by the caller, naming what the item holds
            # Only the decomposition: a pre-split `default` item also holds optimizer states.
            item = {k: tree[k] for k in ("components", "ci_fn")}
            abstract = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), item
            )
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item
            )
            return checkpointer.restore(
                item_dir.resolve(),
                args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                ),
            )
    except Exception as err:  # orbax/tensorstore raise many types for unreadable data
        raise FormatError(f"{item_dir}: not a readable orbax checkpoint item ({err})") from err


def _shapes(tree: Any) -> Any:
    """Metadata leaves -> zero-stride arrays of the stored shape (no memory, no data read)."""
    if isinstance(tree, dict):
        return {str(k): _shapes(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_shapes(v) for v in tree]
    if tree is None:
        return None
    shape = tuple(getattr(tree, "shape", ()) or ())
    return np.broadcast_to(np.zeros((), dtype=np.float32), shape)


def _split(restored: Any, item_dir: Path, convert: Any) -> dict[str, Any]:
    if not isinstance(restored, dict):
        raise FormatError(f"{item_dir}: expected a tree with components and ci_fn")
    missing = [k for k in ("components", "ci_fn") if k not in restored]
    if missing:
        raise FormatError(
            f"{item_dir}: checkpoint item has no {missing} (top-level keys: {sorted(restored)})"
        )
    return {"components": convert(restored["components"]), "ci_fn": convert(restored["ci_fn"])}


def read_item_shapes(item_dir: Path) -> dict[str, Any]:
    """The ``{components, ci_fn}`` tree with shape-only leaves, from orbax's metadata alone."""
    return _split(_restore(item_dir, metadata=True), item_dir, _shapes)


def read_item(item_dir: Path) -> dict[str, Any]:
    """The ``{components, ci_fn}`` tree of one checkpoint item (``decomposition`` or ``default``)."""
    return _split(_restore(item_dir, metadata=False), item_dir, _to_numpy)
