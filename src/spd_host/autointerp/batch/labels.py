"""Autointerp labels through the batch engine (``--batch``).

The same rows as the synchronous path: a label per succeeded request, a failure row (same
table, same columns, the error saying why) per errored, malformed, expired or cancelled one,
which a later run retries; components never submitted (the cap) are neither. Prices are the
batch prices from ``pricing.yaml`` (``batch_discount``); a hand-given ``--price-per-mtok`` is
taken as the price actually billed (no discount assumed: the cap errs on the safe side).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from spd_host.autointerp.answer import ANSWER_SCHEMA
from spd_host.autointerp.batch.base import ItemResult
from spd_host.autointerp.batch.engine import BatchJob, BatchProgress, Mode, run_batches
from spd_host.autointerp.batch.table import BatchTable
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.pricing import price_entry
from spd_host.autointerp.providers.base import (
    ClientOptions,
    CompletionRequest,
    Pricing,
    Provider,
)
from spd_host.autointerp.store import LabelRecord, LabelStore, now_iso
from spd_host.errors import ConfigError
from spd_host.safe_text import redact


def batch_pricing(provider: Provider, model: str, config: AutointerpConfig) -> Pricing:
    """What a batch request is billed at: the list's batch price, or the hand-given price."""
    from spd_host.autointerp.runner import resolve_pricing

    hand = config.input_price_per_mtok is not None or config.output_price_per_mtok is not None
    entry = price_entry(provider.name, model)
    if hand or entry is None:
        return resolve_pricing(provider, model, config)
    return entry.pricing(batch=True)


def batch_client(provider: Provider, model: str, config: AutointerpConfig) -> Any:
    if provider.make_batch_client is None:
        with_batch = "anthropic, openai"
        flag = "--cancel-batches" if config.cancel_batches else "--batch"
        raise ConfigError(
            f"provider {provider.name!r} has no batch API, so {flag} cannot be used with it",
            hint=f"providers with a batch API: {with_batch} (pass --provider); or drop {flag}",
        )
    return provider.make_batch_client(
        ClientOptions(
            model=model,
            base_url=config.base_url,
            timeout_s=config.timeout_s,
            api_key_env=config.api_key_env,
        )
    )


def make_job(
    scope: str,
    provider: Provider,
    model: str,
    config: AutointerpConfig,
    table: BatchTable,
    ledger: Any,
    secrets: list[str],
    seed: int | None = None,
) -> BatchJob:
    pricing = batch_pricing(provider, model, config)
    return BatchJob(
        scope=scope,
        client=batch_client(provider, model, config),
        table=table,
        ledger=ledger,
        pricing=pricing,
        model=model,
        cap_usd=config.cost_cap_usd,
        run_id=uuid.uuid4().hex[:12],
        poll_interval_s=config.poll_interval_s,
        max_requests=config.batch_max_requests,
        max_attempts=config.max_attempts,
        backoff_base_s=config.backoff_base_s,
        backoff_max_s=config.backoff_max_s,
        secrets=secrets,
        rng=random.Random(seed),
    )


def label_scope(provider: str, model: str, strategy: str, harvest_id: str) -> str:
    """The batch scope of an autointerp run: whose open batches it resumes."""
    return f"autointerp|{provider}|{model}|{strategy}|{harvest_id}"


def same_label_scopes(table: BatchTable, model: str, strategy: str, harvest_id: str) -> list[str]:
    """Every scope with an open batch whose results would be the labels ``(harvest, strategy,
    model)`` names, whichever provider it went to (a label's key has no provider)."""
    tail = f"|{model}|{strategy}|{harvest_id}"
    return [
        s
        for s in table.open_scopes("autointerp|")
        if s.endswith(tail) and s.count("|") == tail.count("|") + 1
    ]


