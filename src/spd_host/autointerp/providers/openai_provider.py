"""OpenAI Chat Completions through the official ``openai`` SDK: OpenAI itself, OpenRouter, and
any OpenAI-compatible endpoint by base URL (vLLM, Ollama, LM Studio, llama.cpp server).

The answer is requested with a strict JSON-schema response format. OpenAI caches prompt
prefixes of 1,024+ tokens by itself (the system message comes first, so the shared part of a
strategy's prompt is the prefix); the cached part is read from
``usage.prompt_tokens_details.cached_tokens`` and priced at the cached rate. The SDK's own retries are
disabled; the runner retries (see :mod:`spd_host.autointerp.providers.anthropic_provider`).

A request with ``top_logprobs`` set also asks for ``logprobs=True, top_logprobs=N`` (vLLM and
most compatible servers accept the same); what comes back in ``choices[0].logprobs.content``
is passed on as :class:`~spd_host.autointerp.providers.base.TokenLogprob` s, and a server that
ignores the request simply yields ``Completion.logprobs = None``.
"""

from __future__ import annotations

from typing import Any

from spd_host.autointerp.answer import MalformedAnswerError, parse_reply
from spd_host.autointerp.pricing import provider_pricing
from spd_host.autointerp.providers.base import (
    ClientOptions,
    Completion,
    CompletionRequest,
    Pricing,
    Provider,
    TokenLogprob,
    TransientError,
    read_api_key,
)
from spd_host.autointerp.providers.sdk_errors import translate
from spd_host.errors import ConfigError

# USD per million tokens, from the price list (spd_host/autointerp/pricing.yaml).
OPENAI_PRICING = provider_pricing("openai")
OPENROUTER_PRICING = provider_pricing("openrouter")


def async_client(
    provider: Provider, options: ClientOptions, base_url: str | None
) -> tuple[Any, Any]:
    """The ``openai`` SDK module and an async client for ``options`` at ``base_url`` (no SDK
    retries: the gates retry), shared by the chat and the batch client."""
    import openai

    client = openai.AsyncOpenAI(
        # local servers accept any key; the SDK refuses an empty one
        api_key=read_api_key(provider, options) or "not-needed",
        base_url=base_url,
        timeout=options.timeout_s,
        max_retries=0,
    )
    return openai, client


class OpenAIChatClient:
    def __init__(self, provider: Provider, options: ClientOptions) -> None:

        base_url = options.base_url or provider.default_base_url
        if provider.name == "openai-compatible" and not base_url:
            raise ConfigError(
                "provider 'openai-compatible' needs --base-url",
                hint="e.g. --base-url http://127.0.0.1:8000/v1 for a local vLLM server",
            )
        self._sdk, self._client = async_client(provider, options, base_url)
        self._provider = provider.name
        self._model = options.model

    async def complete(self, request: CompletionRequest) -> Completion:
        try:
            response = await self._client.chat.completions.create(
                **chat_body(self._model, request, new_limit=self._new_limit)
            )
        except self._sdk.APIError as err:
            mapped = translate(err, self._sdk, self._provider)
            raise (mapped or err) from err
        if isinstance(response, str) or not getattr(response, "choices", None):
            raise TransientError(
                f"{self._provider}: the server answered without choices: {str(response)[:200]!r}"
            )
        return parse_chat(response, answer_format=request.answer_format)

    @property
    def _new_limit(self) -> bool:
        """OpenAI wants ``max_completion_tokens`` (``max_tokens`` is deprecated there and
        rejected by reasoning models); many compatible servers only know ``max_tokens``."""
        return self._provider == "openai"

    async def aclose(self) -> None:
        await self._client.close()


