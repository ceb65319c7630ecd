"""The autointerp runner: async fan-out of labelling calls, bounded in concurrency, rate,
retries and cost, committing every result as it arrives.

Flow: take the store's lock (a second run on the same store is refused, naming the pid);
close calls a killed run left in flight at their worst case; start the budget from the
store's recorded spend (the cap is the store's, across resumes). Per component: skip if the
store already has a label for (harvest, strategy, model); build the prompt; call through
:func:`spd_host.autointerp.calls.call_with_retries` (worst-case reservation, ledger, rate,
Retry-After ceiling, fail fast on 400/401/403/404). A label is written on success; a failure
(including a blank or malformed answer) is written as a failure row with its error. Components
never sent because of the cap or a fatal error are neither labelled nor failed: re-running
picks them up. Every text field is redacted of API keys before it is stored.

Open batches (``--batch`` runs not yet collected) hold components that are already billed or
about to be: a synchronous run first polls its own scope's open batches once and collects
those that ended, then leaves out every component still pending in an open batch of the same
label key (counted in ``n_in_open_batches``, the batches named in ``open_batches``), so no
component is labelled, or billed, twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spd_host.autointerp.answer import ANSWER_SCHEMA
from spd_host.autointerp.calls import Gates, backoff_delay, call_with_retries
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.limits import CostBudget, RateLimiter, SharedPause
from spd_host.autointerp.providers.base import (
    ClientOptions,
    CompletionRequest,
    LLMClient,
    Pricing,
    Provider,
)
from spd_host.autointerp.registry import get_provider, get_strategy, providers
from spd_host.autointerp.store import LabelRecord, LabelStore, now_iso
from spd_host.errors import ConfigError
from spd_host.plugins import PluginHost
from spd_host.safe_text import printable, redact

__all__ = [
    "RunReport",
    "alabel_components",
    "backoff_delay",
    "failure_reason",
    "failure_table",
    "known_secrets",
    "label_components",
    "report_table",
    "resolve_pricing",
]


class RunReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    decomposition_id: str
    harvest_id: str
    provider: str
    model: str
    strategy: str
    baseline: bool
    db_path: str
    n_components: int
    n_already_labelled: int
    n_labelled: int
    n_failed: int
    n_not_sent: int
    spent_usd: float
    cost_cap_usd: float | None
    stopped_by_cost_cap: bool
    calls: int
    store_spent_usd: float = 0.0
    """Everything the label store has spent, this run included (what the cap is checked on)."""
    orphaned_usd: float = 0.0
    """Worst-case cost of calls a killed earlier run left in flight, counted as spent now."""
    stopped_by_error: str | None = None
    """Set when a 400/401/403/404 stopped the run: every later request would fail the same."""
    failure_reasons: dict[str, int] = {}
    """Failures of this run, counted by reason."""
    cache_read_tokens: int = 0
    """Input tokens of this run's labels read from the provider's prompt cache."""
    cache_saved_usd: float = 0.0
    """What prompt caching saved on this run's labels against the uncached price (negative
    while cache writes, dearer than plain input, outweigh the reads)."""
    batch: bool = False
    """Sent through the provider's batch API (``calls`` then counts batch requests)."""
    batches_submitted: int = 0
    batches_resumed: int = 0
    """Batches an earlier, interrupted run left running that this run polled and collected."""
    batch_outcomes: dict[str, int] = {}
    """Batch requests by outcome: succeeded, malformed, errored, expired, canceled."""
    batches_collected: int = 0
    """Batches whose results this run wrote (a synchronous run collects the ended ones first)."""
    batches_canceled: int = 0
    """Batches this run cancelled (``--cancel-batches``)."""
    n_in_open_batches: int = 0
    """Components not sent because an open batch still holds them (collect them with
    ``--batch``, or cancel them with ``--cancel-batches``)."""
    open_batches: list[str] = []
    """The open batches still holding components: ``local id (provider batch id)``."""


@dataclass
class _State:
    labelled: int = 0
    failed: int = 0
    not_sent: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    cache_read_tokens: int = 0
    cache_saved: float = 0.0


