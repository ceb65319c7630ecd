"""Anthropic Message Batches through the official SDK (``client.messages.batches``).

Wire format: ``create(requests=[{"custom_id", "params"}])`` where ``params`` are exactly the
synchronous call's Messages parameters (the label tool, the system prompt marked
``cache_control``: prompt caching stays on in batches); ``retrieve`` reports
``processing_status`` (``in_progress`` / ``canceling`` / ``ended``) and ``request_counts``
(``processing``, ``succeeded``, ``errored``, ``canceled``, ``expired``; the last four stay zero
until the batch ends); ``results`` streams one JSONL line per request,
``{"custom_id", "result": {"type": "succeeded" | "errored" | "canceled" | "expired", ...}}``.
Limits: 100,000 requests or 256 MB per batch.

Message batches carry no metadata, so :meth:`find` recognises a batch whose id was never
recorded by its creation time (not before the ``submitting`` row) and its request count,
among the batches this store does not already know.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.batch.base import AnswerFormat, BatchCounts, BatchStatus, ItemResult
from spd_host.autointerp.batch.sdk_client import SdkBatchClient
from spd_host.autointerp.providers.anthropic_provider import (
    async_client,
    message_params,
    parse_message,
)
from spd_host.autointerp.providers.base import ClientOptions, Provider
from spd_host.errors import ConfigError

CLOCK_SKEW = dt.timedelta(minutes=5)


class AnthropicBatchClient(SdkBatchClient):
    provider = "anthropic"
    max_requests = 100_000
    max_bytes = 256_000_000

    def __init__(self, provider: Provider, options: ClientOptions) -> None:
        super().__init__(provider.name, options.model, *async_client(provider, options))

    def line(self, custom_id: str, request: Any) -> dict[str, Any]:
        return {"custom_id": custom_id, "params": message_params(self._model, request)}

    async def submit(self, local_id: str, lines: Sequence[dict[str, Any]]) -> str:
        batch = await self._call(self._client.messages.batches.create(requests=list(lines)))  # type: ignore[arg-type]
        return str(batch.id)

    async def find(
        self, local_id: str, since: dt.datetime, n_requests: int, known: set[str]
    ) -> str | None:
        candidates = []
        page = await self._call(self._client.messages.batches.list(limit=100))
        async for b in page:  # newest first
            if b.created_at < since - CLOCK_SKEW:
                break
            if b.id in known:
                continue
            c = b.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            if total == n_requests:
                candidates.append(b.id)
        if len(candidates) > 1:
            raise ConfigError(
                f"{self.provider}: {len(candidates)} unrecorded batches of {n_requests} requests "
                f"were created since {since.isoformat()}; cannot tell which is batch {local_id}",
                hint="cancel the extra batches in the provider console, then re-run",
            )
        return candidates[0] if candidates else None

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self._call(self._client.messages.batches.retrieve(batch_id))
        c = b.request_counts
        return BatchStatus(
            ended=b.processing_status == "ended",
            provider_status=str(b.processing_status),
            counts=BatchCounts(
                processing=c.processing,
                succeeded=c.succeeded,
                errored=c.errored,
                expired=c.expired,
                canceled=c.canceled,
            ),
        )

    async def results(
        self, batch_id: str, answer_format: AnswerFormat = "label"
    ) -> AsyncIterator[ItemResult]:
        stream = await self._call(self._client.messages.batches.results(batch_id))
        async for entry in stream:
            yield _result(entry, answer_format)

    async def cancel(self, batch_id: str) -> None:
        await self._call(self._client.messages.batches.cancel(batch_id))


def _result(entry: Any, answer_format: AnswerFormat = "label") -> ItemResult:
    cid = str(entry.custom_id)
    result = entry.result
    kind = getattr(result, "type", None)
    if kind == "succeeded":
        try:
            return ItemResult(
                cid,
                "succeeded",
                completion=parse_message(result.message, answer_format=answer_format),
            )
        except MalformedAnswerError as err:
            return ItemResult.malformed(cid, err)
    if kind == "errored":
        inner = getattr(getattr(result, "error", None), "error", None)
        what = f"{getattr(inner, 'type', 'error')}: {getattr(inner, 'message', '')}"
        return ItemResult(cid, "errored", error=f"anthropic batch request errored: {what}")
    if kind == "expired":
        return ItemResult(cid, "expired", error="anthropic batch request expired (24 h window)")
    if kind == "canceled":
        return ItemResult(cid, "canceled", error="anthropic batch request canceled")
    return ItemResult(cid, "errored", error=f"anthropic batch: unknown result type {kind!r}")
