"""``spd-host autointerp <id>``: label every harvested component with an LLM (or the offline
baseline), resumably and within a cost cap.

The cap is the label store's: it bounds everything ``labels.db`` has ever spent, so re-running
at ``--cost-cap 2`` never bills more than $2 in all; pass a higher ``--cost-cap`` to spend
more. The command exits non-zero when every component it tried failed, or when an error every
request would get (bad key, unknown model, bad URL) stopped the run.

Batches: ``--list-batches`` lists the store's open batches (nothing is sent);
``--cancel-batches`` cancels those of this run's scope (provider, model, strategy, harvest
run) and stores what they return. A synchronous run never sends a component an open batch
holds: it says how many it left out and which batches hold them.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from spd_host.autointerp.config import DEFAULT_COST_CAP_USD
from spd_host.cli.common import (
    BaseModelOpt,
    console,
    err_console,
    handles_errors,
    print_json,
    safe,
    use_base_model,
)

DEFAULT_COST_CAP = DEFAULT_COST_CAP_USD


@handles_errors
def autointerp(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo")],
    provider: Annotated[
        str | None,
        typer.Option(
            help="offline | anthropic | openai | openrouter | openai-compatible | a plugin's; "
            "default: first with a key set, else offline"
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "--label-model", help="the labelling model (default: the provider's)"
        ),
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="compact_skeptical | dual_view | rich_examples | canon | a plugin's")
    ] = "compact_skeptical",
    max_concurrent: Annotated[int, typer.Option(min=1, help="requests in flight at once")] = 8,
    rpm: Annotated[
        float | None, typer.Option(help="request starts per minute (default: unlimited)")
    ] = None,
    cost_cap: Annotated[
        float,
        typer.Option(help="hard cap in USD on all the label store has spent, across runs"),
    ] = DEFAULT_COST_CAP,
    no_cost_cap: Annotated[
        bool, typer.Option("--no-cost-cap", help="remove the cap (paid providers: careful)")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="label at most this many components")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="API endpoint (required for openai-compatible)")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="read the API key from this environment variable")
    ] = None,
    input_price: Annotated[
        float | None, typer.Option(help="USD per million input tokens (overrides the list)")
    ] = None,
    output_price: Annotated[
        float | None, typer.Option(help="USD per million output tokens")
    ] = None,
    price_per_mtok: Annotated[
        str | None,
        typer.Option(
            help="IN,OUT: USD per million input and output tokens (for a model not in the price list)"
        ),
    ] = None,
    max_output_tokens: Annotated[int, typer.Option(help="per call")] = 600,
    max_attempts: Annotated[int, typer.Option(help="attempts per component")] = 5,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 60.0,
    max_retry_after: Annotated[
        float, typer.Option(help="longest Retry-After (s) waited for; longer fails the request")
    ] = 300.0,
    n_top: Annotated[
        int | None, typer.Option(help="strongest examples shown (default: the strategy's, 10)")
    ] = None,
    n_quantiles: Annotated[
        int | None, typer.Option(help="strata for further examples (default: the strategy's, 4)")
    ] = None,
    per_quantile: Annotated[
        int | None,
        typer.Option(
            help="examples drawn per stratum (default: the strategy's; 2, or 5 for rich_examples/canon)"
        ),
    ] = None,
    examples: Annotated[
        str | None,
        typer.Option(
            "--example-format",
            help="example rendering: delimited | single_line | xml (default: the strategy's)",
        ),
    ] = None,
    annotate: Annotated[
        bool | None,
        typer.Option(
            "--annotate/--no-annotate",
            help="show each firing token's activation (single_line, xml)",
        ),
    ] = None,
    harvest_run: Annotated[
        str | None,
        typer.Option("--run", "--harvest-run", help="harvest sub-run (default: latest)"),
    ] = None,
    min_firing_count: Annotated[int, typer.Option(help="skip components that fired less")] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="label again components already labelled")
    ] = False,
    batch: Annotated[
        bool,
        typer.Option(
            "--batch",
            help="send through the provider's batch API (anthropic, openai): half price, "
            "results within 24 h; a killed run resumes by polling",
        ),
    ] = False,
    poll_interval: Annotated[
        float, typer.Option(help="seconds between batch status polls (--batch)")
    ] = 30.0,
    list_batches: Annotated[
        bool,
        typer.Option(
            "--list-batches", help="list the open batches of the label store; send nothing"
        ),
    ] = False,
    cancel_batches: Annotated[
        bool,
        typer.Option(
            "--cancel-batches",
            help="cancel this scope's open batches (same --provider/--model/--strategy/--run); "
            "store what finished, the rest become failure rows a re-run retries",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the run report as JSON")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    base_model: BaseModelOpt = None,
) -> None:
    """Label components with an LLM; re-running continues where the last run stopped."""
    use_base_model(base_model)
    if list_batches:
        from spd_host.autointerp.api import labels_db_path
        from spd_host.cli.batch_progress import list_open_batches

        list_open_batches(labels_db_path(decomposition_id), json_out=json_out)
        return
    from spd_host.autointerp.api import run_autointerp
    from spd_host.autointerp.config import AutointerpConfig
    from spd_host.autointerp.registry import get_provider
    from spd_host.autointerp.runner import failure_table, report_table
    from spd_host.cli.options import build

    if price_per_mtok is not None:
        from spd_host.autointerp.pricing import parse_price_pair

        input_price, output_price = parse_price_pair(price_per_mtok)
    chosen = get_provider(provider)
    if provider is None:
        note = " (offline BASELINE: no API key set)" if chosen.baseline else ""
        err_console.print(f"provider: {safe(chosen.name)}{note}", highlight=False)
    config = build(
        AutointerpConfig,
        dict(
            provider=chosen.name,
            model=model,
            strategy=strategy,
            strategy_options=_strategy_options(
                strategy,
                {"n_top": n_top, "n_quantiles": n_quantiles, "per_quantile": per_quantile},
                {"format": examples, "annotate": annotate},
            ),
            max_concurrent=max_concurrent,
            rpm=rpm,
            cost_cap_usd=None if no_cost_cap else cost_cap,
            max_attempts=max_attempts,
            timeout_s=timeout,
            max_retry_after_s=max_retry_after,
            max_output_tokens=max_output_tokens,
            base_url=base_url,
            api_key_env=api_key_env,
            input_price_per_mtok=input_price,
            output_price_per_mtok=output_price,
            limit=limit,
            min_firing_count=min_firing_count,
            batch=batch,
            poll_interval_s=poll_interval,
            cancel_batches=cancel_batches,
        ),
    )
    show = not (no_progress or json_out)
    from spd_host.cli.batch_progress import batch_bar

    with batch_bar(show and (batch or cancel_batches)) as on_batch:
        report = run_autointerp(
            decomposition_id,
            config,
            harvest_run=harvest_run,
            progress=show and not (batch or cancel_batches),
            console=err_console,
            force=force,
            batch_progress=on_batch,
        )
    if json_out:
        print_json(report.model_dump(mode="json"))
    else:
        console.print(report_table(report))
    if report.n_failed:
        err_console.print(failure_table(report))
        err_console.print(
            f"[yellow]{report.n_failed} component(s) failed; their errors are stored: "
            f"`spd-host show {safe(decomposition_id)} --failed` lists them. Re-run the same "
            "command to retry them.[/]",
            highlight=False,
        )
    if cancel_batches and not report.batches_collected and not report.batches_resumed:
        err_console.print(
            "no open batch in this scope (provider, model, strategy, harvest run); "
            f"`spd-host autointerp {safe(decomposition_id)} --list-batches` lists them all",
            highlight=False,
        )
    if report.n_in_open_batches:
        err_console.print(
            f"[yellow]{report.n_in_open_batches} component(s) not sent: open batch(es) "
            f"{safe(', '.join(report.open_batches))} hold them. Collect them with the same "
            "command and --batch, or cancel them with --cancel-batches.[/]",
            highlight=False,
        )
    if report.stopped_by_error:
        err_console.print(
            f"[bold red]stopped:[/] {safe(report.stopped_by_error)} (every later request would "
            "fail the same way; fix it and re-run)",
            highlight=False,
        )
        raise SystemExit(1)
    if report.n_failed and not report.n_labelled:
        raise SystemExit(1)


def _strategy_options(
    strategy: str, selection: dict[str, Any], rendering: dict[str, Any]
) -> dict[str, Any]:
    """The options given on the command line over the strategy's own defaults (the strategies
    differ: rich_examples and canon show 30 examples and annotate them)."""
    from spd_host.autointerp.registry import get_strategy

    out: dict[str, Any] = {}
    defaults = get_strategy(strategy).options().model_dump()
    for key, given in (("selection", selection), ("rendering", rendering)):
        chosen = {k: v for k, v in given.items() if v is not None}
        if chosen and key in defaults:
            out[key] = {**defaults[key], **chosen}
    return out