def resolve_pricing(provider: Provider, model: str, config: AutointerpConfig) -> Pricing:
    base = provider.pricing_for(model)
    if config.input_price_per_mtok is not None or config.output_price_per_mtok is not None:
        return Pricing(
            input_per_mtok=config.input_price_per_mtok
            if config.input_price_per_mtok is not None
            else (base.input_per_mtok if base else 0.0),
            output_per_mtok=config.output_price_per_mtok
            if config.output_price_per_mtok is not None
            else (base.output_per_mtok if base else 0.0),
        )
    if base is None:
        raise ConfigError(
            f"no price known for model {model!r} of provider {provider.name!r}, so the cost cap cannot be enforced",
            hint="pass --price-per-mtok IN,OUT (USD per million input, output tokens), or add the model to spd_host/autointerp/pricing.yaml",
        )
    return base


def known_secrets(host: PluginHost | None = None, extra_env: str | None = None) -> list[str]:
    """The values of every provider's API-key variable that is set (what must never be stored)."""
    names = {p.api_key_env for p in providers(host).values()} | {extra_env}
    return [v for n in sorted(x for x in names if x) if (v := os.environ.get(n))]


_QUOTED = re.compile(r"""(:\s*)?(['"]).*""")


def failure_reason(error: str) -> str:
    """A failure's reason for the summary table: the error without the payload it quotes."""
    first = error.strip().splitlines()[0] if error.strip() else "unknown"
    m = re.search(r"HTTP \d{3}", first)
    if m:
        return first[: m.end()]
    return _QUOTED.sub("", first)[:80].rstrip(" :(") or first[:80]


async def alabel_components(
    keys: Sequence[str],
    evidence_for: Callable[[str], ComponentEvidence],
    config: AutointerpConfig,
    *,
    store: LabelStore,
    harvest_id: str,
    decomposition_id: str,
    host: PluginHost | None = None,
    console: Console | None = None,
    progress: bool = False,
    seed: int | None = None,
    force: bool = False,
    batch_progress: Callable[[Any], None] | None = None,
) -> RunReport:
    """Label ``keys`` (those not yet labelled for this harvest/strategy/model; every key
    with ``force``). With ``config.batch`` through the provider's batch API, reporting to
    ``batch_progress`` (a :class:`~spd_host.autointerp.batch.engine.BatchProgress`)."""
    with store.run_lock(f"autointerp run on {store.path}"):
        return await _alabel_locked(
            keys,
            evidence_for,
            config,
            store=store,
            harvest_id=harvest_id,
            decomposition_id=decomposition_id,
            host=host,
            console=console,
            progress=progress,
            seed=seed,
            force=force,
            batch_progress=batch_progress,
        )


