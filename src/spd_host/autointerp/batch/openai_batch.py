"""The OpenAI Batch API through the official SDK (``client.files`` and ``client.batches``).

Wire format: the requests are one JSONL file, a line per request
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`` whose ``body`` is
the synchronous call's body, uploaded with ``files.create(purpose="batch")``; then
``batches.create(input_file_id, endpoint="/v1/chat/completions", completion_window="24h",
metadata={"spd_host_batch": <local id>})``. ``retrieve`` reports ``status`` (``validating``,
``in_progress``, ``finalizing``, ``cancelling`` while running; ``completed``, ``failed``,
``expired``, ``cancelled`` at the end) and ``request_counts`` (``total``, ``completed``,
``failed``). At the end, ``output_file_id`` holds a line per answered request
``{"custom_id", "response": {"status_code", "body"}, "error"}``, ``error_file_id`` one per
request that failed (``error.code`` ``batch_expired`` / ``batch_cancelled`` for requests the
window or a cancel cut off). Requests in neither file (an expired or cancelled batch) are
expired or cancelled; a ``failed`` batch (its file was rejected) errors every request.
Limits: 50,000 requests or 200 MB per batch. OpenAI caches the shared prompt prefix itself.

:meth:`find` recognises a batch whose id was never recorded by its ``metadata``.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.batch.base import AnswerFormat, BatchCounts, BatchStatus, ItemResult
from spd_host.autointerp.batch.sdk_client import SdkBatchClient
from spd_host.autointerp.providers.base import ClientOptions, Provider
from spd_host.autointerp.providers.openai_provider import async_client, chat_body, parse_chat

ENDPOINT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
META_KEY = "spd_host_batch"
RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


class OpenAIBatchClient(SdkBatchClient):
    provider = "openai"
    max_requests = 50_000
    max_bytes = 200_000_000

    def __init__(self, provider: Provider, options: ClientOptions) -> None:
        base_url = options.base_url or provider.default_base_url
        super().__init__(provider.name, options.model, *async_client(provider, options, base_url))
        self._ids: dict[str, set[str]] = {}  # batch id -> its custom ids (for missing lines)

    def line(self, custom_id: str, request: Any) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": ENDPOINT,
            "body": chat_body(self._model, request, new_limit=True),
        }

    async def submit(self, local_id: str, lines: Sequence[dict[str, Any]]) -> str:
        # spooled to a temporary file and streamed from it: up to 200 MB of JSONL is not
        # copied into memory as a string, then bytes, then a multipart body
        with tempfile.TemporaryFile() as fh:
            for x in lines:
                fh.write(json.dumps(x, separators=(",", ":")).encode() + b"\n")
            fh.seek(0)
            upload = await self._call(
                self._client.files.create(
                    file=(f"spd-host-{local_id}.jsonl", fh, "application/jsonl"), purpose="batch"
                )
            )
        batch = await self._call(
            self._client.batches.create(
                input_file_id=upload.id,
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata={META_KEY: local_id},
            )
        )
        return str(batch.id)

    async def find(
        self, local_id: str, since: dt.datetime, n_requests: int, known: set[str]
    ) -> str | None:
        page = await self._call(self._client.batches.list(limit=100))
        async for b in page:
            if (b.metadata or {}).get(META_KEY) == local_id and b.id not in known:
                return str(b.id)
            if b.created_at < since.timestamp() - 300:
                break  # newest first: older batches cannot be ours
        return None

    async def status(self, batch_id: str) -> BatchStatus:
        b = await self._call(self._client.batches.retrieve(batch_id))
        c = b.request_counts
        total, done, failed = (c.total, c.completed, c.failed) if c else (0, 0, 0)
        ended = b.status not in RUNNING
        counts = BatchCounts(
            processing=0 if ended else max(0, total - done - failed),
            succeeded=done,
            errored=failed,
            expired=max(0, total - done - failed) if b.status == "expired" else 0,
            canceled=max(0, total - done - failed) if b.status == "cancelled" else 0,
        )
        return BatchStatus(ended=ended, provider_status=str(b.status), counts=counts)

    async def _lines(self, file_id: str | None) -> Iterator[dict[str, Any]]:
        """A result file's lines, parsed one at a time (a file holds up to 50,000)."""
        if not file_id:
            return iter(())
        content = await self._call(self._client.files.content(file_id))
        return (json.loads(x) for x in content.text.splitlines() if x.strip())

    async def results(
        self, batch_id: str, answer_format: AnswerFormat = "label"
    ) -> AsyncIterator[ItemResult]:
        b = await self._call(self._client.batches.retrieve(batch_id))
        if b.status == "failed":
            errs = [f"{e.code}: {e.message}" for e in ((b.errors and b.errors.data) or [])]
            yield ItemResult(
                "*", "errored", error="openai batch failed: " + ("; ".join(errs) or "no reason")
            )
            return
        for line in await self._lines(b.output_file_id):
            yield _result(line, answer_format)
        for line in await self._lines(b.error_file_id):
            yield _result(line, answer_format)
        if b.status in ("expired", "cancelled"):
            yield ItemResult(
                "*",
                "expired" if b.status == "expired" else "canceled",
                error=f"openai batch {b.status} before this request ran",
            )

    async def cancel(self, batch_id: str) -> None:
        await self._call(self._client.batches.cancel(batch_id))


def _result(line: dict[str, Any], answer_format: AnswerFormat = "label") -> ItemResult:
    """One output- or error-file line."""
    from openai.types.chat import ChatCompletion

    cid = str(line.get("custom_id"))
    error = line.get("error") or None
    response = line.get("response") or {}
    status = response.get("status_code")
    if error is not None and status in (None, 200):
        code = str(error.get("code") or "")
        message = f"openai batch request {code or 'error'}: {error.get('message') or ''}"
        if code == "batch_expired":
            return ItemResult(cid, "expired", error=message)
        if code == "batch_cancelled":
            return ItemResult(cid, "canceled", error=message)
        return ItemResult(cid, "errored", error=message)
    body = response.get("body")
    if status != 200:
        text = json.dumps(body)[:500] if body is not None else ""
        return ItemResult(cid, "errored", error=f"openai: HTTP {status}: {text}", raw=text or None)
    try:
        completion = parse_chat(ChatCompletion.model_validate(body), answer_format=answer_format)
    except MalformedAnswerError as err:
        return ItemResult.malformed(cid, err)
    except Exception as err:  # a body that is not a chat completion
        return ItemResult(
            cid, "malformed", error=f"malformed answer: {type(err).__name__}", raw=json.dumps(body)
        )
    return ItemResult(cid, "succeeded", completion=completion)
