"""``spd-host eval``: run eval suites on one or more decompositions and compare them.

``spd-host eval fidelity ID [ID ...]`` prints one comparison table (a row per decomposition
and splice variant); ``spd-host eval all ID`` runs every installed suite; ``spd-host eval run
SUITE ID ...`` runs a suite a plugin added; ``spd-host eval list`` shows what is installed.
Every result is saved as JSON under ``<results>/<storage key>/evals/<suite>.json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from spd_host.cli.common import (
    BaseModelOpt,
    PrependBosOpt,
    console,
    err_console,
    handles_errors,
    print_json,
    use_base_model,
)
from spd_host.errors import SpdHostError

eval_app = typer.Typer(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80},
    rich_markup_mode=None,
    help="Evaluate decompositions (fidelity, intruder, detection, fuzzing, plugin suites).",
    no_args_is_help=True,
)

IdsArg = Annotated[
    list[str], typer.Argument(help="Decomposition IDs, e.g. transcoder:demo spd:demo")
]
NTokens = Annotated[int | None, typer.Option("--n-tokens", help="Held-out tokens to evaluate on.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Sequences per batch.")]
SeqLen = Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")]
Dataset = Annotated[
    str | None, typer.Option("--dataset", help="Token source (default: the decomposition's).")
]
TextColumn = Annotated[
    str | None,
    typer.Option("--text-column", help="Text column of a .jsonl/Hub dataset (default: recorded)."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the results as JSON.")]
Wandb = Annotated[bool, typer.Option("--wandb", help="Also log the results to a wandb run.")]
WandbProject = Annotated[str, typer.Option("--wandb-project", help="wandb project for --wandb.")]
WandbName = Annotated[str | None, typer.Option("--wandb-name", help="wandb run name.")]
WandbGroup = Annotated[str | None, typer.Option("--wandb-group", help="wandb run group.")]
WandbTags = Annotated[
    list[str] | None, typer.Option("--wandb-tags", help="wandb run tag (repeatable).")
]
WandbEntity = Annotated[str | None, typer.Option("--wandb-entity", help="wandb entity (team).")]
Detail = Annotated[bool, typer.Option("--detail", help="Also print each result's detail table.")]


def _config(suite: Any, options: dict[str, Any]) -> Any:
    """Keep the options this suite's config has (``all`` passes every flag to every suite);
    a rejected value is a one-line error naming the flag."""
    from spd_host.cli.options import build

    fields = suite.config_model.model_fields
    given = {k: v for k, v in options.items() if k in fields and v is not None}
    if options.get("no_cost_cap") and "cost_cap_usd" in fields:
        given["cost_cap_usd"] = None
    return build(suite.config_model, given)


def wandb_run_fields(
    name: str | None, group: str | None, tags: list[str] | None, entity: str | None
) -> dict[str, Any]:
    """The ``--wandb-name/--wandb-group/--wandb-tags/--wandb-entity`` values, as ``run_many`` takes them."""
    return {"name": name, "group": group, "tags": tags, "entity": entity}


def run_many(
    suite_names: list[str],
    ids: list[str],
    options: dict[str, Any],
    *,
    json_out: bool,
    wandb: bool,
    wandb_project: str,
    detail: bool = False,
    wandb_run: dict[str, Any] | None = None,
) -> None:
    """Run suites x IDs; save each result as it completes; a failure does not stop the others."""
    from spd_host.evals import get_suite, run_suite
    from spd_host.evals.runner import common_data_options
    from spd_host.evals.tables import comparison_table, fidelity_detail_table, print_table

    results = []
    failures: list[tuple[str, str, SpdHostError]] = []
    options = common_data_options(ids, options)
    if any("seq_len" in get_suite(n).config_model.model_fields for n in suite_names):
        from spd_host.cli.options import check_seq_len_fits

        check_seq_len_fits(ids, options.get("seq_len"))
    for suite_name in suite_names:
        suite = get_suite(suite_name)
        config = _config(suite, options)
        for did in ids:
            try:
                results.append(run_suite(suite_name, did, config))
            except SpdHostError as err:
                if len(ids) * len(suite_names) == 1:
                    raise
                failures.append((suite_name, did, err))
    if json_out:
        print_json(
            {
                "results": [r.model_dump(mode="json") for r in results],
                "failures": [
                    {"suite": s, "decomposition_id": d, "error": e.message, "hint": e.hint}
                    for s, d, e in failures
                ],
            }
        )
    else:
        for suite_name in suite_names:
            mine = [r for r in results if r.suite == suite_name]
            if mine:
                print_table(console, comparison_table(mine))
                if detail and suite_name == "fidelity":
                    for r in mine:
                        print_table(console, fidelity_detail_table(r))
    for suite_name, did, failure in failures:
        err_console.print(
            f"[bold red]{escape(suite_name)} failed for {escape(did)}:[/] {escape(failure.message)}"
            + (f"\n  [yellow]hint:[/] {escape(failure.hint)}" if failure.hint else ""),
            highlight=False,
        )
    if wandb and results:
        from spd_host.evals.wandb_log import log_results

        where = log_results(results, project=wandb_project, **(wandb_run or {}))
        err_console.print(f"logged {len(results)} result(s) to wandb: {escape(where)}")
    if failures:
        raise SystemExit(1)


@eval_app.command("list")
@handles_errors
def list_suites(json_out: JsonOut = False) -> None:
    """List the installed eval suites (the host's and every plugin's)."""
    from spd_host.evals import eval_suites

    suites = eval_suites()
    if json_out:
        print_json(
            [
                {
                    "name": s.name,
                    "description": s.description,
                    "needs_llm": s.needs_llm,
                    "needs_harvest": s.needs_harvest,
                    "config": s.config_model.model_json_schema(),
                }
                for s in suites.values()
            ]
        )
        return
    table = Table(title=f"{len(suites)} eval suites")
    for c in ("suite", "needs", "description"):
        table.add_column(c)
    for s in suites.values():
        needs = ", ".join(n for n, f in (("LLM", s.needs_llm), ("harvest", s.needs_harvest)) if f)
        table.add_row(s.name, needs or "-", s.description)
    console.print(table)


@eval_app.command("fidelity")
@handles_errors
def fidelity(
    ids: IdsArg,
    n_tokens: NTokens = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    dataset: Dataset = None,
    text_column: TextColumn = None,
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="Splice variant(s); default all.")
    ] = None,
    per_site: Annotated[
        bool, typer.Option("--per-site/--no-per-site", help="Also splice each site alone.")
    ] = True,
    per_site_variants: Annotated[
        str,
        typer.Option("--per-site-variants", help="Variants per single-site scope: first or all."),
    ] = "first",
    convention: Annotated[
        str,
        typer.Option(
            "--convention", help="Definitions: spd-host, saelens or goodfire (docs/evals.md)."
        ),
    ] = "spd-host",
    prepend_bos: PrependBosOpt = None,
    rounding_threshold: Annotated[
        float | None,
        typer.Option("--rounding-threshold", help="goodfire: rounded_ci threshold (run's)."),
    ] = None,
    ci_sampling: Annotated[
        bool, typer.Option("--ci-sampling", help="goodfire: eval CI under the run's sampling.")
    ] = False,
    json_out: JsonOut = False,
    base_model: BaseModelOpt = None,
    wandb: Wandb = False,
    wandb_project: WandbProject = "spd-host-evals",
    wandb_name: WandbName = None,
    wandb_group: WandbGroup = None,
    wandb_tags: WandbTags = None,
    wandb_entity: WandbEntity = None,
    detail: Detail = False,
) -> None:
    """Splice each decomposition into its base model: CE/KL scores, explained variance, L0."""
    use_base_model(base_model)
    from spd_host.evals.configs import CONVENTIONS

    if convention not in CONVENTIONS:
        raise typer.BadParameter(
            f"unknown convention {convention!r}; one of: {', '.join(CONVENTIONS)}",
            param_hint="--convention",
        )
    if per_site_variants not in ("first", "all"):
        raise typer.BadParameter(
            f"{per_site_variants!r} is not first or all", param_hint="--per-site-variants"
        )
    options = {
        "n_tokens": n_tokens,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dataset": dataset,
        "text_column": text_column,
        "variants": tuple(variant) if variant else None,
        "per_site": per_site,
        "per_site_variants": per_site_variants,
        "convention": convention,
        "prepend_bos": prepend_bos,
        "rounding_threshold": rounding_threshold,
        "ci_sampling": ci_sampling,
    }
    with fidelity_progress():
        run_many(
            ["fidelity"],
            ids,
            options,
            json_out=json_out,
            wandb=wandb,
            wandb_project=wandb_project,
            wandb_run=wandb_run_fields(wandb_name, wandb_group, wandb_tags, wandb_entity),
            detail=detail,
        )


@contextmanager
def fidelity_progress() -> Iterator[None]:
    """A rich bar on stderr fed by the fidelity engine's progress callback (one task per ID)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from spd_host.evals.fidelity import reporting_progress

    progress = Progress(
        TextColumn("[bold]fidelity {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def report(done: int, total: int | None, what: str) -> None:
        if what not in tasks:
            tasks[what] = progress.add_task(escape(what), total=total)
        progress.update(tasks[what], completed=done, total=total)

    with progress, reporting_progress(report):
        yield


Provider = Annotated[
    str | None,
    typer.Option("--provider", help="LLM judge provider; default: first with a key, else offline."),
]
Model = Annotated[str | None, typer.Option("--model", help="Judge model (provider default).")]
BaseUrl = Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint URL.")]
MaxConcurrent = Annotated[int | None, typer.Option("--max-concurrent", help="Calls in flight.")]
CostCap = Annotated[
    float | None,
    typer.Option(
        "--cost-cap",
        "--max-cost",
        help="Hard cap in USD on this suite's judge spend, across runs (default 5).",
    ),
]
NoCostCap = Annotated[bool, typer.Option("--no-cost-cap", help="Remove the cap (careful).")]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Seconds per request.")]
MaxAttempts = Annotated[int | None, typer.Option("--max-attempts", help="Attempts per trial.")]
LabelModel = Annotated[
    str | None,
    typer.Option(
        "--label-model", help="Score labels of this autointerp model only (detection, fuzzing)."
    ),
]
ApiKeyEnv = Annotated[
    str | None, typer.Option("--api-key-env", help="Read the API key from this variable.")
]
Rpm = Annotated[float | None, typer.Option("--rpm", help="Request starts per minute.")]
InputPrice = Annotated[
    float | None, typer.Option("--input-price", help="USD per million input tokens.")
]
OutputPrice = Annotated[
    float | None, typer.Option("--output-price", help="USD per million output tokens.")
]
PricePerMtok = Annotated[
    str | None, typer.Option("--price-per-mtok", help="IN,OUT: USD per million tokens.")
]
MaxOutputTokens = Annotated[
    int | None, typer.Option("--max-output-tokens", help="Output tokens per call.")
]
MaxRetryAfter = Annotated[
    float | None,
    typer.Option("--max-retry-after", help="Longest Retry-After (s) waited for."),
]
Force = Annotated[bool, typer.Option("--force", help="Judge again trials already judged.")]
NComponents = Annotated[int | None, typer.Option("--n-components", help="Components sampled.")]
NTrials = Annotated[int | None, typer.Option("--n-trials", help="Trials per component.")]
Positives = Annotated[
    str | None,
    typer.Option(
        "--positives",
        help="Detection/fuzzing positives: quantiles (default, delphi) or top_and_reservoir.",
    ),
]
NQuantiles = Annotated[
    int | None, typer.Option("--n-quantiles", help="Activation quantile bins (default 10).")
]
Negatives = Annotated[
    str | None,
    typer.Option("--negatives", help="Detection negatives: random (default) or similar_density."),
]
Window = Annotated[
    str | None,
    typer.Option(
        "--window",
        help="Positives whose window alone does not fire: as_recorded, prefer_alone or widen.",
    ),
]
MaxWiden = Annotated[
    int | None, typer.Option("--max-widen-tokens", help="--window widen: left-context bound.")
]
HarvestRun = Annotated[
    str | None, typer.Option("--run", "--harvest-run", help="Harvest sub-run (latest).")
]
JudgeConventionOpt = Annotated[
    str | None,
    typer.Option(
        "--convention",
        help="Detection/fuzzing definitions: spd-host or delphi (docs/evals.md).",
    ),
]
PromptForm = Annotated[
    str | None,
    typer.Option("--prompt-form", help="select (name the positives) or binary (0/1 each)."),
]
NExamplesShown = Annotated[
    int | None, typer.Option("--n-examples-shown", help="Examples per prompt (delphi: 5).")
]
Logprobs = Annotated[
    bool | None,
    typer.Option("--logprobs/--no-logprobs", help="Binary form: ask for logprobs (AUROC)."),
]
FuzzTypeOpt = Annotated[
    str | None, typer.Option("--fuzz-type", help="Fuzzing: spd-host, default or active.")
]
MarkRuleOpt = Annotated[
    str | None, typer.Option("--mark-rule", help="Fuzzing marks: firing or delphi (>= 0.3 max).")
]


Batch = Annotated[
    bool, typer.Option("--batch", help="Judge through the provider's batch API (half price).")
]
PollInterval = Annotated[
    float | None, typer.Option("--poll-interval", help="Seconds between batch polls (30).")
]
ListBatches = Annotated[
    bool, typer.Option("--list-batches", help="List the suite's open batches; judge nothing.")
]
CancelBatches = Annotated[
    bool,
    typer.Option(
        "--cancel-batches",
        help="Cancel this run's open batches; keep what finished, fail the rest.",
    ),
]


def list_suite_batches(suite: str, ids: list[str], *, json_out: bool) -> None:
    """``--list-batches`` of an LLM suite: the open batches in each ID's ``<suite>.spend.db``."""
    from spd_host.cli.batch_progress import list_open_batches
    from spd_host.evals.llm.records import spend_db_path
    from spd_host.plugins import get_host

    for did in ids:
        list_open_batches(
            spend_db_path(get_host().parse_id(did).storage_key, suite), json_out=json_out
        )


def _judge_command(kind: str) -> Any:
    def command(
        ids: IdsArg,
        provider: Provider = None,
        model: Model = None,
        base_url: BaseUrl = None,
        max_concurrent: MaxConcurrent = None,
        cost_cap: CostCap = None,
        no_cost_cap: NoCostCap = False,
        timeout: Timeout = None,
        max_attempts: MaxAttempts = None,
        api_key_env: ApiKeyEnv = None,
        rpm: Rpm = None,
        input_price: InputPrice = None,
        output_price: OutputPrice = None,
        price_per_mtok: PricePerMtok = None,
        max_output_tokens: MaxOutputTokens = None,
        max_retry_after: MaxRetryAfter = None,
        n_components: NComponents = None,
        n_trials: NTrials = None,
        harvest_run: HarvestRun = None,
        label_model: LabelModel = None,
        positives: Positives = None,
        n_quantiles: NQuantiles = None,
        negatives: Negatives = None,
        window: Window = None,
        max_widen_tokens: MaxWiden = None,
        force: Force = False,
        convention: JudgeConventionOpt = None,
        prompt_form: PromptForm = None,
        n_examples_shown: NExamplesShown = None,
        logprobs: Logprobs = None,
        fuzz_type: FuzzTypeOpt = None,
        mark_rule: MarkRuleOpt = None,
        batch: Batch = False,
        poll_interval: PollInterval = None,
        list_batches: ListBatches = False,
        cancel_batches: CancelBatches = False,
        json_out: JsonOut = False,
        base_model: BaseModelOpt = None,
        wandb: Wandb = False,
        wandb_project: WandbProject = "spd-host-evals",
        wandb_name: WandbName = None,
        wandb_group: WandbGroup = None,
        wandb_tags: WandbTags = None,
        wandb_entity: WandbEntity = None,
    ) -> None:
        use_base_model(base_model)
        if list_batches:
            list_suite_batches(kind, ids, json_out=json_out)
            return
        if label_model is not None and kind == "intruder":
            from spd_host.errors import ConfigError

            raise ConfigError(
                "--label-model does not apply to intruder (it judges examples, not labels)",
                hint="use it with eval detection or eval fuzzing",
            )
        if price_per_mtok is not None:
            from spd_host.autointerp.pricing import parse_price_pair

            input_price, output_price = parse_price_pair(price_per_mtok)
        options = {
            "provider": provider,
            "api_key_env": api_key_env,
            "rpm": rpm,
            "input_price_per_mtok": input_price,
            "output_price_per_mtok": output_price,
            "max_output_tokens": max_output_tokens,
            "max_retry_after_s": max_retry_after,
            "model": model,
            "base_url": base_url,
            "max_concurrent": max_concurrent,
            "cost_cap_usd": cost_cap,
            "no_cost_cap": no_cost_cap,
            "timeout_s": timeout,
            "max_attempts": max_attempts,
            "n_components": n_components,
            "n_trials": n_trials,
            "harvest_run": harvest_run,
            "label_model": label_model,
            "positives": positives,
            "n_quantiles": n_quantiles,
            "negatives": negatives,
            "window": window,
            "max_widen_tokens": max_widen_tokens,
            "force": force,
            "convention": convention,
            "prompt_form": prompt_form,
            "n_examples_shown": n_examples_shown,
            "logprobs": logprobs,
            "fuzz_type": fuzz_type if kind == "fuzzing" else None,
            "mark_rule": mark_rule if kind == "fuzzing" else None,
            "batch": batch or None,
            "poll_interval_s": poll_interval,
            "cancel_batches": cancel_batches or None,
        }
        run_many(
            [kind],
            ids,
            options,
            json_out=json_out,
            wandb=wandb,
            wandb_project=wandb_project,
            wandb_run=wandb_run_fields(wandb_name, wandb_group, wandb_tags, wandb_entity),
        )

    command.__doc__ = {
        "intruder": "Coherence without labels: can a judge spot the intruding example?",
        "detection": "Label quality: does the label predict which examples fire? (balanced accuracy)",
        "fuzzing": "Label specificity: real firing marks vs random marks (balanced accuracy).",
    }[kind]
    return handles_errors(command)


for _kind in ("intruder", "detection", "fuzzing"):
    eval_app.command(_kind)(_judge_command(_kind))


@eval_app.command("run")
@handles_errors
def run(
    suite: Annotated[str, typer.Argument(help="Suite name (see `spd-host eval list`).")],
    ids: IdsArg,
    n_tokens: NTokens = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    dataset: Dataset = None,
    text_column: TextColumn = None,
    prepend_bos: PrependBosOpt = None,
    json_out: JsonOut = False,
    base_model: BaseModelOpt = None,
    wandb: Wandb = False,
    wandb_project: WandbProject = "spd-host-evals",
    wandb_name: WandbName = None,
    wandb_group: WandbGroup = None,
    wandb_tags: WandbTags = None,
    wandb_entity: WandbEntity = None,
) -> None:
    """Run any installed suite (plugin suites included) with its default config."""
    use_base_model(base_model)
    options = {
        "n_tokens": n_tokens,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dataset": dataset,
        "text_column": text_column,
        "prepend_bos": prepend_bos,
    }
    run_many(
        [suite],
        ids,
        options,
        json_out=json_out,
        wandb=wandb,
        wandb_project=wandb_project,
        wandb_run=wandb_run_fields(wandb_name, wandb_group, wandb_tags, wandb_entity),
    )


@eval_app.command("all")
@handles_errors
def run_all(
    decomposition_id: Annotated[str, typer.Argument(help="One decomposition ID.")],
    n_tokens: NTokens = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    dataset: Dataset = None,
    text_column: TextColumn = None,
    prepend_bos: PrependBosOpt = None,
    json_out: JsonOut = False,
    base_model: BaseModelOpt = None,
    wandb: Wandb = False,
    wandb_project: WandbProject = "spd-host-evals",
    wandb_name: WandbName = None,
    wandb_group: WandbGroup = None,
    wandb_tags: WandbTags = None,
    wandb_entity: WandbEntity = None,
) -> None:
    """Run every installed suite on one decomposition (a failing suite does not stop the rest)."""
    use_base_model(base_model)
    from spd_host.evals import eval_suites

    options = {
        "n_tokens": n_tokens,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dataset": dataset,
        "text_column": text_column,
        "prepend_bos": prepend_bos,
    }
    run_many(
        list(eval_suites()),
        [decomposition_id],
        options,
        json_out=json_out,
        wandb=wandb,
        wandb_project=wandb_project,
        wandb_run=wandb_run_fields(wandb_name, wandb_group, wandb_tags, wandb_entity),
    )


# the delphi scorers register their commands on eval_app
from spd_host.cli import scorer_cmds as _scorer_cmds  # noqa: E402, F401
