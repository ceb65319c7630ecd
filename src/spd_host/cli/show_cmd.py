"""``spd-host show <id> <component>``: a component's labels with its harvest evidence."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from spd_host.cli.common import (
    BaseModelOpt,
    console,
    handles_errors,
    print_json,
    safe,
    use_base_model,
)
from spd_host.errors import ResultsNotFoundError


@handles_errors
def show(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo")],
    component: Annotated[
        str | None, typer.Argument(help="component key '<site>:<index>' (omit with --failed)")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="only labels of this strategy")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "--label-model", help="only labels of this model")
    ] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="only labels of this provider")
    ] = None,
    harvest_run: Annotated[
        str | None,
        typer.Option("--run", "--harvest-run", help="harvest sub-run (default: latest)"),
    ] = None,
    examples: Annotated[int, typer.Option(help="activation examples to print")] = 8,
    failed: Annotated[
        bool, typer.Option("--failed", help="list the components whose labelling failed, and why")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    base_model: BaseModelOpt = None,
) -> None:
    """Print the component's labels (and failures) and the evidence they were made from."""
    use_base_model(base_model)
    from spd_host.autointerp.api import labels_db_path
    from spd_host.autointerp.store import LabelStore

    db = labels_db_path(decomposition_id)
    if failed:
        _show_failed(decomposition_id, db, strategy, model, json_out, provider)
        return
    if component is None:
        raise ResultsNotFoundError(
            "give a component key, or --failed",
            hint=f"e.g. `spd-host show {decomposition_id} <site>:0`; `spd-host info "
            f"{decomposition_id}` lists the sites",
        )
    records = []
    if db.exists():
        with LabelStore(db) as store:
            records = store.records(component_key=component, strategy=strategy, model=model)
        records = [r for r in records if provider is None or r.provider == provider]
    evidence: Any = None
    evidence_error = None
    try:
        from spd_host.autointerp.bridge import HarvestEvidence
        from spd_host.harvest import HarvestRepo

        repo = HarvestRepo.open(decomposition_id, harvest_run)
        if component not in {s.key for s in repo.summary()} and not records:
            sites = ", ".join(
                f"{n} (0-{c - 1})"
                for n, c in zip(repo.layout.names, repo.layout.sizes, strict=True)
            )
            raise ResultsNotFoundError(
                f"unknown component {component!r} for {decomposition_id}",
                hint=f"keys are '<site>:<index>'; sites: {sites}",
            )
        evidence = HarvestEvidence(repo)(component)
    except ResultsNotFoundError as err:
        if "unknown component" in err.message:
            raise
        evidence_error = err.message
    if not records and evidence is None:
        raise ResultsNotFoundError(
            f"nothing stored for {component} of {decomposition_id}: no labels and no harvest ({evidence_error})",
            hint=f"run `spd-host harvest {decomposition_id}` then `spd-host autointerp {decomposition_id}`",
        )
    if json_out:
        print_json(
            {
                "component": component,
                "labels": [
                    r.model_dump(exclude={"prompt", "system_prompt", "raw_response"})
                    for r in records
                ],
                "evidence": evidence.model_dump(mode="json") if evidence is not None else None,
            }
        )
        return
    console.print(f"[bold]{safe(component)}[/]  {safe(decomposition_id)}")
    if records:
        table = Table(title="labels")
        for col in ("label", "confidence", "strategy", "model", "status", "cost", "when"):
            table.add_column(col)
        for r in records:
            if r.status != "ok":
                label = f"[red]failed: {safe(r.error or '')}[/]"
            elif r.is_baseline:
                label = f"{safe(r.label or '')} [yellow](BASELINE, not an LLM)[/]"
            else:
                label = safe(r.label or "")
            table.add_row(
                label,
                safe(r.confidence or "-"),
                safe(r.strategy),
                safe(f"{r.provider}/{r.model}"),
                r.status,
                f"${r.cost_usd:.4f}",
                r.finished_at,
            )
        console.print(table)
        if any(r.is_baseline for r in records):
            console.print(
                "[yellow]BASELINE rows come from the offline PMI baseline explainer, not an LLM.[/]"
            )
        for r in records:
            if r.status == "ok" and r.reasoning:
                console.print(f"[dim]{safe(r.strategy)} · {safe(r.model)}:[/] {safe(r.reasoning)}")
    else:
        console.print("[yellow]no labels yet[/]")
    if evidence is None:
        console.print(f"[yellow]no harvest evidence: {safe(evidence_error or '')}[/]")
        return
    _print_evidence(evidence, examples)


def _show_failed(
    decomposition_id: str,
    db: Any,
    strategy: str | None,
    model: str | None,
    json_out: bool,
    provider: str | None = None,
) -> None:
    """Every failed component of the store with its stored error (newest first)."""
    from spd_host.autointerp.store import LabelStore

    if not db.exists():
        raise ResultsNotFoundError(
            f"no autointerp labels for {decomposition_id} ({db} does not exist)",
            hint=f"run `spd-host autointerp {decomposition_id}` first",
        )
    with LabelStore(db) as store:
        rows = store.records(strategy=strategy, model=model, status="failed")
    rows = [r for r in rows if provider is None or r.provider == provider]
    if json_out:
        print_json(
            [
                r.model_dump(include={"component_key", "strategy", "model", "error", "attempts"})
                for r in rows
            ]
        )
        return
    table = Table(title=f"{len(rows)} failed component(s) of {safe(decomposition_id)}")
    for col in ("component", "strategy", "model", "attempts", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            safe(r.component_key),
            safe(r.strategy),
            safe(r.model),
            str(r.attempts),
            safe(r.error or ""),
        )
    console.print(table)


def _print_evidence(ev: Any, n_examples: int) -> None:
    from spd_host.autointerp.selection import ExampleSelection, select_examples
    from spd_host.autointerp.strategies.formatting import fires_on, rate_text

    console.print(
        f"\n[bold]evidence[/] ({safe(ev.method_name)}, {safe(ev.location_description or ev.location)})"
    )
    console.print(f"firing rate: {rate_text(ev.firing_density)}")
    for side, stats in (
        ("input (current token)", ev.input_tokens),
        ("output (predicted next)", ev.output_tokens),
    ):
        table = Table(title=side)
        for col in ("PMI", "precision", "recall"):
            table.add_column(col)
        columns = [stats.pmi, stats.precision, stats.recall]
        for i in range(max((len(c) for c in columns), default=0)):
            cells = []
            for j, c in enumerate(columns):
                if i < len(c):
                    v = c[i].value
                    cells.append(
                        escape(f"{c[i].token!r} {v:.2f}" if j == 0 else f"{c[i].token!r} {v:.0%}")
                    )
                else:
                    cells.append("")
            table.add_row(*cells)
        console.print(table)
    chosen = select_examples(
        ev.examples, ExampleSelection(n_top=n_examples, n_quantiles=0), key=ev.component_key
    )
    console.print("[bold]top examples[/] (firing tokens in << >>)")
    for i, ex in enumerate(chosen, 1):
        console.print(
            f"{i:>2}. {safe(fires_on(ex))}  [dim](max {ex.max_activation:.3g})[/]",
            highlight=False,
        )
