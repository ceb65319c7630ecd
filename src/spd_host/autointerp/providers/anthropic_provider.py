"""Anthropic Messages API through the official ``anthropic`` SDK.

The JSON answer is obtained with forced tool use: one tool whose ``input_schema`` is the label
schema and ``tool_choice`` naming it, so the model must answer with a schema-shaped object.
The shared prefix (the tool, i.e. the output schema, and the system prompt) is marked
cacheable with ``cache_control``; cached input is read back from the usage fields
(``cache_read_input_tokens``, ``cache_creation_input_tokens``) and priced at its own rate.
The SDK's own retries are disabled (``max_retries=0``): the runner retries, so that Retry-After
pauses the whole run and every attempt is counted against the cost cap.
"""

from __future__ import annotations

import json
from typing import Any

from spd_host.autointerp.answer import parse_reply
from spd_host.autointerp.pricing import provider_pricing
from spd_host.autointerp.providers.base import (
    ClientOptions,
    Completion,
    CompletionRequest,
    Provider,
    TransientError,
    read_api_key,
)
from spd_host.autointerp.providers.sdk_errors import translate

TOOL_NAME = "record_component_label"

# USD per million tokens, from the price list (spd_host/autointerp/pricing.yaml).
PRICING = provider_pricing("anthropic")


def async_client(provider: Provider, options: ClientOptions) -> tuple[Any, Any]:
    """The ``anthropic`` SDK module and an async client for ``options`` (no SDK retries: the
    gates retry), shared by the synchronous and the batch client."""
    import anthropic

    client = anthropic.AsyncAnthropic(
        api_key=read_api_key(provider, options),
        base_url=options.base_url or provider.default_base_url,
        timeout=options.timeout_s,
        max_retries=0,
    )
    return anthropic, client


class AnthropicClient:
    def __init__(self, provider: Provider, options: ClientOptions) -> None:
        self._sdk, self._client = async_client(provider, options)
        self._provider = provider.name
        self._model = options.model

    async def complete(self, request: CompletionRequest) -> Completion:
        params = message_params(self._model, request)
        try:
            message = await self._client.messages.create(**params)
        except self._sdk.APIError as err:
            mapped = translate(err, self._sdk, self._provider)
            raise (mapped or err) from err
        if isinstance(message, str) or not hasattr(message, "content"):
            raise TransientError(
                f"{self._provider}: the server answered without a message: {str(message)[:200]!r}"
            )
        return parse_message(message, answer_format=request.answer_format)

    async def aclose(self) -> None:
        await self._client.close()


def message_params(model: str, request: CompletionRequest) -> dict[str, Any]:
    """The Messages API parameters of one labelling call: the same for a synchronous call and
    for one request of a Message Batch (whose ``params`` they are), so both are cached alike."""
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_output_tokens,
        "messages": [{"role": "user", "content": request.prompt}],
        "tools": [
            {
                "name": TOOL_NAME,
                "description": "Record the label for the neural-network component.",
                "input_schema": dict(request.schema),
            }
        ],
        "tool_choice": {"type": "tool", "name": TOOL_NAME},
    }
    system = _cached_system(request.system)
    if system:
        params["system"] = system
    return params


def parse_message(message: Any, *, answer_format: str = "label") -> Completion:
    """A completion from a Messages API ``Message`` (a synchronous answer or a batch result);
    raises ``MalformedAnswerError`` carrying the raw message and its billed usage."""
    usage = getattr(message, "usage", None)
    # Anthropic's input_tokens excludes the cached part; ours counts every input token
    n_read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
    n_write = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
    n_in = int(getattr(usage, "input_tokens", 0) or 0) + n_read + n_write
    n_out = int(getattr(usage, "output_tokens", 0) or 0)
    raw = _raw_json(message)
    truncated = getattr(message, "stop_reason", None) == "max_tokens"
    payload: Any = None
    for block in getattr(message, "content", None) or []:
        if getattr(block, "type", None) == "tool_use" and getattr(block, "name", None) == TOOL_NAME:
            payload = block.input
            break
    if payload is None:  # no tool call: accept a JSON object written as text
        blocks = getattr(message, "content", None) or []
        texts = [str(getattr(b, "text", "")) for b in blocks if getattr(b, "type", None) == "text"]
        payload = "".join(texts)
    answer, data = parse_reply(
        payload,
        truncated=truncated,
        answer_format=answer_format,
        raw=raw,
        input_tokens=n_in,
        output_tokens=n_out,
    )
    return Completion(
        answer=answer,
        data=data,
        raw=raw,
        input_tokens=n_in,
        output_tokens=n_out,
        cache_read_tokens=n_read,
        cache_write_tokens=n_write,
    )


def _cached_system(system: str) -> Any:
    """The system prompt as one text block marked cacheable.

    Anthropic caches the prefix up to a ``cache_control`` breakpoint, in the order tools,
    system, messages: so this caches the label tool (the output schema) and the strategy's
    system prompt (method description, instructions), which every component of a run shares,
    and leaves the per-component user message uncached. A prefix shorter than the model's
    minimum cacheable length is simply not cached (no error, no write charge). No system
    prompt: nothing (the field is omitted)."""
    if not system:
        return []
    return [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]


def _raw_json(message: Any) -> str:
    try:
        return str(message.model_dump_json())
    except Exception:
        return json.dumps(str(message))


def make_provider() -> Provider:
    return Provider(
        name="anthropic",
        description="Anthropic Messages API (official SDK), JSON via forced tool use",
        make_client=lambda options: AnthropicClient(PROVIDER, options),
        default_model="claude-haiku-4-5",
        api_key_env="ANTHROPIC_API_KEY",
        pricing=PRICING,
        make_batch_client=_batch_client,
    )


def _batch_client(options: ClientOptions) -> Any:
    from spd_host.autointerp.batch.anthropic_batch import AnthropicBatchClient

    return AnthropicBatchClient(PROVIDER, options)


PROVIDER = make_provider()
