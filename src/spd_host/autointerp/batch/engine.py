"""The batch engine: chunk, reserve, submit, poll, collect, resume.

One call of :func:`run_batches` takes a list of items (autointerp components, judge trials),
each with its request, and ends when every item it submitted (and every item an earlier, killed
run of the same scope left in a batch) has a result, or when nothing more fits under the cap.

State machine of a batch (rows in :mod:`spd_host.autointerp.batch.table`)::

    submitting --create ok--> submitted --poll: ended--> ended --results written--> collected
        |  (killed before the id was written: resumed by BatchClient.find)
        +--> abandoned (the provider has no such batch: its items go out again)
        +--> failed    (the create call was refused: its items are failure rows)

Money: before a batch is created its worst case (every request's prompt bound plus every
output token, at the *batch* price) is written to the spend ledger as one in-flight row, so
the cap is checked on everything billed plus everything in flight, this run's and any earlier
run's. A chunk holds only as many requests as fit under what is left; when nothing fits the
engine waits for a running batch to end (its row is then settled at the billed cost, freeing
the rest) or, with none running, stops (the remaining items are neither labelled nor failed).
If a batch ever bills more than its reservation, later reservations are scaled up by the
largest such ratio, as the synchronous budget does.

Modes (``mode``): ``run`` submits and waits as above; ``cancel`` submits nothing, cancels every
open batch of the scope and waits until the provider has ended each, then collects it like any
ended batch (what finished before the cancel is billed and stored; the rest are ``canceled``
failure rows, retried by a later run; the reservation is settled at the billed cost);
``collect_once`` submits nothing and polls every open batch once, collecting the ended ones
(what a synchronous run does first, so that it never sends an item a batch is answering).
A cancel is marked in the table before the call: a process killed mid-cancel leaves the mark
and every later command of the scope sends the cancel again, unless the provider has ended the
batch meanwhile, which is then just collected.

Results are matched to items by custom id only (results come in any order); each item's
result is handed to ``on_result`` and marked done in the same transaction (groups of
:data:`COMMIT_EVERY`), so a process killed mid-collection neither loses nor duplicates one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from spd_host.autointerp.batch.base import AnswerFormat, BatchClient, BatchCounts, ItemResult
from spd_host.autointerp.batch.table import BatchRow, BatchTable
from spd_host.autointerp.cost import estimate_cost, estimate_prompt_tokens
from spd_host.autointerp.ledger import SpendLedger, now_iso
from spd_host.autointerp.providers.base import CompletionRequest, Pricing, ProviderCallError
from spd_host.safe_text import redact

COMMIT_EVERY = 500

Mode = Literal["run", "cancel", "collect_once"]

CANCELLING = ("canceling", "cancelling")
"""A batch's status between an accepted cancel and its end (Anthropic, OpenAI spelling)."""


@dataclass
class BatchProgress:
    """What the engine reports after every poll (the CLI draws it)."""

    total: int = 0  # items this run is responsible for (new and resumed)
    submitted: int = 0  # of those, in a batch the provider accepted
    running: int = 0  # still processing at the provider
    succeeded: int = 0
    errored: int = 0  # errored, malformed or refused
    expired: int = 0
    canceled: int = 0
    batches: int = 0
    spent_usd: float = 0.0


@dataclass
class BatchSummary:
    spent_usd: float = 0.0
    requests: int = 0  # requests submitted by this run
    batches_submitted: int = 0
    batches_resumed: int = 0
    batches_adopted: int = 0  # submitting rows whose batch the provider had after all
    batches_collected: int = 0
    batches_canceled: int = 0  # cancel calls the provider accepted (this run's or resumed)
    still_open: list[str] = field(default_factory=list)  # local ids left running at the end
    stopped_by_cost_cap: bool = False
    fatal: str | None = None
    not_sent: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)


@dataclass
class BatchJob:
    """Everything one run shares."""

    scope: str
    """Which run's batches these are (e.g. harvest/strategy/model): only open batches of the
    same scope are resumed."""
    client: BatchClient
    table: BatchTable
    ledger: SpendLedger
    pricing: Pricing
    model: str
    cap_usd: float | None
    run_id: str
    poll_interval_s: float = 30.0
    max_requests: int | None = None
    max_attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    secrets: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    answer_format: AnswerFormat = "label"
    """How every answer of this scope is parsed (one scope, one request kind)."""