async def label_in_batches(
    todo: Sequence[str],
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
    secrets: list[str],
    force: bool,
    seed: int | None,
    on_progress: Callable[[BatchProgress], None] | None,
    mode: Mode = "run",
) -> dict[str, Any]:
    """Label ``todo`` through the batch API; returns the run report's batch fields. ``mode``
    ``cancel`` / ``collect_once`` sends nothing new (see :func:`run_batches`).

    Not sent either: components held by an open batch of another provider under the same
    label key (another scope: its own run collects them), so none is billed twice."""
    scope = label_scope(provider.name, model, strategy.name, harvest_id)
    others = [s for s in same_label_scopes(store.batches, model, strategy.name, harvest_id)
              if s != scope]  # fmt: skip
    held_elsewhere = store.batches.held_items(others)
    todo_all = list(todo)
    todo = [k for k in todo if k not in held_elsewhere]
    job = make_job(scope, provider, model, config, store.batches, store.ledger, secrets, seed)

    def prompt_of(key: str) -> Any:
        """Rendered again where needed rather than kept: 0.1 ms a prompt against holding
        every in-flight prompt in memory for hours."""
        try:
            return strategy.prompt(evidence_for(key), options)
        except KeyError:  # a component an earlier run submitted, not in this run's list
            return None

    def request_for(key: str) -> CompletionRequest:
        prompt = prompt_of(key)
        return CompletionRequest(
            system=prompt.system,
            prompt=prompt.user,
            schema=ANSWER_SCHEMA,
            max_output_tokens=config.max_output_tokens,
            evidence=evidence_for(key),
        )

    started = now_iso()
    labelled, failed = 0, 0
    written_ok: list[str] = []  # labelled by this call
    written: list[str] = []  # every component this call wrote a row for
    reasons: Counter[str] = Counter()
    cache_read, cache_saved = 0, 0.0

    def clean(text: str | None) -> str | None:
        return redact(text, secrets) if text is not None else None

    def on_result(key: str, result: ItemResult, cost: float) -> None:
        nonlocal labelled, failed, cache_read, cache_saved
        from spd_host.autointerp.runner import failure_reason

        prompt = prompt_of(key)
        completion = result.completion
        written.append(key)
        common: dict[str, Any] = {
            "harvest_id": harvest_id,
            "component_key": key,
            "strategy": strategy.name,
            "model": model,
            "provider": provider.name,
            "decomposition_id": decomposition_id,
            "is_baseline": provider.baseline,
            "system_prompt": redact(prompt.system, secrets) if prompt else "",
            "prompt": redact(prompt.user, secrets) if prompt else "",
            "cost_usd": cost,
            "input_tokens": completion.input_tokens if completion else result.input_tokens,
            "output_tokens": completion.output_tokens if completion else result.output_tokens,
            "attempts": 1,
            "started_at": started,
            "finished_at": now_iso(),
        }
        if completion is not None:
            answer = completion.answer
            cache_read += completion.cache_read_tokens
            cache_saved += job.pricing.cache_saving(completion)
            store.write(
                LabelRecord(
                    **common,
                    status="ok",
                    label=clean(answer.label),
                    confidence=answer.confidence,
                    reasoning=clean(answer.reasoning),
                    raw_response=clean(completion.raw),
                    error=None,
                ),
                replace=force,
            )
            labelled += 1
            written_ok.append(key)
            return
        error = redact(result.error or f"batch request {result.outcome}", secrets)
        store.write(
            LabelRecord(
                **common,
                status="failed",
                label=None,
                confidence=None,
                reasoning=None,
                raw_response=clean(result.raw),
                error=error,
            )
        )
        failed += 1
        reasons[failure_reason(error)] += 1

    summary = await run_batches(job, todo, request_for, on_result, on_progress, mode)
    return {
        "n_labelled": labelled,
        "n_failed": failed,
        "n_not_sent": len(summary.not_sent),
        "spent_usd": summary.spent_usd,
        "stopped_by_cost_cap": summary.stopped_by_cost_cap,
        "calls": summary.requests,
        "stopped_by_error": summary.fatal,
        "failure_reasons": dict(reasons.most_common()),
        "cache_read_tokens": cache_read,
        "cache_saved_usd": cache_saved,
        "batches_submitted": summary.batches_submitted,
        "batches_resumed": summary.batches_resumed,
        "batch_outcomes": dict(summary.outcomes),
        "batches_collected": summary.batches_collected,
        "batches_canceled": summary.batches_canceled,
        "n_held_elsewhere": len(set(held_elsewhere) & set(todo_all)),
        "labelled_keys": written_ok,
        "written_keys": written,
    }
