"""Sending one request per item to an LLM judge under autointerp's gates: the one request loop
every network judge suite (intruder, detection, fuzzing, simulation) goes through.

Synchronously: one client, concurrency workers, the cost cap with worst-case reservations
against the suite's spend ledger (so a resume starts from what was already spent),
Retry-After, retries and fail-fast (:func:`spd_host.autointerp.calls.call_with_retries`).
With ``config.batch``: the same requests through the provider's batch API
(:func:`spd_host.autointerp.batch.calls.call_in_batches`), its state kept beside the ledger
under a scope, so a killed run resumes by polling and never resubmits what was accepted.
Before a synchronous run sends anything, the scope's open batches (a ``--batch`` run not yet
collected) are polled once and the ended ones collected; items still pending in an open batch
are not sent (they are in flight, and billed there): :func:`held_in_batches` counts them for
the suite's result. With ``config.cancel_batches`` nothing is sent: the scope's open batches
are cancelled and collected. Either way an item whose calls were never sent (cap reached,
fatal error, held by a batch) gets no outcome: a re-run picks it up; every other item's
:class:`~spd_host.autointerp.calls.Outcome` reaches ``on_outcome`` in the same form, so a
suite records both paths with one function.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from spd_host.autointerp.batch.engine import Mode
from spd_host.autointerp.batch.table import BatchTable
from spd_host.autointerp.calls import Gates, Outcome, call_with_retries
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.ledger import SpendLedger
from spd_host.autointerp.limits import CostBudget, RateLimiter, SharedPause
from spd_host.autointerp.providers.base import ClientOptions, Completion, CompletionRequest
from spd_host.autointerp.registry import get_provider
from spd_host.autointerp.runner import known_secrets, resolve_pricing

T = TypeVar("T")


@dataclass(frozen=True)
class Calls(Generic[T]):
    """How a suite asks about its items: ``item_id`` (unique, the batch custom id),
    ``make_request`` (the same bytes on the sync and the batch path), ``accept(item,
    completion)`` (the answer as the item's value; raising ``MalformedAnswerError`` retries it,
    or fails it on the batch path) and ``on_outcome`` (every sent item's outcome)."""

    item_id: Callable[[T], str]
    make_request: Callable[[T], CompletionRequest]
    accept: Callable[[T, Completion], Any]
    on_outcome: Callable[[T, Outcome], None]


async def arun_requests(
    items: Sequence[T],
    config: AutointerpConfig,
    calls: Calls[T],
    ledger: SpendLedger | None = None,
    batch_scope: str = "",
) -> tuple[float, bool]:
    """Judge every item; returns (spent USD, stopped by the cost cap).

    ``batch_scope`` names the batch state (suite, judge and run key) that a resumed
    ``config.batch`` run polls instead of resubmitting.
    """
    if config.batch or config.cancel_batches:
        return await _arun_batch(items, config, calls, ledger, batch_scope)
    provider = get_provider(config.provider)
    pre_spent = 0.0
    if (
        ledger is not None
        and batch_scope
        and BatchTable(ledger.connection).open_batches(batch_scope)
    ):
        delivered: set[str] = set()
        pre_spent, _ = await _arun_batch(
            items, config, calls, ledger, batch_scope, "collect_once", delivered
        )
        held = BatchTable(ledger.connection).held_items([batch_scope])
        # neither what a batch still holds nor what it just answered is sent again
        items = [it for it in items if calls.item_id(it) not in held.keys() | delivered]
    model = config.model or provider.default_model
    pricing = resolve_pricing(provider, model, config)
    client = provider.make_client(
        ClientOptions(
            model=model,
            base_url=config.base_url,
            timeout_s=config.timeout_s,
            api_key_env=config.api_key_env,
        )
    )
    prior = 0.0
    if ledger is not None:
        ledger.close_orphans()
        prior = ledger.total()
    gates = Gates(
        config=config,
        pricing=pricing,
        budget=CostBudget(config.cost_cap_usd, prior_usd=prior),
        ledger=ledger,
        run_id=uuid.uuid4().hex[:12],
        secrets=known_secrets(None, config.api_key_env),
        rate=RateLimiter(config.rpm),
        pause=SharedPause(),
        rng=random.Random(0),
    )
    queue: asyncio.Queue[T] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)

    async def worker() -> None:
        while not gates.stop:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            out = await call_with_retries(
                gates,
                client,
                calls.make_request(item),
                calls.item_id(item),
                accept=lambda c, item=item: calls.accept(item, c),  # type: ignore[misc]
            )
            if out.sent:
                calls.on_outcome(item, out)

    try:
        n = min(config.max_concurrent, max(1, len(items)))
        await asyncio.gather(*(worker() for _ in range(n)))
    finally:
        await client.aclose()
    return gates.budget.spent + pre_spent, gates.budget.exhausted


