"""Sending one request per item to an LLM judge under autointerp's gates.

The loop every network judge shares: one client, concurrency workers, the cost cap with
worst-case reservations against the suite's spend ledger (so a resume starts from what was
already spent), Retry-After, retries and fail-fast (:func:`spd_host.autointerp.calls
.call_with_retries`). An item whose calls were never sent (cap reached, fatal error) gets no
outcome: a re-run picks it up.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from spd_host.autointerp.calls import Gates, Outcome, call_with_retries
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.ledger import SpendLedger
from spd_host.autointerp.limits import CostBudget, RateLimiter, SharedPause
from spd_host.autointerp.providers.base import ClientOptions, Completion, CompletionRequest
from spd_host.autointerp.registry import get_provider
from spd_host.autointerp.runner import known_secrets, resolve_pricing

T = TypeVar("T")


async def _arun(
    items: Sequence[T],
    config: AutointerpConfig,
    item_id: Callable[[T], str],
    make_request: Callable[[T], CompletionRequest],
    accept: Callable[[T, Completion], Any],
    on_outcome: Callable[[T, Outcome], None],
    ledger: SpendLedger | None,
) -> tuple[float, bool]:
    provider = get_provider(config.provider)
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
                make_request(item),
                item_id(item),
                accept=lambda c, item=item: accept(item, c),  # type: ignore[misc]
            )
            if out.sent:
                on_outcome(item, out)

    try:
        n = min(config.max_concurrent, max(1, len(items)))
        await asyncio.gather(*(worker() for _ in range(n)))
    finally:
        await client.aclose()
    return gates.budget.spent, gates.budget.exhausted


def send_all(
    items: Sequence[T],
    config: AutointerpConfig,
    *,
    item_id: Callable[[T], str],
    make_request: Callable[[T], CompletionRequest],
    accept: Callable[[T, Completion], Any],
    on_outcome: Callable[[T, Outcome], None],
    ledger: SpendLedger | None = None,
) -> tuple[float, bool]:
    """Judge every item; returns (spent USD, stopped by the cost cap).

    ``accept(item, completion)`` turns an answer into the item's value (raising
    ``MalformedAnswerError`` retries it); ``on_outcome`` receives every sent item's outcome.
    """
    from spd_host.evals.progress import progress_bar

    provider = get_provider(config.provider)
    model = config.model or provider.default_model
    with progress_bar(f"judging with {provider.name}/{model}", total=len(items)) as advance:

        def record(item: T, out: Outcome) -> None:
            on_outcome(item, out)
            advance()

        return asyncio.run(_arun(items, config, item_id, make_request, accept, record, ledger))
