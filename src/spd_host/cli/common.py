"""Shared CLI plumbing: consoles, JSON output and the error boundary."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape

from spd_host.errors import SpdHostError

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine-readable output goes to stdout, unstyled, one document."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def user_errors() -> Iterator[None]:
    """Print ``SpdHostError`` without a traceback and exit with its code."""
    try:
        yield
    except SpdHostError as err:
        if os.environ.get("SPD_HOST_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False)
        if err.hint:
            err_console.print(f"[yellow]hint:[/] {escape(err.hint)}", highlight=False)
        raise SystemExit(err.exit_code) from None


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator form of :func:`user_errors` for typer commands."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper
