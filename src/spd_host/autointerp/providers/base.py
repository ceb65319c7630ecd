"""The provider contract: what the runner needs from any LLM backend.

A :class:`Provider` is registered through the ``register_llm_providers`` hook. It names the
environment variable its API key lives in (keys are read from the environment at client
construction and never stored anywhere else), its pricing, and a factory for an async client.

Clients translate their SDK's failures into the small taxonomy below so the runner's retry
logic is the same for every provider:

- :class:`RateLimitedError` (HTTP 429/529, with the server's Retry-After when it sent one): retried,
  and the whole run pauses for Retry-After;
- :class:`TransientError` (5xx, timeouts, dropped connections): retried with backoff;
- :class:`~spd_host.autointerp.answer.MalformedAnswerError`: retried (the model may answer
  well next time), recorded as a failure when attempts run out;
- :class:`PermanentError` (4xx other than 429: bad key, unknown model): not retried; a 400,
  401, 403 or 404 stops the whole run (every later request would fail the same way).

Every error carries the HTTP ``status`` when there was one, and its message includes the
server's error body (``HTTP 400: {"detail": ...}``) so the stored failure says what the server
said.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from spd_host.autointerp.answer import LabelAnswer
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.errors import ConfigError, SpdHostError


class ProviderCallError(SpdHostError):
    """Base for failures of one provider call (the runner decides whether to retry)."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        hint: str | None = None,
        status: int | None = None,
    ):
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.status = status

    @property
    def stops_run(self) -> bool:
        """Bad request, bad key, forbidden, not found: the next request would fail the same."""
        return self.status in FAIL_FAST_STATUSES


FAIL_FAST_STATUSES = frozenset({400, 401, 403, 404})


class RateLimitedError(ProviderCallError):
    retryable = True


class TransientError(ProviderCallError):
    retryable = True


class PermanentError(ProviderCallError):
    retryable = False


class Pricing(BaseModel):
    """US dollars per million tokens.

    ``cached_input_per_mtok`` prices input read from the provider's prompt cache and
    ``cache_write_per_mtok`` input written to it; ``None`` bills them at the full input price
    (the safe side for the cost cap when a price is given by hand).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> float:
        """Dollars for one call. ``input_tokens`` counts *every* input token, the cached ones
        included; ``cache_read_tokens``/``cache_write_tokens`` say how many of them were read
        from / written to the cache."""
        plain = max(0, input_tokens - cache_read_tokens - cache_write_tokens)
        read = (
            self.input_per_mtok
            if self.cached_input_per_mtok is None
            else self.cached_input_per_mtok
        )
        write = (
            self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        )
        return (
            plain * self.input_per_mtok
            + cache_read_tokens * read
            + cache_write_tokens * write
            + output_tokens * self.output_per_mtok
        ) / 1e6

    def completion_cost(self, completion: Completion) -> float:
        """The billed cost of a completion, cached input at its own price."""
        return self.cost(
            completion.input_tokens,
            completion.output_tokens,
            cache_read_tokens=completion.cache_read_tokens,
            cache_write_tokens=completion.cache_write_tokens,
        )

    def cache_saving(self, completion: Completion) -> float:
        """What the cache saved on this completion (negative while writing it costs extra)."""
        return self.cost(completion.input_tokens, completion.output_tokens) - self.completion_cost(
            completion
        )

    @property
    def free(self) -> bool:
        return self.input_per_mtok == 0 and self.output_per_mtok == 0


@dataclass(frozen=True)
class CompletionRequest:
    """One labelling call. ``evidence`` rides along for providers that do not use the prompt
    (the offline baseline); network providers send only ``system`` and ``prompt``."""

    system: str
    prompt: str
    schema: Mapping[str, Any]
    max_output_tokens: int
    evidence: ComponentEvidence
    #: "label": the answer is a :class:`LabelAnswer`; "object": any JSON object matching
    #: ``schema``, returned decoded in ``Completion.data`` (eval judges with their own schema)
    answer_format: Literal["label", "object"] = "label"
    # ask for per-token log-probabilities with this many alternatives per token (OpenAI
    # ``logprobs``/``top_logprobs``); None: not asked. Providers without them ignore it.
    top_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives (the
    OpenAI-compatible ``choices[0].logprobs.content[i]``), the generated token included."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """One answer and its billed usage. ``input_tokens`` is every input token (cached ones
    included, whatever the provider's own usage fields count); ``cache_read_tokens`` and
    ``cache_write_tokens`` are the parts read from and written to the prompt cache."""

    answer: LabelAnswer
    raw: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    #: the decoded JSON answer of an ``answer_format="object"`` request (``answer`` is then
    #: :data:`~spd_host.autointerp.answer.OBJECT_ANSWER`)
    data: dict[str, Any] | None = None
    #: the answer text exactly as generated, and its per-token log-probabilities when asked for
    content: str | None = None
    # per generated token, when the request asked for them and the provider returned them
    logprobs: tuple[TokenLogprob, ...] | None = None


class LLMClient(Protocol):
    async def complete(self, request: CompletionRequest) -> Completion:
        """One call; raises a :class:`ProviderCallError` subclass or ``MalformedAnswerError``
        with ``.raw`` set where the server answered."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class ClientOptions:
    model: str
    base_url: str | None = None
    timeout_s: float = 60.0
    api_key_env: str | None = None  # override of the provider's default variable name


@dataclass(frozen=True)
class Provider:
    """An LLM backend as registered by a plugin."""

    name: str
    description: str
    make_client: Callable[[ClientOptions], LLMClient]
    default_model: str
    api_key_env: str | None = None  # None: needs no key
    key_required: bool = True
    pricing: Mapping[str, Pricing] = field(default_factory=dict)
    default_pricing: Pricing | None = None  # used for models not in ``pricing``
    baseline: bool = False  # a non-LLM explainer; labels are marked as a baseline
    default_base_url: str | None = None
    make_batch_client: Callable[[ClientOptions], Any] | None = None
    """Factory of the provider's batch-API client (a
    :class:`spd_host.autointerp.batch.base.BatchClient`); None: no batch API."""

    def pricing_for(self, model: str) -> Pricing | None:
        return self.pricing.get(model, self.default_pricing)

    def has_key(self, env_name: str | None = None) -> bool:
        name = env_name or self.api_key_env
        return name is None or bool(os.environ.get(name))


def read_api_key(provider: Provider, options: ClientOptions) -> str | None:
    """The provider's key from the environment; a clear error when it is required and unset."""
    name = options.api_key_env or provider.api_key_env
    if name is None:
        return None
    value = os.environ.get(name)
    if not value and provider.key_required:
        raise ConfigError(
            f"provider {provider.name!r} needs an API key in the environment variable {name}, which is not set",
            hint=f"export {name}=... (keys are read only from the environment), or use --provider offline",
        )
    return value or None