async def _alabel_locked(
    keys: Sequence[str],
    evidence_for: Callable[[str], ComponentEvidence],
    config: AutointerpConfig,
    *,
    store: LabelStore,
    harvest_id: str,
    decomposition_id: str,
    host: PluginHost | None,
    console: Console | None,
    progress: bool,
    seed: int | None,
    force: bool = False,
    batch_progress: Callable[[Any], None] | None = None,
) -> RunReport:
    provider = get_provider(config.provider, host)
    strategy = get_strategy(config.strategy, host)
    options = strategy.options(config.strategy_options)
    model = config.model or provider.default_model
    if config.batch or config.cancel_batches:
        return await _alabel_batch(
            keys, evidence_for, config, store=store, provider=provider, strategy=strategy,
            options=options, model=model, harvest_id=harvest_id,
            decomposition_id=decomposition_id, host=host, seed=seed, force=force,
            on_progress=batch_progress,
        )  # fmt: skip
    pricing = resolve_pricing(provider, model, config)
    client: LLMClient = provider.make_client(
        ClientOptions(
            model=model,
            base_url=config.base_url,
            timeout_s=config.timeout_s,
            api_key_env=config.api_key_env,
        )
    )
    state = _State()
    secrets = known_secrets(host, config.api_key_env)
    orphaned = _close_orphans(store)
    labelled_before = store.labelled_keys(harvest_id, strategy.name, model)
    done_before = set() if force else labelled_before
    pre, held, still_open = await _collect_open_batches(
        store, provider, strategy, options, model, evidence_for, config,
        harvest_id=harvest_id, decomposition_id=decomposition_id, secrets=secrets, seed=seed,
        force=force,
    )  # fmt: skip
    gates = Gates(
        config=config,
        pricing=pricing,
        budget=CostBudget(config.cost_cap_usd, prior_usd=store.ledger.total()),
        ledger=store.ledger,
        run_id=uuid.uuid4().hex[:12],
        secrets=secrets,
        rate=RateLimiter(config.rpm),
        pause=SharedPause(),
        rng=random.Random(seed),
    )

    done_keys = done_before
    # labelled by the collection just now (under --force too), or still in an open batch
    collected = store.labelled_keys(harvest_id, strategy.name, model) - labelled_before
    collected |= set(pre.get("labelled_keys", ())) | set(pre.get("written_keys", ()))
    candidates = [k for k in keys if k not in done_keys and k not in collected]
    in_batches = [k for k in candidates if k in held]
    todo = [k for k in candidates if k not in held]
    if config.limit is not None:
        todo = todo[: config.limit]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for k in todo:
        queue.put_nowait(k)

    bar: Progress | None = None
    task_id = None
    if progress:
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "done [green]{task.fields[done]}[/] failed [red]{task.fields[failed]}[/] "
                "cost ${task.fields[cost]:.4f}[yellow]{task.fields[note]}[/]"
            ),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        bar.start()
        label = f"autointerp {strategy.name} · {provider.name}/{model}" + (
            " [BASELINE]" if provider.baseline else ""
        )
        task_id = bar.add_task(
            escape(printable(label)), total=len(todo), done=0, failed=0, cost=0.0, note=""
        )

    def tick() -> None:
        if bar is not None and task_id is not None:
            wait = gates.pause.remaining
            bar.update(
                task_id,
                completed=state.labelled + state.failed,
                done=state.labelled,
                failed=state.failed,
                cost=gates.budget.spent,
                note=f"  waiting {wait:.0f} s (Retry-After)" if wait > 0 else "",
            )

    async def label_one(key: str) -> None:
        evidence = evidence_for(key)
        prompt = strategy.prompt(evidence, options)
        request = CompletionRequest(
            system=prompt.system,
            prompt=prompt.user,
            schema=ANSWER_SCHEMA,
            max_output_tokens=config.max_output_tokens,
            evidence=evidence,
        )
        started = now_iso()
        out = await call_with_retries(gates, client, request, key)
        if not out.sent:
            state.not_sent += 1
            return

        def clean(text: str | None) -> str | None:
            return redact(text, secrets) if text is not None else None

        common: dict[str, Any] = {
            "harvest_id": harvest_id,
            "component_key": key,
            "strategy": strategy.name,
            "model": model,
            "provider": provider.name,
            "decomposition_id": decomposition_id,
            "is_baseline": provider.baseline,
            "system_prompt": redact(prompt.system, secrets),
            "prompt": redact(prompt.user, secrets),
            "cost_usd": out.cost,
            "input_tokens": out.input_tokens,
            "output_tokens": out.output_tokens,
            "attempts": out.attempts,
            "started_at": started,
            "finished_at": now_iso(),
        }
        if out.ok and out.completion is not None:
            answer = out.completion.answer
            state.cache_read_tokens += out.completion.cache_read_tokens
            state.cache_saved += pricing.cache_saving(out.completion)
            store.write(
                LabelRecord(
                    **common,
                    status="ok",
                    label=clean(answer.label),
                    confidence=answer.confidence,
                    reasoning=clean(answer.reasoning),
                    raw_response=clean(out.completion.raw),
                    error=None,
                ),
                replace=force,
            )
            state.labelled += 1
        else:
            error = out.error or "no attempt completed"
            store.write(
                LabelRecord(
                    **common,
                    status="failed",
                    label=None,
                    confidence=None,
                    reasoning=None,
                    raw_response=clean(out.raw),
                    error=error,
                )
            )
            state.failed += 1
            state.reasons[failure_reason(error)] += 1
        tick()

    async def worker() -> None:
        while not gates.stop:
            try:
                key = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await label_one(key)

    async def ticker() -> None:
        while True:
            tick()
            await asyncio.sleep(0.5)

    ticking = asyncio.create_task(ticker()) if bar is not None else None
    try:
        workers = [
            asyncio.create_task(worker())
            for _ in range(min(config.max_concurrent, max(1, len(todo))))
        ]
        await asyncio.gather(*workers)
    finally:
        if ticking is not None:
            ticking.cancel()
        await client.aclose()
        if bar is not None:
            tick()
            bar.stop()
    state.not_sent += queue.qsize()
    return RunReport(
        **_report_basis(
            decomposition_id, harvest_id, provider, model, strategy, store, keys, done_keys
        ),
        n_labelled=state.labelled + pre.get("n_labelled", 0),
        n_failed=state.failed + pre.get("n_failed", 0),
        n_not_sent=state.not_sent,
        spent_usd=gates.budget.spent + pre.get("spent_usd", 0.0),
        cost_cap_usd=config.cost_cap_usd,
        stopped_by_cost_cap=gates.budget.exhausted,
        calls=gates.calls,
        orphaned_usd=orphaned,
        stopped_by_error=gates.fatal,
        failure_reasons=dict(
            (state.reasons + Counter(pre.get("failure_reasons", {}))).most_common()
        ),
        cache_read_tokens=state.cache_read_tokens + pre.get("cache_read_tokens", 0),
        cache_saved_usd=state.cache_saved + pre.get("cache_saved_usd", 0.0),
        batches_resumed=pre.get("batches_resumed", 0),
        batches_collected=pre.get("batches_collected", 0),
        batch_outcomes=pre.get("batch_outcomes", {}),
        n_in_open_batches=len(in_batches),
        open_batches=[_describe_one(b) for b in still_open],
    )


