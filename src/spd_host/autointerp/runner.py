"""The autointerp runner: async fan-out of labelling calls, bounded in concurrency, rate,
retries and cost, committing every result as it arrives.

Flow per component: skip if the store already has a label for (harvest, strategy, model);
build the prompt; then up to ``max_attempts`` times: wait out any shared pause, reserve the
call's worst-case cost (stop the run if it does not fit under the cap), wait for a rate-limit
slot, call. A label is written on success; after the last failed attempt (or a permanent
error) the failure is written with its error. Components never sent because of the cap are
neither labelled nor failed: re-running with a higher cap picks them up.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spd_host.autointerp.answer import ANSWER_SCHEMA, MalformedAnswerError
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.cost import estimate_cost, estimate_prompt_tokens
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.limits import CostBudget, RateLimiter, SharedPause
from spd_host.autointerp.providers.base import (
    ClientOptions,
    CompletionRequest,
    LLMClient,
    Pricing,
    Provider,
    ProviderCallError,
    TransientError,
)
from spd_host.autointerp.registry import get_provider, get_strategy, providers
from spd_host.autointerp.store import LabelRecord, LabelStore, now_iso
from spd_host.errors import ConfigError
from spd_host.plugins import PluginHost


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


@dataclass
class _State:
    labelled: int = 0
    failed: int = 0
    calls: int = 0
    stop: bool = False
    not_sent: int = 0
    secrets: list[str] = field(default_factory=list)


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
            hint="pass --input-price and --output-price (USD per million tokens)",
        )
    return base


def _redact(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def backoff_delay(
    attempt: int, config: AutointerpConfig, retry_after: float | None, rng: random.Random
) -> float:
    """Exponential backoff with full jitter in [½, 1] of the step; Retry-After is a floor."""
    step = min(config.backoff_max_s, config.backoff_base_s * (2 ** (attempt - 1)))
    delay = step * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


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
) -> RunReport:
    """Label ``keys`` (those not yet labelled for this harvest/strategy/model)."""
    provider = get_provider(config.provider, host)
    strategy = get_strategy(config.strategy, host)
    options = strategy.options(config.strategy_options)
    model = config.model or provider.default_model
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
    for p in providers(host).values():
        for name in {p.api_key_env, config.api_key_env} - {None}:
            value = os.environ.get(str(name))
            if value:
                state.secrets.append(value)

    done_keys = store.labelled_keys(harvest_id, strategy.name, model)
    todo = [k for k in keys if k not in done_keys]
    if config.limit is not None:
        todo = todo[: config.limit]
    budget = CostBudget(config.cost_cap_usd)
    rate = RateLimiter(config.rpm)
    pause = SharedPause()
    rng = random.Random(seed)
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
                "done [green]{task.fields[done]}[/] failed [red]{task.fields[failed]}[/] cost ${task.fields[cost]:.4f}"
            ),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        bar.start()
        label = f"autointerp {strategy.name} · {provider.name}/{model}" + (
            " [BASELINE]" if provider.baseline else ""
        )
        task_id = bar.add_task(label, total=len(todo), done=0, failed=0, cost=0.0)

    def tick() -> None:
        if bar is not None and task_id is not None:
            bar.update(
                task_id,
                completed=state.labelled + state.failed,
                done=state.labelled,
                failed=state.failed,
                cost=budget.spent,
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
        estimate = estimate_cost(
            pricing,
            estimate_prompt_tokens(prompt.system, prompt.user, ANSWER_SCHEMA),
            config.max_output_tokens,
        )
        started = now_iso()
        cost = 0.0
        n_in = n_out = 0

        def write_record(**outcome: Any) -> None:
            """Commit this component's row: the outcome plus what every row records."""
            store.write(
                LabelRecord(
                    harvest_id=harvest_id,
                    component_key=key,
                    strategy=strategy.name,
                    model=model,
                    provider=provider.name,
                    decomposition_id=decomposition_id,
                    is_baseline=provider.baseline,
                    system_prompt=prompt.system,
                    prompt=prompt.user,
                    cost_usd=cost,
                    input_tokens=n_in,
                    output_tokens=n_out,
                    attempts=attempts,
                    started_at=started,
                    finished_at=now_iso(),
                    **outcome,
                )
            )

        last_error = ""
        last_raw: str | None = None
        attempts = 0
        for attempt in range(1, config.max_attempts + 1):
            await pause.wait()
            if state.stop or not budget.reserve(estimate):
                state.stop = True
                if attempts == 0:
                    state.not_sent += 1
                    return
                break  # some attempts were made: record the failure so far
            await rate.acquire()
            attempts += 1  # noqa: SIM113 (counts only attempts actually sent)
            state.calls += 1
            actual = 0.0
            try:
                completion = await client.complete(request)
            except MalformedAnswerError as err:
                actual = pricing.cost(err.input_tokens, err.output_tokens)
                last_error, last_raw = f"malformed answer: {err.message}", err.raw
                retry_after = None
            except ProviderCallError as err:
                # a timed-out call may have been billed: count its worst case
                actual = (
                    estimate
                    if isinstance(err, TransientError) and "timed out" in err.message
                    else 0.0
                )
                last_error = err.message
                retry_after = err.retry_after
                if err.retry_after is not None:
                    pause.pause_for(err.retry_after)
                if not err.retryable:
                    budget.settle(estimate, actual)
                    cost += actual
                    break
            else:
                actual = pricing.cost(completion.input_tokens, completion.output_tokens)
                budget.settle(estimate, actual)
                cost += actual
                n_in += completion.input_tokens
                n_out += completion.output_tokens
                write_record(
                    status="ok",
                    label=completion.answer.label,
                    confidence=completion.answer.confidence,
                    reasoning=completion.answer.reasoning,
                    raw_response=completion.raw,
                    error=None,
                )
                state.labelled += 1
                tick()
                return
            budget.settle(estimate, actual)
            cost += actual
            if attempt < config.max_attempts:
                await asyncio.sleep(backoff_delay(attempt, config, retry_after, rng))
        write_record(
            status="failed",
            label=None,
            confidence=None,
            reasoning=None,
            raw_response=_redact(last_raw, state.secrets) if last_raw else None,
            error=_redact(last_error, state.secrets) or "no attempt completed",
        )
        state.failed += 1
        tick()

    async def worker() -> None:
        while not state.stop:
            try:
                key = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await label_one(key)

    try:
        workers = [
            asyncio.create_task(worker())
            for _ in range(min(config.max_concurrent, max(1, len(todo))))
        ]
        await asyncio.gather(*workers)
    finally:
        await client.aclose()
        if bar is not None:
            bar.stop()
    state.not_sent += queue.qsize()
    return RunReport(
        decomposition_id=decomposition_id,
        harvest_id=harvest_id,
        provider=provider.name,
        model=model,
        strategy=strategy.name,
        baseline=provider.baseline,
        db_path=str(store.path),
        n_components=len(keys),
        n_already_labelled=len(done_keys & set(keys)),
        n_labelled=state.labelled,
        n_failed=state.failed,
        n_not_sent=state.not_sent,
        spent_usd=budget.spent,
        cost_cap_usd=config.cost_cap_usd,
        stopped_by_cost_cap=budget.exhausted,
        calls=state.calls,
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
    title = f"autointerp {report.decomposition_id}"
    if report.baseline:
        title += "  [yellow](offline BASELINE labels, not an LLM)[/]"
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value")
    rows = [
        ("provider / model", f"{report.provider} / {report.model}"),
        ("strategy", report.strategy),
        ("harvest", report.harvest_id),
        ("components", str(report.n_components)),
        ("already labelled (skipped)", str(report.n_already_labelled)),
        ("labelled now", f"[green]{report.n_labelled}[/]"),
        ("failed", f"[red]{report.n_failed}[/]" if report.n_failed else "0"),
        (
            "not sent",
            str(report.n_not_sent) + ("  (cost cap reached)" if report.stopped_by_cost_cap else ""),
        ),
        ("calls", str(report.calls)),
        (
            "spent",
            f"${report.spent_usd:.4f}"
            + (f" of ${report.cost_cap_usd:.2f} cap" if report.cost_cap_usd is not None else ""),
        ),
        ("labels", report.db_path),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table
