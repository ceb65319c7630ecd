"""A local HTTP server speaking the Anthropic Messages, OpenAI Chat Completions and Gemini
``generateContent`` wire formats.

Standard library only (``http.server`` in a thread). Each request is answered by the test's
``plan(request) -> Reply`` (default: a valid label after ``latency`` seconds). The server
records every request (arrival time, API, component marker, headers, JSON body) and the peak
number of requests in flight, which is how tests prove concurrency without timing anything.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOL_NAME = "record_component_label"
MARKER = re.compile(r"MARK(\d+)")


@dataclass
class Request:
    api: str  # "anthropic" | "openai" | "gemini"
    body: dict[str, Any]
    headers: dict[str, str]
    arrived: float
    index: int  # arrival order, 0-based
    marker: str | None  # "MARK<n>" found in the prompt (tests put it in the evidence)

    @property
    def system(self) -> str:
        """The system prompt as text, whether sent as a string or as content blocks."""
        if self.api == "openai":
            msgs = self.body.get("messages", [])
            return "\n".join(_text(m.get("content")) for m in msgs if m.get("role") == "system")
        if self.api == "gemini":
            return _text((self.body.get("systemInstruction") or {}).get("parts"))
        return _text(self.body.get("system"))

    @property
    def user(self) -> str:
        if self.api == "gemini":
            return "\n".join(_text(c.get("parts")) for c in self.body.get("contents", []))
        msgs = self.body.get("messages", [])
        return "\n".join(_text(m.get("content")) for m in msgs if m.get("role") == "user")

    @property
    def prompt(self) -> str:
        """Everything the model was shown: system prompt, then the messages."""
        if self.api == "gemini":
            return self.system + "\n" + self.user
        msgs = self.body.get("messages", [])
        parts = [] if self.api == "openai" else [self.system]
        return "\n".join(parts + [_text(m.get("content")) for m in msgs])


def _text(content: Any) -> str:
    """A message's content as text: a string, or the texts of its blocks joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))


@dataclass
class Reply:
    status: int = 200
    answer: dict[str, Any] | str | None = None  # None: a valid label for the marker
    body: bytes | None = None  # raw body, overrides everything
    headers: dict[str, str] = field(default_factory=dict)
    delay: float | None = None  # None: the server's latency
    truncated: bool = False  # finish_reason length / stop_reason max_tokens
    cut_connection: bool = False  # announce a longer body than sent, then close
    output_tokens: int = 40
    input_tokens: int = 100  # every input token, cached ones included
    cache_read_tokens: int = 0  # of input_tokens, read from the prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it (Anthropic only)
    thinking_tokens: int = 0  # of output_tokens, spent thinking (Gemini only)
    error_details: list[dict[str, Any]] = field(default_factory=list)  # Gemini error details
    # OpenAI ``choices[0].logprobs.content`` sent when the request asked for logprobs; None:
    # every token of the answer with logprob 0 (certain); ``no_logprobs``: ignore the request
    logprobs: list[dict[str, Any]] | None = None
    no_logprobs: bool = False


_TOKEN = re.compile(r"\d|\w+|\s+|[^\w\s]")


def _entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
    }


def certain_logprobs(text: str) -> list[dict[str, Any]]:
    """Every token of ``text`` (a toy tokenisation: digits alone) with probability 1."""
    return [_entry(t, 0.0, [(t, 0.0)]) for t in _TOKEN.findall(text)]


def digit_logprobs(text: str, p_one: list[float], noise: str | None = None) -> list[dict[str, Any]]:
    """``text`` tokenised with each digit a token; the k-th ``0``/``1`` digit gets the top
    alternatives ``1`` with probability ``p_one[k]`` and ``0`` with the rest (and, when
    ``noise`` is given, a third alternative ``noise`` of probability 1e-3 taken from both)."""
    out = []
    k = 0
    for t in _TOKEN.findall(text):
        if t in ("0", "1") and k < len(p_one):
            p = p_one[k]
            k += 1
            top = [("1", p), ("0", 1 - p)]
            if noise is not None:
                top = [(tok, q * (1 - 1e-3)) for tok, q in top] + [(noise, 1e-3)]
            top = [(tok, math.log(q) if q > 0 else -9999.0) for tok, q in top]
            chosen = dict(top)[t]
            out.append(_entry(t, chosen, sorted(top, key=lambda x: -x[1])))
        else:
            out.append(_entry(t, 0.0, [(t, 0.0)]))
    return out


