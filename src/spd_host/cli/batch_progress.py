"""What the CLI shows of batches: the progress bar of a batch run (autointerp ``--batch``:
the engine reports a :class:`~spd_host.autointerp.batch.engine.BatchProgress` after every
poll; drawing it is the CLI's job) and the listing of open batches (``--list-batches``)."""

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


def open_batches_table(listing: list[Any], where: str) -> Any:
    """The open batches of one store (``--list-batches``): where each stands at the provider
    as last polled, what it holds and what it still has reserved against the cap."""
    from rich.markup import escape
    from rich.table import Table

    from spd_host.safe_text import printable

    table = Table(title=f"{len(listing)} open batch(es) in {escape(printable(where))}")
    for col in ("batch (local / provider id)", "provider / model", "created", "state",
                "requests", "reserved"):  # fmt: skip
        table.add_column(col)
    scopes = []
    for b in listing:
        state = b.provider_status or b.state
        if b.cancel_requested_at:
            state += "\ncancel requested"
        requests = (
            f"{b.n_requests}, {b.pending} pending\nprocessing {b.processing} ok {b.succeeded} "
            f"errored {b.errored} expired {b.expired} cancelled {b.canceled}"
        )
        cells = (f"{b.local_id}\n{b.provider_batch_id or '(not recorded)'}",
                 f"{b.provider}\n{b.model}", b.created_at[:19].replace("T", "\n"), state,
                 requests, f"${b.reserved_usd:.4f}")  # fmt: skip
        table.add_row(*(escape(printable(c, keep_newlines=True)) for c in cells))
        scopes.append(f"{b.local_id}: {b.scope}")
    if scopes:
        table.caption = escape(printable("scopes: " + "; ".join(scopes)))
    return table


def open_batches_json(listing: list[Any]) -> list[dict[str, Any]]:
    """The same listing for ``--json``: every field of each open batch."""
    import dataclasses

    return [dataclasses.asdict(b) for b in listing]


def list_open_batches(db: Any, *, json_out: bool) -> None:
    """Print the open batches of the store at ``db`` (a label store or a suite's spend
    database); nothing is sent to any provider. A store that does not exist has none."""
    from pathlib import Path

    from spd_host.cli.common import console, print_json

    path = Path(db)
    listing: list[Any] = []
    if path.exists():
        import sqlite3

        from spd_host.autointerp.batch.table import BatchTable

        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        try:
            has = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='batches'"
            ).fetchone()
            listing = BatchTable(conn).open_listing() if has else []
        finally:
            conn.close()
    if json_out:
        print_json(open_batches_json(listing))
    else:
        console.print(open_batches_table(listing, str(path)))
