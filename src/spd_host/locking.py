"""One advisory lock file per resource a run writes to (a label store, a harvest sub-run).

Two processes that label the same store or harvest the same sub-run at once would bill every
component twice or interleave checkpoints. The lock is an ``flock`` on ``<resource>.lock``:
the kernel drops it when the holder dies (SIGKILL included), so a stale lock can never block a
later run, and the file records the holder's pid so the refusal can name it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from spd_host.errors import ConfigError, SpdHostError

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class BusyError(SpdHostError):
    """Another process holds the lock of a resource this run needs."""


class RunLock:
    """``with RunLock(path, "autointerp run of t:demo"):`` holds ``path`` exclusively or raises
    :class:`BusyError` at once (never waits: a silent wait looks like a hang)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(
                f"cannot create the lock file {self.path} for the {self.what}: {err.strerror}",
                hint="the results directory must be a writable directory; check --out",
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise BusyError(
                    f"another {self.what} is running (pid {holder}); lock {self.path}",
                    hint="wait for it to finish (or stop it), then re-run; finished work is kept",
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
