"""Paid calls through a batch API for callers other than autointerp (the LLM judge suites):
the batch counterpart of :func:`spd_host.autointerp.calls.call_with_retries`.

Each item's result comes back as the same :class:`~spd_host.autointerp.calls.Outcome` the
synchronous path gives (one attempt; ``accept`` turns a completion into the item's value and
may reject it as a malformed answer), so the caller records it with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.batch.base import ItemResult
from spd_host.autointerp.batch.engine import BatchProgress, Mode, run_batches
from spd_host.autointerp.batch.labels import make_job
from spd_host.autointerp.batch.table import BatchTable
from spd_host.autointerp.calls import Outcome
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.ledger import SpendLedger
from spd_host.autointerp.providers.base import Completion, CompletionRequest, Provider
from spd_host.errors import ConfigError


async def call_in_batches(
    scope: str,
    provider: Provider,
    model: str,
    config: AutointerpConfig,
    ledger: SpendLedger | None,
    items: Sequence[tuple[str, CompletionRequest]],
    on_done: Callable[[str, Outcome], None],
    *,
    accept: Callable[[str, Completion], Any] | None = None,
    secrets: list[str] | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    mode: Mode = "run",
) -> tuple[float, bool, str | None]:
    """Send ``items`` (``(item id, request)``) in batches; returns (spent USD, stopped by the
    cost cap, the error that stopped the run if one did). Items never sent get no outcome.
    ``mode`` ``cancel`` / ``collect_once``: nothing is sent (see :func:`run_batches`)."""
    if ledger is None:
        raise ConfigError(
            "--batch needs a spend ledger (its batch table lives beside it)",
            hint="run through `spd-host eval`, which keeps one per suite",
        )
    requests = dict(items)
    formats = {r.answer_format for r in requests.values()}
    if len(formats) > 1:
        raise ConfigError(
            f"one batch scope ({scope!r}) asks for answers in {sorted(formats)}",
            hint="send each answer format under its own scope",
        )
    job = make_job(
        scope, provider, model, config, BatchTable(ledger.connection), ledger, secrets or []
    )
    job.answer_format = formats.pop() if formats else "label"

    def on_result(item: str, result: ItemResult, cost: float) -> None:
        out = Outcome(attempts=1, cost=cost, raw=result.raw, error=result.error or "")
        completion = result.completion
        if completion is not None:
            out.input_tokens, out.output_tokens = completion.input_tokens, completion.output_tokens
            out.raw = completion.raw
            try:
                value = accept(item, completion) if accept is not None else completion
            except MalformedAnswerError as err:
                out.error = f"malformed answer: {err.message}"
            else:
                out.ok, out.value, out.completion, out.error = True, value, completion, ""
        else:
            out.input_tokens, out.output_tokens = result.input_tokens, result.output_tokens
            out.error = out.error or f"batch request {result.outcome}"
        on_done(item, out)

    summary = await run_batches(
        job, list(requests), requests.__getitem__, on_result, on_progress, mode
    )
    return summary.spent_usd, summary.stopped_by_cost_cap, summary.fatal
