"""Verify a finished harvest sub-run when it is opened, before anything trusts it.

A sub-run is finished when ``harvest.json`` exists (it is written last), but a disk error, a
partial copy or a hand edit can damage any file after that. Every reader goes through
:class:`~spd_host.harvest.repo.HarvestRepo`, so the checks live here and run once per open:

- ``harvest.json`` parses, has the schema version this code reads and the keys it needs;
- every data file exists and is not empty; the safetensors headers parse, the tables the
  readers slice are present with the shapes the layout implies (``[C]``, ``[T, C]``, CSR
  ``indptr`` of ``C + 1`` entries ending at the length of its column array);
- the SQLite index opens and holds one row per component.

All of this reads headers and counts only (milliseconds): content corruption inside an array
is not detected. A failure is a :class:`~spd_host.errors.FormatError` that names the file and
says to recompute with ``--force``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from spd_host.errors import FormatError
from spd_host.harvest.config import SCHEMA_VERSION
from spd_host.harvest.store import DB_FILE, EXAMPLE_KINDS, EXAMPLES_FILE, RESULT_JSON, STATS_FILE

REQUIRED_META = ("decomposition_id", "layout", "n_tokens", "config", "schema_version")
CSR_STATS = ("input", "output", "cooc", "cooc_t")
EXAMPLE_ARRAYS = ("score", "pos", "tokens", "acts", "fired")


def damaged(path: Path, what: str) -> FormatError:
    return FormatError(
        f"harvest sub-run {path} is damaged: {what}",
        hint="recompute it with `spd-host harvest <id> --force` (or delete that directory)",
    )


def read_meta(path: Path) -> dict[str, Any]:
    """``harvest.json``, checked for what every reader relies on."""
    meta_path = path / RESULT_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, f"{RESULT_JSON} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict):
        raise damaged(path, f"{RESULT_JSON} is not a JSON object")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise FormatError(
            f"harvest in {path} has schema version {meta.get('schema_version')}, "
            f"this spd-host reads version {SCHEMA_VERSION}",
            hint="recompute it with `spd-host harvest <id> --force` (or delete that sub-run)",
        )
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise damaged(path, f"{RESULT_JSON} lacks {', '.join(missing)}")
    layout = meta["layout"]
    try:
        sizes = [int(n) for n in layout["sizes"]]
        names = list(layout["names"])
        types = list(layout["act_types"])
    except (KeyError, TypeError, ValueError):
        raise damaged(path, f"{RESULT_JSON} has a malformed layout") from None
    if len(sizes) != len(names) or not types or any(n < 0 for n in sizes):
        raise damaged(path, f"{RESULT_JSON} has an inconsistent layout")
    if not isinstance(meta["n_tokens"], int) or meta["n_tokens"] < 0:
        raise damaged(path, f"{RESULT_JSON} has an invalid n_tokens {meta['n_tokens']!r}")
    return meta


def verify_files(path: Path, meta: dict[str, Any]) -> None:
    """Headers, shapes and row counts of the data files against the layout in ``meta``."""
    from safetensors import safe_open

    n_components = sum(int(n) for n in meta["layout"]["sizes"])
    n_types = len(meta["layout"]["act_types"])
    for name in (STATS_FILE, EXAMPLES_FILE, DB_FILE):
        f = path / name
        if not f.is_file():
            raise damaged(path, f"{name} is missing")
        if f.stat().st_size == 0:
            raise damaged(path, f"{name} is empty")

    def shapes(name: str) -> dict[str, list[int]]:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error type for bad headers
            raise damaged(path, f"{name} is not a readable safetensors file ({err})") from None

    def need(table: dict[str, list[int]], file: str, key: str, shape: list[int] | None) -> None:
        if key not in table:
            raise damaged(path, f"{file} has no tensor {key!r}")
        if shape is not None and table[key] != shape:
            raise damaged(path, f"{file}: {key} has shape {table[key]}, expected {shape}")

    def csr(table: dict[str, list[int]], file: str, prefix: str, parts: tuple[str, ...]) -> None:
        need(table, file, f"{prefix}_indptr", [n_components + 1])
        for part in parts:
            need(table, file, f"{prefix}_{part}", None)
            if table[f"{prefix}_{part}"][:1] != table[f"{prefix}_{parts[0]}"][:1]:
                raise damaged(
                    path, f"{file}: {prefix}_{part} and {prefix}_{parts[0]} differ in length"
                )

    stats = shapes(STATS_FILE)
    need(stats, STATS_FILE, "firing_count", [n_components])
    for key in ("sum_all", "sum_firing", "max_firing"):
        need(stats, STATS_FILE, key, [n_types, n_components])
    for prefix in CSR_STATS:
        csr(stats, STATS_FILE, prefix, ("cols", "values"))
    examples = shapes(EXAMPLES_FILE)
    for kind in EXAMPLE_KINDS:
        csr(examples, EXAMPLES_FILE, kind, EXAMPLE_ARRAYS)
    _check_indptr_ends(path, meta, n_components)
    try:
        con = sqlite3.connect(f"file:{path / DB_FILE}?mode=ro", uri=True)
        try:
            (rows,) = con.execute("SELECT COUNT(*) FROM components").fetchone()
        finally:
            con.close()
    except sqlite3.Error as err:
        raise damaged(path, f"{DB_FILE} cannot be read ({err})") from None
    if rows != n_components:
        raise damaged(path, f"{DB_FILE} has {rows} component rows, the layout has {n_components}")


def _check_indptr_ends(path: Path, meta: dict[str, Any], n_components: int) -> None:
    """Each CSR ``indptr`` must end at its column array's length (two scalars per table)."""
    from safetensors import safe_open

    for file, tables, first in (
        (STATS_FILE, CSR_STATS, "cols"),
        (EXAMPLES_FILE, EXAMPLE_KINDS, "score"),
    ):
        with safe_open(str(path / file), framework="pt") as f:
            for t in tables:
                end = int(f.get_slice(f"{t}_indptr")[n_components : n_components + 1][0])
                length = f.get_slice(f"{t}_{first}").get_shape()[0]
                if end != length:
                    raise damaged(
                        path, f"{file}: {t}_indptr ends at {end}, {t}_{first} has {length} rows"
                    )
