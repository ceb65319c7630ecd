"""Cheap fingerprints of the files a result was computed from.

A harvest sub-run is keyed on the decomposition ID, the config *and* these fingerprints, so
changing the decomposition's weights or the dataset file yields a new sub-run instead of
silently returning the old one. Cheap, not cryptographic proof: per file its relative path,
size, mtime (ns) and a SHA-256 of its first and last 64 KiB. Rewriting a file in place changes
its mtime; a different file of the same size changes its head or tail, or its mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

BLOCK = 64 * 1024
MAX_FILES = 5000  # a directory larger than this is fingerprinted by its first files in order


def _file_entry(path: Path, rel: str) -> list[object]:
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(BLOCK))
        if st.st_size > BLOCK:
            f.seek(max(BLOCK, st.st_size - BLOCK))
            h.update(f.read(BLOCK))
    return [rel, st.st_size, st.st_mtime_ns, h.hexdigest()]


def fingerprint_path(path: Path) -> str | None:
    """A short hex digest of a file or a directory tree; None when ``path`` does not exist."""
    path = Path(path)
    if path.is_file():
        entries = [_file_entry(path, path.name)]
    elif path.is_dir():
        files: list[Path] = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
            if len(files) >= MAX_FILES:
                break
        entries = [
            _file_entry(f, str(f.relative_to(path))) for f in files[:MAX_FILES] if f.is_file()
        ]
    else:
        return None
    blob = json.dumps(entries, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