ResultSink = Callable[[str, ItemResult, float], None]
"""``on_result(item, result, cost_usd)``: write the item's label/trial or failure row."""


def worst_case(pricing: Pricing, request: CompletionRequest) -> float:
    """The most a request can bill: the prompt bound, every output token (batch prices)."""
    tokens = estimate_prompt_tokens(request.system, request.prompt, request.schema)
    return estimate_cost(pricing, tokens, request.max_output_tokens)


def result_cost(pricing: Pricing, result: ItemResult) -> float:
    if result.completion is not None:
        return pricing.completion_cost(result.completion)  # cached input at its price
    return pricing.cost(result.input_tokens, result.output_tokens)


async def run_batches(
    job: BatchJob,
    keys: Sequence[str],
    request_for: Callable[[str], CompletionRequest],
    on_result: ResultSink,
    on_progress: Callable[[BatchProgress], None] | None = None,
    mode: Mode = "run",
) -> BatchSummary:
    """Label ``keys`` (and collect whatever earlier runs of ``job.scope`` left running); with
    ``mode`` ``cancel`` or ``collect_once``, ``keys`` are not sent (see the module doc)."""
    summary = BatchSummary()
    progress = BatchProgress()
    inflation = 1.0
    running: dict[str, BatchRow] = {}
    last_counts: dict[str, BatchCounts] = {}

    def report() -> None:
        progress.running = sum(c.processing for c in last_counts.values())
        progress.spent_usd = summary.spent_usd
        if on_progress is not None:
            on_progress(progress)

    # -- resume: what an earlier run of this scope left open --------------------------------
    for spend_id in job.table.dangling_spend():
        job.ledger.settle(spend_id, 0.0)
    for row in job.table.open_batches(job.scope):
        if row.provider_batch_id is None:
            since = dt.datetime.fromisoformat(row.created_at)
            found = await job.client.find(
                row.local_id, since, row.n_requests, job.table.known_ids(job.client.provider)
            )
            if found is None:
                job.table.close(row.local_id, "abandoned", "the provider never accepted it")
                if row.spend_id is not None:
                    job.ledger.settle(row.spend_id, 0.0)
                continue
            job.table.set_submitted(row.local_id, found)
            row = BatchRow(**{**row.__dict__, "provider_batch_id": found, "state": "submitted"})
            summary.batches_adopted += 1
        pending = len(job.table.items(row.local_id, pending_only=True))
        progress.total += pending
        progress.submitted += pending
        progress.batches += 1
        running[row.local_id] = row
        summary.batches_resumed += 1
    awaited = {k for r in running.values() for k in job.table.items(r.local_id).values()}
    sending = keys if mode == "run" else ()
    queue = deque(k for k in dict.fromkeys(sending) if k not in awaited)
    to_cancel = {
        local_id
        for local_id, row in running.items()
        if mode == "cancel" or row.cancel_requested_at is not None
    }
    progress.total += len(queue)
    report()

    limit = min(job.client.max_requests, job.max_requests or job.client.max_requests)

    def take_chunk() -> list[tuple[str, dict[str, object], float]]:
        """The next batch: as many queued items as the provider's limits and the budget allow."""
        room = None if job.cap_usd is None else job.cap_usd - job.ledger.total() + 1e-12
        chunk: list[tuple[str, dict[str, object], float]] = []
        n_bytes, reserved = 2, 0.0
        while queue and len(chunk) < limit:
            key = queue[0]
            request = request_for(key)
            worst = worst_case(job.pricing, request) * inflation
            line = job.client.line("x" * 40, request)  # sized with a full-length custom id
            size = len(json.dumps(line, separators=(",", ":")).encode()) + 1
            if chunk and n_bytes + size > job.client.max_bytes:
                break
            if room is not None and reserved + worst > room:
                break
            queue.popleft()
            chunk.append((key, line, worst))
            n_bytes, reserved = n_bytes + size, reserved + worst
        return chunk

    async def submit(chunk: list[tuple[str, dict[str, object], float]]) -> None:
        local_id = uuid.uuid4().hex[:16]
        ids = [f"{local_id}_{i}" for i in range(len(chunk))]
        lines = [{**line, "custom_id": cid} for cid, (_, line, _) in zip(ids, chunk, strict=True)]
        reserved = sum(w for _, _, w in chunk)
        spend_id = job.ledger.begin(job.run_id, f"batch:{local_id}", reserved)
        row = BatchRow(
            local_id=local_id,
            scope=job.scope,
            provider=job.client.provider,
            model=job.model,
            provider_batch_id=None,
            state="submitting",
            n_requests=len(chunk),
            reserved_usd=reserved,
            spend_id=spend_id,
            created_at=now_iso(),
        )
        job.table.insert_submitting(
            row, [(c, k, w) for c, (k, _, w) in zip(ids, chunk, strict=True)]
        )
        batch_id: str | None = None
        error: ProviderCallError | None = None
        for attempt in range(1, job.max_attempts + 1):
            try:
                batch_id = await job.client.submit(local_id, lines)
                break
            except ProviderCallError as err:
                error = err
                if not err.retryable:
                    break
                # the create may have been accepted before the error (a timeout): look first
                since = dt.datetime.fromisoformat(row.created_at)
                known = job.table.known_ids(job.client.provider)
                try:
                    batch_id = await job.client.find(local_id, since, len(chunk), known)
                except ProviderCallError:
                    batch_id = None
                if batch_id is not None:
                    break
                if attempt < job.max_attempts:
                    step = min(job.backoff_max_s, job.backoff_base_s * 2 ** (attempt - 1))
                    await asyncio.sleep(max(step * job.rng.uniform(0.5, 1.0), err.retry_after or 0))
        if batch_id is None:
            message = redact(error.message if error else "batch not created", job.secrets)
            job.ledger.settle(spend_id, 0.0)
            job.table.close(local_id, "failed", message)
            if error is not None and error.stops_run:
                summary.fatal = message
                queue.extendleft(reversed([k for k, _, _ in chunk]))  # not sent: not failed
                return
            with job.table.transaction():
                for cid, (key, _, _) in zip(ids, chunk, strict=True):
                    on_result(key, ItemResult(cid, "errored", error=message), 0.0)
                    job.table.mark_done(local_id, cid, "errored", 0.0)
            progress.errored += len(chunk)
            summary.outcomes["errored"] = summary.outcomes.get("errored", 0) + len(chunk)
            return
        job.table.set_submitted(local_id, batch_id)
        running[local_id] = BatchRow(
            **{**row.__dict__, "provider_batch_id": batch_id, "state": "submitted"}
        )
        summary.requests += len(chunk)
        summary.batches_submitted += 1
        progress.submitted += len(chunk)
        progress.batches += 1
        last_counts[local_id] = BatchCounts(processing=len(chunk))

    async def collect(row: BatchRow) -> None:
        nonlocal inflation
        assert row.provider_batch_id is not None
        pending = job.table.items(row.local_id, pending_only=True)
        done_now: list[tuple[str, str, ItemResult]] = []

        def flush() -> None:
            with job.table.transaction():
                for cid, key, result in done_now:
                    cost = result_cost(job.pricing, result)
                    on_result(key, result, cost)
                    job.table.mark_done(row.local_id, cid, result.outcome, cost)
                    summary.spent_usd += cost
                    summary.outcomes[result.outcome] = summary.outcomes.get(result.outcome, 0) + 1
                    bump(result.outcome)
            done_now.clear()

        def bump(outcome: str) -> None:
            if outcome == "succeeded":
                progress.succeeded += 1
            elif outcome == "expired":
                progress.expired += 1
            elif outcome == "canceled":
                progress.canceled += 1
            else:
                progress.errored += 1

        wildcard: ItemResult | None = None
        async for result in job.client.results(row.provider_batch_id, job.answer_format):
            if result.custom_id == "*":
                wildcard = result
                continue
            key = pending.pop(result.custom_id, None)
            if key is None:
                continue  # already written by an earlier collection, or not ours
            done_now.append((result.custom_id, key, result))
            if len(done_now) >= COMMIT_EVERY:
                flush()
        for cid, key in pending.items():  # requests the provider gave no result for
            missing = wildcard or ItemResult(cid, "errored", error="the batch returned no result")
            done_now.append((cid, key, ItemResult(cid, missing.outcome, error=missing.error)))
        flush()
        billed = job.table.billed(row.local_id)
        if row.spend_id is not None:
            job.ledger.settle(row.spend_id, billed)
        if row.reserved_usd > 0 and billed > row.reserved_usd:
            inflation = max(inflation, inflation * billed / row.reserved_usd)
        job.table.close(row.local_id, "collected")
        summary.batches_collected += 1
        running.pop(row.local_id, None)
        last_counts.pop(row.local_id, None)
        to_cancel.discard(row.local_id)

    def give_up(row: BatchRow, message: str) -> None:
        """A batch the provider no longer knows (404, deleted, results gone): its pending
        items become failure rows, retried by a later run, and its reservation stays spent
        (what it billed cannot be known)."""
        with job.table.transaction():
            for cid, key in job.table.items(row.local_id, pending_only=True).items():
                on_result(key, ItemResult(cid, "errored", error=message), 0.0)
                job.table.mark_done(row.local_id, cid, "errored", 0.0)
                progress.errored += 1
                summary.outcomes["errored"] = summary.outcomes.get("errored", 0) + 1
        if row.spend_id is not None:
            job.ledger.settle(row.spend_id, row.reserved_usd)
        job.table.close(row.local_id, "failed", message)
        running.pop(row.local_id, None)
        last_counts.pop(row.local_id, None)
        to_cancel.discard(row.local_id)

    async def send_cancel(row: BatchRow) -> None:
        """Cancel a batch the last poll saw running: the mark first (a kill after it makes
        the next command send it again), then the call. A refusal is checked against the
        batch's status: one that ended meanwhile is simply collected by the next poll."""
        assert row.provider_batch_id is not None
        job.table.request_cancel(row.local_id)
        try:
            await job.client.cancel(row.provider_batch_id)
        except ProviderCallError as err:
            if err.retryable or err.status in (404, 410):
                return  # tried again next round; a lost batch is given up by the poll
            status = await job.client.status(row.provider_batch_id)
            if not status.ended and status.provider_status not in CANCELLING:
                raise
            to_cancel.discard(row.local_id)  # ended (collected next poll) or already cancelling
            return
        summary.batches_canceled += 1
        to_cancel.discard(row.local_id)

    async def poll_all() -> None:
        for local_id, row in list(running.items()):
            assert row.provider_batch_id is not None
            try:
                status = await job.client.status(row.provider_batch_id)
                job.table.set_status(local_id, status.provider_status, status.counts, status.ended)
                last_counts[local_id] = status.counts
                if not status.ended and local_id in to_cancel:
                    if status.provider_status in CANCELLING:  # an earlier cancel was accepted
                        summary.batches_canceled += 1
                        to_cancel.discard(local_id)
                    else:
                        await send_cancel(row)
                elif status.ended:
                    await collect(row)
            except ProviderCallError as err:
                if err.retryable:
                    continue  # a dropped poll or download is tried again next round
                if err.status in (404, 410):
                    give_up(row, redact(err.message, job.secrets))
                    continue
                raise
        report()

    try:
        while True:
            if running:
                await poll_all()
            if mode == "collect_once":
                break
            while queue and summary.fatal is None:
                chunk = take_chunk()
                if not chunk:
                    break
                await submit(chunk)
            report()
            if queue and not running:
                summary.stopped_by_cost_cap = summary.fatal is None
                break
            if not running:
                break
            await asyncio.sleep(job.poll_interval_s)
    except ProviderCallError as err:
        summary.fatal = redact(err.message, job.secrets)
    finally:
        await job.client.aclose()
    summary.not_sent = list(queue)
    summary.still_open = list(running)
    return summary
