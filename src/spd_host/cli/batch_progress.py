"""The progress bar of a batch run (autointerp ``--batch``): the engine reports a
:class:`~spd_host.autointerp.batch.engine.BatchProgress` after every poll; drawing it is the
CLI's job."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from spd_host.cli.common import err_console


@contextlib.contextmanager
def batch_bar(show: bool) -> Iterator[Callable[[Any], None] | None]:
    """The batch run's progress bar (the engine reports a BatchProgress after each poll)."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "submitted {task.fields[submitted]} running {task.fields[running]} "
            "[green]ok {task.fields[succeeded]}[/] [red]errored {task.fields[errored]}[/] "
            "[yellow]expired {task.fields[expired]}[/] batches {task.fields[batches]} "
            "${task.fields[spent]:.4f}"
        ),
        TimeElapsedColumn(),
        console=err_console,
    )
    task = bar.add_task(
        "batch", total=None, submitted=0, running=0, succeeded=0, errored=0, expired=0,
        batches=0, spent=0.0,
    )  # fmt: skip

    def update(p: Any) -> None:
        done = p.succeeded + p.errored + p.expired + p.canceled
        bar.update(
            task, total=p.total, completed=done, submitted=p.submitted, running=p.running,
            succeeded=p.succeeded, errored=p.errored, expired=p.expired + p.canceled,
            batches=p.batches, spent=p.spent_usd,
        )  # fmt: skip

    with bar:
        yield update