def valid_answer(marker: str | None) -> dict[str, Any]:
    return {"label": f"label of {marker}", "confidence": "medium", "reasoning": "test server"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog; the default 5 drops bursts of connections


class LLMServer:
    def __init__(self, *, latency: float = 0.0, plan: Callable[[Request], Reply] | None = None):
        self.latency = latency
        self.plan: Callable[[Request], Reply] = plan or (lambda r: Reply())
        self.requests: list[Request] = []
        self.responses: list[tuple[Request, int, float]] = []  # (request, status, time sent)
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.endswith("/messages"):
                    api = "anthropic"
                elif self.path.endswith("/chat/completions"):
                    api = "openai"
                elif self.path.split("?")[0].endswith(":generateContent"):
                    api = "gemini"
                else:
                    self.send_error(404)
                    return
                server._handle(self, api, body)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> LLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gemini_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def markers(self) -> list[str | None]:
        return [r.marker for r in self.requests]

    # -- one request -------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, api: str, body: dict[str, Any]) -> None:
        with self._lock:
            req = Request(
                api=api,
                body=body,
                headers={k.lower(): v for k, v in h.headers.items()},
                arrived=time.monotonic(),
                index=len(self.requests),
                marker=None,
            )
            m = MARKER.search(req.prompt)
            req.marker = m.group(0) if m else None
            self.requests.append(req)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            reply = self.plan(req)
            delay = self.latency if reply.delay is None else reply.delay
            if delay:
                time.sleep(delay)
            payload = reply.body if reply.body is not None else self._payload(api, req, reply)
            content_type = "application/json" if reply.body is None else "text/html"
            with self._lock:
                self.responses.append((req, reply.status, time.monotonic()))
            try:
                h.send_response(reply.status)
                h.send_header("content-type", content_type)
                for k, v in reply.headers.items():
                    h.send_header(k, v)
                if reply.cut_connection:
                    h.send_header("content-length", str(len(payload) + 500))
                    h.send_header("connection", "close")
                    h.end_headers()
                    h.wfile.write(payload[: len(payload) // 2])
                    h.wfile.flush()
                    h.close_connection = True
                    return
                h.send_header("content-length", str(len(payload)))
                h.end_headers()
                h.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _payload(self, api: str, req: Request, reply: Reply) -> bytes:
        if reply.status >= 400:
            if api == "gemini":
                status = {
                    429: "RESOURCE_EXHAUSTED",
                    401: "UNAUTHENTICATED",
                    400: "INVALID_ARGUMENT",
                }
                doc = {
                    "error": {
                        "code": reply.status,
                        "message": f"status {reply.status}",
                        "status": status.get(reply.status, "INTERNAL"),
                        "details": reply.error_details,
                    }
                }
                return json.dumps(doc).encode()
            if api == "anthropic":
                kind = "rate_limit_error" if reply.status == 429 else "api_error"
                doc: dict[str, Any] = {
                    "type": "error",
                    "error": {"type": kind, "message": f"status {reply.status}"},
                }
            else:
                doc = {
                    "error": {
                        "message": f"status {reply.status}",
                        "type": "server_error",
                        "code": None,
                    }
                }
            return json.dumps(doc).encode()
        answer = reply.answer if reply.answer is not None else valid_answer(req.marker)
        model = req.body.get("model", "m")
        if api == "gemini":
            text = answer if isinstance(answer, str) else json.dumps(answer)
            doc = {
                "candidates": [
                    {
                        "content": {"parts": [{"text": text}], "role": "model"},
                        "finishReason": "MAX_TOKENS" if reply.truncated else "STOP",
                        "index": 0,
                    }
                ],
                # promptTokenCount includes the cached part
                "usageMetadata": {
                    "promptTokenCount": reply.input_tokens,
                    "candidatesTokenCount": reply.output_tokens - reply.thinking_tokens,
                    "thoughtsTokenCount": reply.thinking_tokens,
                    "cachedContentTokenCount": reply.cache_read_tokens,
                    "totalTokenCount": reply.input_tokens + reply.output_tokens,
                },
                "modelVersion": "test",
            }
            return json.dumps(doc).encode()
        if api == "anthropic":
            if isinstance(answer, str):
                content = [{"type": "text", "text": answer}]
            else:
                content = [
                    {"type": "tool_use", "id": "toolu_01", "name": TOOL_NAME, "input": answer}
                ]
            doc = {
                "id": f"msg_{req.index}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": "max_tokens" if reply.truncated else "tool_use",
                "stop_sequence": None,
                # Anthropic's input_tokens excludes what was read from / written to the cache
                "usage": {
                    "input_tokens": reply.input_tokens
                    - reply.cache_read_tokens
                    - reply.cache_write_tokens,
                    "output_tokens": reply.output_tokens,
                    "cache_read_input_tokens": reply.cache_read_tokens,
                    "cache_creation_input_tokens": reply.cache_write_tokens,
                },
            }
        else:
            text = answer if isinstance(answer, str) else json.dumps(answer)
            doc = {
                "id": f"chatcmpl-{req.index}",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if reply.truncated else "stop",
                        "logprobs": None
                        if reply.no_logprobs or not req.body.get("logprobs")
                        else {
                            "content": reply.logprobs
                            if reply.logprobs is not None
                            else certain_logprobs(text),
                            "refusal": None,
                        },
                    }
                ],
                "usage": {
                    "prompt_tokens": reply.input_tokens,
                    "completion_tokens": reply.output_tokens,
                    "total_tokens": reply.input_tokens + reply.output_tokens,
                    # OpenAI's prompt_tokens includes the cached part
                    "prompt_tokens_details": {"cached_tokens": reply.cache_read_tokens},
                },
            }
        return json.dumps(doc).encode()
