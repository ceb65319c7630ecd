"""The batch-client contract and the shapes results come back in.

A provider's batch API is asynchronous: requests are submitted as one batch, the batch runs
for minutes to hours, then every request has one result. A :class:`BatchClient` hides the
wire format (Anthropic's request list and results stream, OpenAI's uploaded JSONL file and
output/error files) behind five calls; the engine (:mod:`spd_host.autointerp.batch.engine`)
owns everything else: state, cost, resume, matching results to items by custom id.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.providers.base import Completion, CompletionRequest

AnswerFormat = Literal["label", "object"]

Outcome = Literal["succeeded", "malformed", "errored", "expired", "canceled"]
"""One request's end: ``succeeded`` (a valid answer), ``malformed`` (answered, and billed,
but not with a valid label), ``errored`` (the provider refused or failed it), ``expired`` (the
batch's 24 h window ended first), ``canceled`` (the batch was cancelled first)."""


class BatchCounts(BaseModel):
    """Requests of a batch by state, as the provider counts them."""

    model_config = ConfigDict(extra="forbid")

    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    expired: int = 0
    canceled: int = 0


@dataclass(frozen=True)
class BatchStatus:
    """A batch as last polled: ``ended`` once every request has a result to fetch."""

    ended: bool
    provider_status: str
    counts: BatchCounts


@dataclass(frozen=True)
class ItemResult:
    """One request's result, matched back to its item by ``custom_id``; ``"*"`` stands for
    every request of the batch that has no result of its own (an expired, cancelled or failed
    OpenAI batch reports those by omission)."""

    custom_id: str
    outcome: Outcome
    completion: Completion | None = None
    error: str | None = None
    raw: str | None = None
    input_tokens: int = 0  # billed usage of a malformed answer (a completion carries its own)
    output_tokens: int = 0

    @classmethod
    def malformed(cls, custom_id: str, err: MalformedAnswerError) -> ItemResult:
        """An answer that came back (and was billed) but did not parse: its usage is kept."""
        return cls(
            custom_id,
            "malformed",
            error=f"malformed answer: {err.message}",
            raw=err.raw,
            input_tokens=err.input_tokens,
            output_tokens=err.output_tokens,
        )


class BatchClient(Protocol):
    """One provider's batch API. Errors are the provider taxonomy
    (:class:`~spd_host.autointerp.providers.base.ProviderCallError`)."""

    provider: str
    max_requests: int
    """Requests one batch may hold (Anthropic 100,000; OpenAI 50,000)."""
    max_bytes: int
    """Bytes one batch may hold (Anthropic 256 MB of request body; OpenAI 200 MB of JSONL)."""

    def line(self, custom_id: str, request: CompletionRequest) -> dict[str, Any]:
        """The batch entry of one request (what is sent, and what its size is measured on)."""
        ...

    async def submit(self, local_id: str, lines: Sequence[dict[str, Any]]) -> str:
        """Create the batch; returns the provider's batch id."""
        ...

    async def find(
        self, local_id: str, since: dt.datetime, n_requests: int, known: set[str]
    ) -> str | None:
        """The id of a batch this store submitted as ``local_id`` whose id was never recorded
        (the process died between the create call and the write), or None if the provider
        has no such batch (it was never accepted)."""
        ...

    async def status(self, batch_id: str) -> BatchStatus: ...

    def results(
        self, batch_id: str, answer_format: AnswerFormat = "label"
    ) -> AsyncIterator[ItemResult]:
        """Every result of an ended batch (in any order), answers parsed as ``answer_format``
        (the label schema, or a suite's own JSON object) as the synchronous client would."""
        ...

    async def cancel(self, batch_id: str) -> None: ...

    async def aclose(self) -> None: ...
