"""Shared CLI plumbing: consoles, JSON output and the error boundary."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from spd_host.errors import SpdHostError
from spd_host.paths import expand_user
from spd_host.safe_text import printable, redact

BaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="Load this base model (Hub name or local dir) instead of the one the "
        "decomposition names.",
    ),
]


PrependBosOpt = Annotated[
    bool | None,
    typer.Option(
        "--prepend-bos/--no-prepend-bos",
        help="Start each sequence with BOS (then seq_len - 1 dataset tokens); default: what "
        "the decomposition recorded, else what its tokenizer does.",
    ),
]
"""The one dataset option for BOS, on every command that builds token sequences."""


def use_base_model(value: str | None) -> None:
    """``--base-model``: checked now (a missing directory is an error before any work), then
    used for every base-model load of this process."""
    if not value:
        return
    from spd_host.models import override_base_model, resolve_model_source

    resolve_model_source(str(expand_user(value, "--base-model")))
    override_base_model(str(expand_user(value, "--base-model")))


console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output goes to stdout, unstyled, one document."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def safe(text: str) -> str:
    """Text from outside (labels, IDs, errors) for the terminal: secrets redacted, control
    characters escaped, Rich markup neutralised."""
    from spd_host.autointerp.runner import known_secrets

    try:
        secrets = known_secrets()
    except Exception:  # printing must not fail because a plugin did
        secrets = []
    return escape(printable(redact(text, secrets)))


@contextmanager
def user_errors() -> Iterator[None]:
    """Print ``SpdHostError`` without a traceback and exit with its code.

    Also turned into one-line errors: a config model rejecting an option value (pydantic's
    ``ValidationError``: the flag is named) and a full disk.
    """
    try:
        yield
    except SpdHostError as err:
        if os.environ.get("SPD_HOST_DEBUG"):
            raise
        _report(err)
        raise SystemExit(err.exit_code) from None
    except ValidationError as err:
        if os.environ.get("SPD_HOST_DEBUG"):
            raise
        from spd_host.cli.options import option_error

        _report(option_error(err))
        raise SystemExit(1) from None
    except Exception as err:
        if not disk_full(err) or os.environ.get("SPD_HOST_DEBUG"):
            raise
        filename = getattr(err, "filename", None)
        where = f" writing {filename}" if filename else ""
        _report(
            SpdHostError(
                f"the disk is full{where}",
                hint="free space (or point SPD_HOST_HOME / --out at a larger disk) and re-run: "
                "finished work and checkpoints are kept",
            )
        )
        raise SystemExit(1) from None


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = (
    "database or disk is full",  # sqlite3 (SQLITE_FULL)
    "no space left on device",  # strerror(ENOSPC), as Rust's io::Error (safetensors) words it
    "disk quota exceeded",  # strerror(EDQUOT)
    *(f"os error {n})" for n in _DISK_FULL_ERRNOS),
)


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a full disk or an exhausted quota.

    Writers report it differently: Python's ``OSError`` carries ``errno`` ENOSPC/EDQUOT;
    ``sqlite3`` raises ``OperationalError('database or disk is full')``; safetensors' Rust
    writer raises ``SafetensorError('... No space left on device (os error 28)')``, which is
    no ``OSError`` at all."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(current, (sqlite3.Error, OSError)) or type(current).__name__ in (
            "SafetensorError",
        ):
            text = str(current).lower()
            if any(t in text for t in _DISK_FULL_TEXT):
                return True
        current = current.__cause__ or current.__context__
    return False


def _report(err: SpdHostError) -> None:
    err_console.print(f"[bold red]error:[/] {safe(err.message)}", highlight=False)
    if err.hint:
        err_console.print(f"[yellow]hint:[/] {safe(err.hint)}", highlight=False)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of :func:`user_errors` for typer commands."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper
