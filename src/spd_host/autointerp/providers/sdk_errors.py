"""Map the official SDKs' exceptions onto the provider taxonomy (shared by both SDKs, whose
exception classes have the same shape: ``APIStatusError`` with ``status_code`` and
``response.headers``, ``APITimeoutError``, ``APIConnectionError``)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any

from spd_host.autointerp.providers.base import (
    PermanentError,
    ProviderCallError,
    RateLimitedError,
    TransientError,
)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is None:
            return None
        return max(0.0, float(email.utils.mktime_tz(parsed) - time.time()))


def translate(err: Exception, sdk: Any, provider: str) -> ProviderCallError | None:
    """The taxonomy error for an SDK exception, or None when ``err`` is not from the SDK."""
    if isinstance(err, sdk.APITimeoutError):
        return TransientError(f"{provider}: request timed out")
    if isinstance(err, sdk.APIStatusError):
        status = int(err.status_code)
        headers = getattr(getattr(err, "response", None), "headers", None)
        retry_after = parse_retry_after(headers)
        text = f"{provider}: HTTP {status}: {_body(err)}"
        if status in (429, 529):
            return RateLimitedError(text, retry_after=retry_after, status=status)
        if status >= 500 or status in (408, 409):
            return TransientError(text, retry_after=retry_after, status=status)
        return PermanentError(text, hint=_hint_for(status), status=status)
    if isinstance(err, sdk.APIConnectionError):
        return TransientError(f"{provider}: connection failed: {_brief(err)}")
    if isinstance(err, sdk.APIError):  # e.g. a body that is not JSON
        return TransientError(f"{provider}: bad response: {_brief(err)}")
    return None


def _body(err: Exception) -> str:
    """The server's error body as sent (what it said is the diagnosis), else the SDK's text."""
    response = getattr(err, "response", None)
    try:
        text = str(response.text).strip() if response is not None else ""
    except Exception:  # a streamed or closed response
        text = ""
    return " ".join(text.split())[:500] if text else _brief(err)


def _brief(err: Exception) -> str:
    cause = err.__cause__
    text = str(err) or type(err).__name__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text[:300]


def _hint_for(status: int) -> str:
    if status in (401, 403):
        return "check the API key in the provider's environment variable"
    if status == 404:
        return "check --model and --base-url"
    return "the request was rejected; check --model and the provider's documentation"