def _describe_one(batch: Any) -> str:
    return f"{batch.local_id} ({batch.provider} {batch.provider_batch_id or 'id not recorded'})"


async def _collect_open_batches(
    store: LabelStore,
    provider: Provider,
    strategy: Any,
    options: Any,
    model: str,
    evidence_for: Callable[[str], ComponentEvidence],
    config: AutointerpConfig,
    *,
    harvest_id: str,
    decomposition_id: str,
    secrets: list[str],
    seed: int | None,
    force: bool,
) -> tuple[dict[str, Any], dict[str, str], list[Any]]:
    """Before a synchronous run: poll this scope's open batches once and collect the ended
    ones; returns (the collection's report fields, ``component -> batch`` of every component
    still pending in an open batch of this label key, those batches)."""
    from spd_host.autointerp.batch.labels import label_in_batches, label_scope, same_label_scopes

    scopes = same_label_scopes(store.batches, model, strategy.name, harvest_id)
    if not scopes:
        return {}, {}, []
    fields: dict[str, Any] = {}
    if label_scope(provider.name, model, strategy.name, harvest_id) in scopes and (
        provider.make_batch_client is not None
    ):
        fields = await label_in_batches(
            [], evidence_for, config, store=store, provider=provider, strategy=strategy,
            options=options, model=model, harvest_id=harvest_id,
            decomposition_id=decomposition_id, secrets=secrets, force=force, seed=seed,
            on_progress=None, mode="collect_once",
        )  # fmt: skip
    return fields, store.batches.held_items(scopes), store.batches.open_listing(scopes)


def _close_orphans(store: LabelStore) -> float:
    """Close the spend rows a killed run left open; returns the USD they newly account for."""
    before = store.ledger.total_orphaned()
    store.ledger.close_orphans()
    return store.ledger.total_orphaned() - before


def _report_basis(
    decomposition_id: str,
    harvest_id: str,
    provider: Provider,
    model: str,
    strategy: Any,
    store: LabelStore,
    keys: Sequence[str],
    done_keys: set[str],
) -> dict[str, Any]:
    """The report fields the synchronous and the batch path share (what was asked, where the
    store is, and what it already held or has spent in all)."""
    return {
        "decomposition_id": decomposition_id,
        "harvest_id": harvest_id,
        "provider": provider.name,
        "model": model,
        "strategy": strategy.name,
        "baseline": provider.baseline,
        "db_path": str(store.path),
        "n_components": len(keys),
        "n_already_labelled": len(done_keys & set(keys)),
        "store_spent_usd": store.ledger.total(),
    }


