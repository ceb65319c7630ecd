"""Where spd-host keeps results and caches.

One root (``SPD_HOST_HOME``, default ``~/.spd-host``) holds ``results/<storage key>/...`` for
every decomposition and ``cache/`` for downloaded sources, so that deleting one directory
forgets everything and tests can point the whole tool at a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SPD_HOST_HOME"


def home() -> Path:
    """The root directory (created on first use)."""
    raw = os.environ.get(HOME_ENV)
    root = Path(raw).expanduser() if raw else Path.home() / ".spd-host"
    root.mkdir(parents=True, exist_ok=True)
    return root


def results_dir(storage_key: str) -> Path:
    """Results of one decomposition, keyed by ``DecompositionId.storage_key``."""
    return home() / "results" / storage_key


def cache_dir(*parts: str) -> Path:
    """A cache sub-directory, e.g. ``cache_dir("wandb", run_id)`` or ``cache_dir("demo")``."""
    path = home().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def expand_user(raw: str | Path, what: str = "path") -> Path:
    """``Path(raw).expanduser()``, with ``~nosuchuser/...`` a clear error instead of the bare
    ``RuntimeError`` pathlib raises."""
    from spd_host.errors import SourceNotFoundError

    try:
        return Path(raw).expanduser()
    except RuntimeError:
        raise SourceNotFoundError(
            f"{what} {str(raw)!r}: the user named after '~' does not exist on this machine",
            hint="give an absolute path, or one starting with '~/' for your own home",
        ) from None
