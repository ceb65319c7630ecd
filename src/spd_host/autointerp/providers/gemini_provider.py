"""Gemini (Google's Gemini Developer API) through the official ``google-genai`` SDK.

The answer is requested as JSON with the label schema (``response_mime_type`` =
``application/json``, ``response_json_schema`` = the schema); the system prompt, the part every
component of a run shares, goes in ``system_instruction`` ahead of the per-component message,
so Gemini's implicit prompt caching can reuse it. Cached input is read back from
``usage_metadata.cached_content_token_count`` (part of ``prompt_token_count``) and priced at
the cached rate; thinking tokens (``thoughts_token_count``) are billed as output.

The SDK's own retries are off (one attempt; setting ``retry_options`` also disables its
implicit connection retries): the runner retries, as for the other providers. A 429's
``RetryInfo.retryDelay`` (``"30s"``) or ``Retry-After`` header becomes the run's pause.
"""

from __future__ import annotations

import json
import re
from typing import Any

from spd_host.autointerp.answer import MalformedAnswerError, parse_reply
from spd_host.autointerp.pricing import provider_pricing
from spd_host.autointerp.providers.base import (
    ClientOptions,
    Completion,
    CompletionRequest,
    PermanentError,
    Provider,
    ProviderCallError,
    RateLimitedError,
    TransientError,
    read_api_key,
)
from spd_host.autointerp.providers.sdk_errors import parse_retry_after

PRICING = provider_pricing("gemini")
_DELAY = re.compile(r"^\s*([0-9.]+)s\s*$")


class GeminiClient:
    def __init__(self, provider: Provider, options: ClientOptions) -> None:
        from google import genai
        from google.genai import types

        self._types = types
        self._errors = genai.errors
        self._provider = provider.name
        self._model = options.model
        http = types.HttpOptions(
            base_url=options.base_url or provider.default_base_url,
            timeout=int(options.timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self._client = genai.Client(api_key=read_api_key(provider, options), http_options=http)

    async def complete(self, request: CompletionRequest) -> Completion:
        config = self._types.GenerateContentConfig(
            system_instruction=request.system or None,
            response_mime_type="application/json",
            response_json_schema=dict(request.schema),
            max_output_tokens=request.max_output_tokens,
        )
        try:
            response = await self._client.aio.models.generate_content(
                model=self._model, contents=request.prompt, config=config
            )
        except self._errors.APIError as err:
            raise self._translate(err) from err
        except TimeoutError as err:
            raise TransientError(f"{self._provider}: request timed out") from err
        except Exception as err:  # httpx/aiohttp transport errors: the SDK re-raises them as is
            if _is_timeout(err):
                raise TransientError(f"{self._provider}: request timed out") from err
            if _is_transport(err):
                raise TransientError(f"{self._provider}: connection failed: {err}") from err
            raise
        usage = getattr(response, "usage_metadata", None)
        n_in = int(getattr(usage, "prompt_token_count", 0) or 0)
        n_cached = min(n_in, int(getattr(usage, "cached_content_token_count", 0) or 0))
        n_out = int(getattr(usage, "candidates_token_count", 0) or 0) + int(
            getattr(usage, "thoughts_token_count", 0) or 0
        )
        raw = _raw_json(response)
        candidates = getattr(response, "candidates", None) or []
        if not candidates:
            raise MalformedAnswerError(
                f"{self._provider}: the response has no candidates (blocked prompt?)"
            ).with_response(raw, n_in, n_out)
        finish = str(getattr(candidates[0], "finish_reason", "") or "")
        answer, data = parse_reply(
            response.text or "",
            truncated=finish.endswith("MAX_TOKENS"),
            answer_format=request.answer_format,
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
            cache_read_tokens=n_cached,
        )

    def _translate(self, err: Any) -> ProviderCallError:
        status = int(getattr(err, "code", 0) or 0)
        body = json.dumps(getattr(err, "details", None))[:500]
        text = f"{self._provider}: HTTP {status}: {body}"
        retry_after = _retry_delay(err)
        if status == 429:
            return RateLimitedError(text, retry_after=retry_after, status=status)
        if status >= 500 or status in (408, 409):
            return TransientError(text, retry_after=retry_after, status=status)
        hint = (
            "check the API key in GEMINI_API_KEY"
            if status in (401, 403)
            else "check --model and the Gemini API documentation"
        )
        return PermanentError(text, hint=hint, status=status)

    async def aclose(self) -> None:
        await self._client.aio.aclose()


def _retry_delay(err: Any) -> float | None:
    """Seconds to wait: the ``Retry-After`` header, else ``RetryInfo.retryDelay`` in the body."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        try:
            found = parse_retry_after({k.lower(): v for k, v in dict(headers).items()})
        except Exception:
            found = None
        if found is not None:
            return found
    details = getattr(err, "details", None)
    items = details.get("error", {}).get("details", []) if isinstance(details, dict) else []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            m = _DELAY.match(str(item.get("retryDelay", "")))
            if m:
                return float(m.group(1))
    return None


def _is_timeout(err: Exception) -> bool:
    return "timeout" in type(err).__name__.lower()


def _is_transport(err: Exception) -> bool:
    module = type(err).__module__
    return module.startswith(("httpx", "httpcore", "aiohttp")) or isinstance(err, OSError)


def _raw_json(response: Any) -> str:
    try:
        return str(
            response.model_dump_json(
                exclude_none=True,
                exclude={"sdk_http_response", "automatic_function_calling_history", "parsed"},
            )
        )
    except Exception:
        return json.dumps(str(response))


def make_provider() -> Provider:
    holder: list[Provider] = []
    provider = Provider(
        name="gemini",
        description="Google Gemini API (official google-genai SDK), JSON via response schema",
        make_client=lambda options: GeminiClient(holder[0], options),
        default_model="gemini-2.5-flash",
        api_key_env="GEMINI_API_KEY",
        pricing=PRICING,
    )
    holder.append(provider)
    return provider


PROVIDER = make_provider()