async def _arun_batch(
    items: Sequence[T],
    config: AutointerpConfig,
    calls: Calls[T],
    ledger: SpendLedger | None,
    batch_scope: str,
    mode: Mode | None = None,
    delivered: set[str] | None = None,
) -> tuple[float, bool]:
    """The batch seam: the same requests and outcomes, sent through the provider's batch API
    (``mode``: the engine's; by default ``cancel`` under ``config.cancel_batches``, else
    ``run``). The ids whose outcome was recorded are added to ``delivered``.

    A result for an id this run does not have (an item of an earlier run's batch that is
    done or no longer asked for) is dropped, neither accepted nor recorded.
    """
    from spd_host.autointerp.batch.calls import call_in_batches

    provider = get_provider(config.provider)
    model = config.model or provider.default_model
    by_id = {calls.item_id(it): it for it in items}
    requests = [(key, calls.make_request(it)) for key, it in by_id.items()]

    def accept_by_id(key: str, c: Completion) -> Any:
        it = by_id.get(key)
        return calls.accept(it, c) if it is not None else None

    def on_done(key: str, out: Outcome) -> None:
        if key in by_id:
            calls.on_outcome(by_id[key], out)
            if delivered is not None:
                delivered.add(key)

    if mode is None:
        mode = "cancel" if config.cancel_batches else "run"
    spent, capped, _fatal = await call_in_batches(
        batch_scope, provider, model, config, ledger, requests, on_done,
        accept=accept_by_id, secrets=known_secrets(None, config.api_key_env), mode=mode,
    )  # fmt: skip
    return spent, capped


def held_in_batches(
    ledger: SpendLedger, batch_scope: str, ids: Sequence[str]
) -> tuple[int, list[str]]:
    """How many of ``ids`` an open batch of the scope still holds (a synchronous run did not
    send them), and those batches as ``local id (provider batch id)``."""
    table = BatchTable(ledger.connection)
    held = table.held_items([batch_scope])
    n = sum(1 for i in set(ids) if i in held)
    names = [
        f"{b.local_id} ({b.provider} {b.provider_batch_id or 'id not recorded'})"
        for b in table.open_listing([batch_scope])
    ]
    return n, names


def held_note(n: int, batches: Sequence[str]) -> str:
    """The one-line notice of trials a run did not send because an open batch holds them."""
    return (
        f"{n} trial(s) not sent: open batch(es) {', '.join(batches)} hold them; collect them "
        "with the same command and --batch, or cancel them with --cancel-batches"
    )


def scope_of(suite: str, config: AutointerpConfig, run_key: str) -> str:
    """The batch table's scope of one suite run: ``suite|provider|model|run key``."""
    provider = get_provider(config.provider)
    return f"{suite}|{provider.name}|{config.model or provider.default_model}|{run_key}"


def send_all(
    items: Sequence[T],
    config: AutointerpConfig,
    calls: Calls[T],
    ledger: SpendLedger | None = None,
    batch_scope: str = "",
) -> tuple[float, bool]:
    """:func:`arun_requests` from synchronous code, with a progress bar over the items."""
    from spd_host.evals.progress import progress_bar

    provider = get_provider(config.provider)
    model = config.model or provider.default_model
    with progress_bar(f"judging with {provider.name}/{model}", total=len(items)) as advance:

        def record(item: T, out: Outcome) -> None:
            calls.on_outcome(item, out)
            advance()

        counted = replace(calls, on_outcome=record)
        return asyncio.run(arun_requests(items, config, counted, ledger, batch_scope))