def _logprobs(choice: Any) -> tuple[TokenLogprob, ...] | None:
    """The content tokens' log-probabilities, or None where the server sent none."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return tuple(
        TokenLogprob(
            token=str(t.token),
            logprob=float(t.logprob),
            top=tuple((str(a.token), float(a.logprob)) for a in (t.top_logprobs or [])),
        )
        for t in content
    )


def chat_body(model: str, request: CompletionRequest, *, new_limit: bool) -> dict[str, Any]:
    """The Chat Completions body of one labelling call: the same for a synchronous call and
    for one line of a Batch API input file (whose ``body`` it is)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": request.system},
            {"role": "user", "content": request.prompt},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "component_label",
                "schema": dict(request.schema),
                "strict": True,
            },
        },
    }
    body["max_completion_tokens" if new_limit else "max_tokens"] = request.max_output_tokens
    if request.top_logprobs is not None:  # the judge's P(1) (delphi convention)
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs
    return body


def parse_chat(response: Any, *, answer_format: str = "label") -> Completion:
    """A completion from a ``ChatCompletion`` (a synchronous answer or a batch output line's
    body); raises ``MalformedAnswerError`` carrying the raw response and its billed usage."""
    usage = getattr(response, "usage", None)
    n_in = int(getattr(usage, "prompt_tokens", 0) or 0)  # cached tokens included
    n_out = int(getattr(usage, "completion_tokens", 0) or 0)
    details = getattr(usage, "prompt_tokens_details", None)
    n_cached = min(n_in, int(getattr(details, "cached_tokens", 0) or 0))
    raw = response.model_dump_json()
    if not getattr(response, "choices", None):
        raise MalformedAnswerError("the response has no choices").with_response(raw, n_in, n_out)
    choice = response.choices[0]
    content = choice.message.content or ""
    answer, data = parse_reply(
        content,
        truncated=choice.finish_reason == "length",
        answer_format=answer_format,
        raw=raw,
        input_tokens=n_in,
        output_tokens=n_out,
    )
    return Completion(
        answer=answer,
        raw=raw,
        input_tokens=n_in,
        output_tokens=n_out,
        cache_read_tokens=n_cached,
        data=data,
        content=content,
        logprobs=_logprobs(choice),  # None where the server sent none
    )


def _batch_client(provider: Provider, options: ClientOptions) -> Any:
    from spd_host.autointerp.batch.openai_batch import OpenAIBatchClient

    return OpenAIBatchClient(provider, options)


def _openai_like(
    name: str,
    description: str,
    default_model: str,
    api_key_env: str,
    *,
    key_required: bool = True,
    pricing: dict[str, Pricing] | None = None,
    default_pricing: Pricing | None = None,
    default_base_url: str | None = None,
    batch: bool = False,
) -> Provider:
    holder: list[Provider] = []
    provider = Provider(
        name=name,
        description=description,
        make_client=lambda options: OpenAIChatClient(holder[0], options),
        default_model=default_model,
        api_key_env=api_key_env,
        key_required=key_required,
        pricing=pricing or {},
        default_pricing=default_pricing,
        default_base_url=default_base_url,
        make_batch_client=(lambda options: _batch_client(holder[0], options)) if batch else None,
    )
    holder.append(provider)
    return provider


OPENAI = _openai_like(
    "openai",
    "OpenAI Chat Completions (official SDK), strict JSON-schema response format",
    "gpt-4.1-mini",
    "OPENAI_API_KEY",
    pricing=OPENAI_PRICING,
    batch=True,
)
OPENROUTER = _openai_like(
    "openrouter",
    "OpenRouter through the OpenAI SDK (any model OpenRouter serves)",
    "google/gemini-2.5-flash",
    "OPENROUTER_API_KEY",
    pricing=OPENROUTER_PRICING,
    default_base_url="https://openrouter.ai/api/v1",
)
OPENAI_COMPATIBLE = _openai_like(
    "openai-compatible",
    "any OpenAI-compatible server by --base-url (vLLM, Ollama, LM Studio); free unless priced",
    "default",
    "OPENAI_COMPATIBLE_API_KEY",
    key_required=False,
    default_pricing=Pricing(input_per_mtok=0.0, output_per_mtok=0.0),
)
