"""One item's calls under the run's shared gates: the retry loop autointerp and the LLM eval
judges both use, so that the cost cap, the ledger, Retry-After and fail-fast behave the same
wherever a paid call is made.

Per attempt: wait out a shared pause; reserve the worst case under the cap (stop the run if it
does not fit); wait for a rate slot; write the reservation to the ledger; call; settle the
ledger row and the budget with the billed cost. A ``Retry-After`` longer than the ceiling is
not waited for: that request is given up and recorded as failed. A 400/401/403/404 stops the
run: the next request would fail the same way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.cost import estimate_cost, estimate_prompt_tokens
from spd_host.autointerp.ledger import SpendLedger
from spd_host.autointerp.limits import CostBudget, RateLimiter, SharedPause
from spd_host.autointerp.providers.base import (
    Completion,
    CompletionRequest,
    LLMClient,
    Pricing,
    ProviderCallError,
    TransientError,
)
from spd_host.safe_text import redact


def backoff_delay(
    attempt: int, config: AutointerpConfig, retry_after: float | None, rng: random.Random
) -> float:
    """Exponential backoff with full jitter in [½, 1] of the step; Retry-After is a floor."""
    step = min(config.backoff_max_s, config.backoff_base_s * (2 ** (attempt - 1)))
    delay = step * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


@dataclass
class Gates:
    """What every item of one run shares: limits, the budget, the ledger, the stop flag."""

    config: AutointerpConfig
    pricing: Pricing
    budget: CostBudget
    ledger: SpendLedger | None
    run_id: str
    secrets: list[str] = field(default_factory=list)
    rate: RateLimiter | None = None
    pause: SharedPause = field(default_factory=SharedPause)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    stop: bool = False
    fatal: str | None = None  # why the run stopped early (a fail-fast error)
    calls: int = 0

    def __post_init__(self) -> None:
        if self.rate is None:
            self.rate = RateLimiter(self.config.rpm)


@dataclass
class Outcome:
    """How one item's calls ended. ``value`` is set on success; ``sent`` is False when no
    attempt was made (stopped by the cap or by a fatal error: neither a result nor a failure)."""

    value: Any = None
    completion: Completion | None = None
    ok: bool = False
    attempts: int = 0
    cost: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    raw: str | None = None

    @property
    def sent(self) -> bool:
        return self.attempts > 0


async def call_with_retries(
    gates: Gates,
    client: LLMClient,
    request: CompletionRequest,
    item: str,
    accept: Callable[[Completion], Any] | None = None,
) -> Outcome:
    """Call until success, a permanent error, the attempt limit, the cap or a fatal stop.

    ``accept(completion)`` turns a completion into the item's value and may raise
    ``MalformedAnswerError`` (retried like a malformed answer from the client).
    """
    config = gates.config
    worst = estimate_cost(
        gates.pricing,
        estimate_prompt_tokens(request.system, request.prompt, request.schema),
        request.max_output_tokens,
    )
    out = Outcome()
    for attempt in range(1, config.max_attempts + 1):
        await gates.pause.wait()
        if gates.stop:
            break
        reserved = gates.budget.reserve(worst)
        if reserved is None:
            gates.stop = True
            break
        assert gates.rate is not None
        await gates.rate.acquire()
        call_id = gates.ledger.begin(gates.run_id, item, reserved) if gates.ledger else None
        out.attempts += 1
        gates.calls += 1
        actual = 0.0
        retry_after: float | None = None
        give_up = False
        answered = False  # False in ``finally`` means cancelled mid-call: count the worst case
        try:
            completion = await client.complete(request)
            actual = gates.pricing.completion_cost(completion)  # cached input at its price
            out.input_tokens += completion.input_tokens
            out.output_tokens += completion.output_tokens
            out.raw = completion.raw
            answered = True
            value = accept(completion) if accept is not None else completion
        except MalformedAnswerError as err:
            answered = True
            if not actual:  # the client's own parse failed: it attached the billed usage
                actual = gates.pricing.cost(err.input_tokens, err.output_tokens)
                out.input_tokens += err.input_tokens
                out.output_tokens += err.output_tokens
                out.raw = err.raw
            out.error = f"malformed answer: {err.message}"
        except ProviderCallError as err:
            answered = True
            # a timed-out call may have been billed in full: count its worst case
            timed_out = isinstance(err, TransientError) and "timed out" in err.message
            actual = reserved if timed_out else 0.0
            out.error = err.message
            retry_after = err.retry_after
            if retry_after is not None and retry_after > config.max_retry_after_s:
                out.error += (
                    f" (the server asked to wait {retry_after:,.0f} s, more than the "
                    f"{config.max_retry_after_s:,.0f} s ceiling: this request was given up)"
                )
                give_up = True
            elif retry_after is not None:
                gates.pause.pause_for(retry_after)
            if err.stops_run:
                gates.stop = True
                gates.fatal = redact(err.message, gates.secrets)
                give_up = True
            elif not err.retryable:
                give_up = True
        else:
            out.ok, out.value, out.completion = True, value, completion
        finally:
            # also runs on cancellation: the billed cost (or the worst case) is recorded
            if not answered:
                actual = reserved
            if call_id is not None and gates.ledger is not None:
                gates.ledger.settle(call_id, actual)
            gates.budget.settle(reserved, actual)
            out.cost += actual
        if out.ok or give_up:
            break
        if attempt < config.max_attempts:
            await asyncio.sleep(backoff_delay(attempt, config, retry_after, gates.rng))
    out.error = redact(out.error, gates.secrets)
    out.raw = redact(out.raw, gates.secrets) if out.raw is not None else None
    return out