async def _alabel_batch(
    keys: Sequence[str],
    evidence_for: Callable[[str], ComponentEvidence],
    config: AutointerpConfig,
    *,
    store: LabelStore,
    provider: Provider,
    strategy: Any,
    options: Any,
    model: str,
    harvest_id: str,
    decomposition_id: str,
    host: PluginHost | None,
    seed: int | None,
    force: bool,
    on_progress: Callable[[Any], None] | None,
) -> RunReport:
    """The batch path (:mod:`spd_host.autointerp.batch`), reported like the synchronous one."""
    from spd_host.autointerp.batch.labels import label_in_batches

    orphaned = _close_orphans(store)
    done_keys = set() if force else store.labelled_keys(harvest_id, strategy.name, model)
    todo = [k for k in keys if k not in done_keys]
    if config.limit is not None:
        todo = todo[: config.limit]
    fields = await label_in_batches(
        todo, evidence_for, config, store=store, provider=provider, strategy=strategy,
        options=options, model=model, harvest_id=harvest_id, decomposition_id=decomposition_id,
        secrets=known_secrets(host, config.api_key_env), force=force, seed=seed,
        on_progress=on_progress, mode="cancel" if config.cancel_batches else "run",
    )  # fmt: skip
    fields.pop("labelled_keys", None)
    fields.pop("written_keys", None)
    fields["n_in_open_batches"] = fields.pop("n_held_elsewhere", 0)
    from spd_host.autointerp.batch.labels import same_label_scopes

    scopes = same_label_scopes(store.batches, model, strategy.name, harvest_id)
    fields["open_batches"] = [_describe_one(b) for b in store.batches.open_listing(scopes)]
    return RunReport(
        **_report_basis(
            decomposition_id, harvest_id, provider, model, strategy, store, keys, done_keys
        ),
        cost_cap_usd=config.cost_cap_usd,
        orphaned_usd=orphaned,
        batch=True,
        **fields,
    )


def label_components(
    evidence: Sequence[ComponentEvidence],
    config: AutointerpConfig,
    *,
    db_path: Path,
    harvest_id: str,
    decomposition_id: str,
    host: PluginHost | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> RunReport:
    """Synchronous convenience: label a list of evidence records into the store at ``db_path``."""
    by_key = {e.component_key: e for e in evidence}
    with LabelStore(db_path) as store:
        return asyncio.run(
            alabel_components(
                list(by_key),
                by_key.__getitem__,
                config,
                store=store,
                harvest_id=harvest_id,
                decomposition_id=decomposition_id,
                host=host,
                progress=progress,
                seed=seed,
            )
        )


def report_table(report: RunReport) -> Table:
    """The final table the CLI prints."""
    title = f"autointerp {escape(printable(report.decomposition_id))}"
    if report.baseline:
        title += "  [yellow](offline BASELINE labels, not an LLM)[/]"
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value")
    not_sent = str(report.n_not_sent)
    if report.stopped_by_cost_cap:
        not_sent += "  (cost cap reached)"
    elif report.stopped_by_error:
        not_sent += "  (stopped by an error every request would get)"
    spent = f"${report.spent_usd:.4f} this run; ${report.store_spent_usd:.4f} in all"
    if report.cost_cap_usd is not None:
        spent += f" of the ${report.cost_cap_usd:.2f} cap"
    if report.orphaned_usd:
        spent += f" (incl. ${report.orphaned_usd:.4f} for calls a killed run left in flight)"
    rows = [
        ("provider / model", f"{report.provider} / {report.model}"),
        ("strategy", report.strategy),
        ("harvest", report.harvest_id),
        ("components", str(report.n_components)),
        ("already labelled (skipped)", str(report.n_already_labelled)),
        ("labelled now", f"[green]{report.n_labelled}[/]"),
        ("failed", f"[red]{report.n_failed}[/]" if report.n_failed else "0"),
        ("not sent", not_sent),
        ("calls", str(report.calls) + ("  (batch requests)" if report.batch else "")),
        *(
            [
                (
                    "batches",
                    f"{report.batches_submitted} submitted, {report.batches_resumed} resumed, "
                    f"{report.batches_collected} collected, {report.batches_canceled} cancelled; "
                    + ", ".join(f"{k} {v}" for k, v in sorted(report.batch_outcomes.items())),
                )
            ]
            if report.batch or report.batches_collected or report.batches_resumed
            else []
        ),
        *(
            [("in open batches (not sent)", str(report.n_in_open_batches))]
            if report.n_in_open_batches
            else []
        ),
        ("spent", spent),
        *(
            [
                (
                    "prompt cache",
                    f"{report.cache_read_tokens:,} input tokens read from cache; "
                    f"saved ${report.cache_saved_usd:.4f}",
                )
            ]
            if report.cache_read_tokens or report.cache_saved_usd
            else []
        ),
        ("labels", report.db_path),
    ]
    for k, v in rows:
        table.add_row(k, v if k in ("labelled now", "failed") else escape(printable(v)))
    return table


def failure_table(report: RunReport) -> Table:
    """Failures of the run by reason (the CLI prints it after the report when any failed)."""
    table = Table(title="failures by reason")
    table.add_column("components", justify="right")
    table.add_column("reason")
    for reason, n in report.failure_reasons.items():
        table.add_row(str(n), escape(printable(reason)))
    return table
