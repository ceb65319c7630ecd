"""The loopback server, extended with both providers' batch wire formats.

Anthropic Message Batches (``/v1/messages/batches``: create, retrieve, list, ``/results``
JSONL, ``/cancel``) and the OpenAI Batch API (``/v1/files`` multipart upload and
``/content``, ``/v1/batches``: create, retrieve, list, ``/cancel``), standard library only.
Each request inside a batch is answered by the same ``plan(request) -> Reply`` as the
synchronous endpoints, with the same response bodies, so a batch run and a synchronous run
against one server see the same answers. ``batch_plan(n) -> BatchPlan`` (n: the batch's
creation order, 0-based) sets how long a batch runs, whether it expires part-way, whether its
create call is held open (the window a SIGKILL test aims at) or refused.

Statuses move with time since creation: Anthropic ``in_progress`` -> ``ended``; OpenAI
``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed`` / ``expired`` / ``failed``.
A cancel (``POST .../cancel``) of a running batch moves it to Anthropic ``canceling`` /
OpenAI ``cancelling`` for ``BatchPlan.cancel_delay`` seconds, then ``ended`` / ``cancelled``:
the first ``BatchPlan.done_by_cancel`` requests (by position) had finished and keep their
answers (billed), the others are ``canceled`` (Anthropic: ``{"type": "canceled"}`` result
lines; OpenAI: the finished ones in the output file, the others as ``batch_cancelled`` lines of
the error file for even positions and left out for odd ones, both documented forms). The cancel
response is the batch object, as both APIs return it; a cancel of an ended batch is refused
(Anthropic 409 ``invalid_request_error``, OpenAI 400), the case the client must tolerate.
Every HTTP call is recorded in ``calls`` (method, path), batch creations in ``creates``,
accepted cancels in ``cancels``.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from llm_server import MARKER, LLMServer, Reply, Request


@dataclass
class BatchPlan:
    delay: float = 0.15  # seconds from creation until the batch has ended
    expire_after: int | None = None  # only the first n requests run; the rest expire
    failed: bool = False  # OpenAI: the input file is rejected (status "failed")
    create_status: int = 200  # >= 400: the create call is refused with this status
    create_hold: float = 0.0  # accept the batch, then hold the create response this long
    gone: bool = False  # once ended, the batch is unknown to the server (404): deleted
    done_by_cancel: int = 0  # requests (by position) already finished when a cancel arrives
    cancel_delay: float = 0.1  # seconds in canceling / cancelling before the batch has ended
    cancel_hold: float = 0.0  # accept a cancel, then hold its response this long
    ends_before_cancel: bool = False  # the batch ends (complete) just as a cancel arrives


# batch_plan(n): n counts create calls (refused ones too), 0-based


@dataclass
class _Batch:
    id: str
    api: str
    index: int
    created: float  # monotonic
    created_wall: datetime
    plan: BatchPlan
    items: list[tuple[str, Request, Reply]]
    metadata: dict[str, str] = field(default_factory=dict)
    input_file_id: str = ""
    cancelled_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.created

    @property
    def cut(self) -> bool:
        """Cancelled before it had ended on its own."""
        return self.cancelled_at is not None and self.cancelled_at - self.created < self.plan.delay

    @property
    def canceling(self) -> bool:
        return self.cut and time.monotonic() - (self.cancelled_at or 0.0) < self.plan.cancel_delay

    @property
    def ended(self) -> bool:
        if self.cut:
            return not self.canceling
        return self.elapsed() >= self.plan.delay

    def outcome(self, i: int, reply: Reply) -> str:
        if self.plan.failed:
            return "failed"
        if self.plan.expire_after is not None and i >= self.plan.expire_after:
            return "expired"
        if self.cut and i >= self.plan.done_by_cancel:
            return "canceled"
        return "errored" if reply.status >= 400 else "succeeded"


class BatchServer(LLMServer):
    def __init__(
        self,
        *,
        latency: float = 0.0,
        plan: Callable[[Request], Reply] | None = None,
        batch_plan: Callable[[int], BatchPlan] | None = None,
    ) -> None:
        super().__init__(latency=latency, plan=plan)
        self.batch_plan: Callable[[int], BatchPlan] = batch_plan or (lambda n: BatchPlan())
        self.batches: dict[str, _Batch] = {}
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.creates: list[str] = []  # batch ids in creation order
        self.cancels: list[str] = []  # batch ids whose cancel was accepted, in order
        self.create_calls = 0  # create calls, refused ones included (batch_plan's argument)

    # -- routing ---------------------------------------------------------------------------
    def _post(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        path = h.path.split("?")[0]
        with self._lock:
            self.calls.append(("POST", path))
        if path == "/v1/messages/batches":
            return self._create(h, "anthropic", json.loads(raw))
        if path == "/v1/batches":
            return self._create(h, "openai", json.loads(raw))
        if path == "/v1/files":
            return self._upload(h, raw)
        if path.endswith("/cancel"):
            return self._cancel(h, path.split("/")[-2])
        return super()._post(h, raw)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        with self._lock:
            self.calls.append(("GET", path))
        parts = path.strip("/").split("/")
        if path in ("/v1/messages/batches", "/v1/batches"):
            return self._list(h, "anthropic" if "messages" in path else "openai")
        if path.startswith("/v1/messages/batches/") and path.endswith("/results"):
            return self._results(h, parts[-2])
        if path.startswith("/v1/files/") and path.endswith("/content"):
            data = self.files.get(parts[-2])
            if data is None:
                return self._send(h, 404, {"error": {"message": "no such file"}})
            return self._send_bytes(h, 200, data, "application/octet-stream")
        if path.startswith(("/v1/messages/batches/", "/v1/batches/")):
            batch = self.batches.get(parts[-1])
            if batch is None or (batch.plan.gone and batch.ended):
                return self._send(h, 404, _error(batch_api(path), "no such batch"))
            return self._send(h, 200, self._doc(batch))
        h.send_error(404)

    # -- helpers ---------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, doc: Any) -> None:
        self._send_bytes(h, status, json.dumps(doc).encode(), "application/json")

    def _send_bytes(self, h: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str) -> None:
        try:
            h.send_response(status)
            h.send_header("content-type", ctype)
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed (the SIGKILL test)

    def _upload(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        head = f"Content-Type: {h.headers['content-type']}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + raw)
        fields: dict[str, bytes] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = part.get_payload(decode=True) or b""
        with self._lock:
            fid = f"file-{len(self.files)}"
            self.files[fid] = fields["file"]
        doc = {
            "id": fid, "object": "file", "bytes": len(fields["file"]), "created_at": int(time.time()),
            "filename": "batch.jsonl", "purpose": fields.get("purpose", b"").decode(),
            "status": "processed",
        }  # fmt: skip
        self._send(h, 200, doc)

    def _create(self, h: BaseHTTPRequestHandler, api: str, body: dict[str, Any]) -> None:
        with self._lock:
            plan = self.batch_plan(self.create_calls)
            self.create_calls += 1
            n = len(self.creates)
        if plan.create_status >= 400:
            return self._send(h, plan.create_status, _error(api, f"status {plan.create_status}"))
        if api == "anthropic":
            entries = [(e["custom_id"], e["params"]) for e in body["requests"]]
        else:
            text = self.files[body["input_file_id"]].decode()
            lines = [json.loads(x) for x in text.splitlines() if x.strip()]
            assert all(x["method"] == "POST" and x["url"] == body["endpoint"] for x in lines)
            entries = [(x["custom_id"], x["body"]) for x in lines]
        items = []
        with self._lock:
            for cid, params in entries:
                req = Request(api=api, body=params, headers={}, arrived=time.monotonic(),
                              index=len(self.requests), marker=None)  # fmt: skip
                m = MARKER.search(req.prompt)
                req.marker = m.group(0) if m else None
                self.requests.append(req)
                items.append((cid, req))
        replies = [(cid, req, self.plan(req)) for cid, req in items]
        bid = f"msgbatch_{n:04d}" if api == "anthropic" else f"batch_{n:04d}"
        batch = _Batch(
            id=bid, api=api, index=n, created=time.monotonic(), created_wall=datetime.now(UTC),
            plan=plan, items=replies, metadata=dict(body.get("metadata") or {}),
            input_file_id=str(body.get("input_file_id", "")),
        )  # fmt: skip
        with self._lock:
            self.batches[bid] = batch
            self.creates.append(bid)
        if plan.create_hold:
            time.sleep(plan.create_hold)
        self._send(h, 200, self._doc(batch))

    def _cancel(self, h: BaseHTTPRequestHandler, bid: str) -> None:
        api = "anthropic" if bid.startswith("msgbatch_") else "openai"
        batch = self.batches.get(bid)
        if batch is None or (batch.plan.gone and batch.ended):
            return self._send(h, 404, _error(api, "no such batch"))
        if batch.plan.ends_before_cancel and not batch.ended:  # the race: ended, then refused
            batch.plan = replace(batch.plan, delay=batch.elapsed())
        if batch.ended:
            status = 409 if api == "anthropic" else 400
            return self._send(h, status, _refusal(api, f"batch {bid} has ended; cannot cancel"))
        with self._lock:
            if batch.cancelled_at is None:
                batch.cancelled_at = time.monotonic()
            self.cancels.append(bid)
        if batch.plan.cancel_hold:
            time.sleep(batch.plan.cancel_hold)
        self._send(h, 200, self._doc(batch))

    def _list(self, h: BaseHTTPRequestHandler, api: str) -> None:
        docs = [self._doc(b) for b in reversed(list(self.batches.values())) if b.api == api]
        if api == "anthropic":
            doc = {"data": docs, "has_more": False,
                   "first_id": docs[0]["id"] if docs else None,
                   "last_id": docs[-1]["id"] if docs else None}  # fmt: skip
        else:
            doc = {"object": "list", "data": docs, "has_more": False,
                   "first_id": docs[0]["id"] if docs else None,
                   "last_id": docs[-1]["id"] if docs else None}  # fmt: skip
        self._send(h, 200, doc)

    # -- documents -------------------------------------------------------------------------
    def _doc(self, b: _Batch) -> dict[str, Any]:
        outcomes = [b.outcome(i, r) for i, (_, _, r) in enumerate(b.items)]
        return (
            self._anthropic_doc(b, outcomes)
            if b.api == "anthropic"
            else self._openai_doc(b, outcomes)
        )

    def _anthropic_doc(self, b: _Batch, outcomes: list[str]) -> dict[str, Any]:
        ended = b.ended
        counts = {k: 0 for k in ("processing", "succeeded", "errored", "canceled", "expired")}
        if ended:
            for o in outcomes:
                counts[o] += 1
        else:
            counts["processing"] = len(outcomes)
        created = b.created_wall
        return {
            "id": b.id, "type": "message_batch",
            "processing_status": "ended" if ended else "canceling" if b.cut else "in_progress",
            "request_counts": counts,
            "created_at": created.isoformat(), "expires_at": (created + timedelta(hours=24)).isoformat(),
            "ended_at": datetime.now(UTC).isoformat() if ended else None,
            "cancel_initiated_at": None if b.cancelled_at is None else created.isoformat(),
            "archived_at": None,
            "results_url": f"{self.anthropic_url}/v1/messages/batches/{b.id}/results" if ended else None,
        }  # fmt: skip

    def _results(self, h: BaseHTTPRequestHandler, bid: str) -> None:
        b = self.batches[bid]
        lines = []
        for i, (cid, req, reply) in enumerate(b.items):
            o = b.outcome(i, reply)
            if o == "succeeded":
                result: dict[str, Any] = {
                    "type": "succeeded",
                    "message": json.loads(self._payload("anthropic", req, reply)),
                }
            elif o == "errored":
                result = {"type": "errored", "error": _error("anthropic", f"status {reply.status}")}
            else:
                result = {"type": o}
            lines.append(json.dumps({"custom_id": cid, "result": result}))
        self._send_bytes(h, 200, ("\n".join(lines) + "\n").encode(), "application/binary")

    def _openai_doc(self, b: _Batch, outcomes: list[str]) -> dict[str, Any]:
        t, d = b.elapsed(), b.plan.delay
        created = int(b.created_wall.timestamp())
        if b.cut:
            status = "cancelling" if b.canceling else "cancelled"
        elif not b.ended:
            status = (
                "validating" if t < 0.25 * d else "in_progress" if t < 0.75 * d else "finalizing"
            )
        elif b.plan.failed:
            status = "failed"
        elif b.plan.expire_after is not None:
            status = "expired"
        else:
            status = "completed"
        final = status in ("completed", "expired", "cancelled", "failed")
        if final and status != "failed" and b.output_file_id is None:
            self._write_openai_files(b, outcomes)
        n_ok = sum(o == "succeeded" for o in outcomes) if final else 0
        n_bad = sum(o == "errored" for o in outcomes) if final else 0
        cut_at = None
        if b.cancelled_at is not None:
            cut_at = created + int(b.cancelled_at - b.created)
        return {
            "cancelling_at": cut_at, "cancelled_at": cut_at if status == "cancelled" else None,
            "id": b.id, "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
            "created_at": created, "expires_at": created + 86400,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "request_counts": {"total": len(outcomes), "completed": n_ok, "failed": n_bad},
            "metadata": b.metadata or None,
            "errors": {"object": "list", "data": [{"code": "invalid_request", "message": "bad file", "line": 1}]}
            if status == "failed" else None,
        }  # fmt: skip

    def _write_openai_files(self, b: _Batch, outcomes: list[str]) -> None:
        out, err = [], []
        for i, ((cid, req, reply), o) in enumerate(zip(b.items, outcomes, strict=True)):
            rid = f"batch_req_{b.index}_{i}"
            if o == "succeeded":
                body = json.loads(self._payload("openai", req, reply))
                out.append({"id": rid, "custom_id": cid, "error": None,
                            "response": {"status_code": 200, "request_id": rid, "body": body}})  # fmt: skip
            elif o == "errored":
                body = json.loads(self._payload("openai", req, reply))
                err.append({"id": rid, "custom_id": cid, "error": None,
                            "response": {"status_code": reply.status, "request_id": rid, "body": body}})  # fmt: skip
            elif o == "expired" and i % 2 == 0:
                # the documented error line; odd ones are left out (reported by omission)
                err.append({"id": rid, "custom_id": cid, "response": None,
                            "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})  # fmt: skip
            elif o == "canceled" and i % 2 == 0:
                err.append({"id": rid, "custom_id": cid, "response": None,
                            "error": {"code": "batch_cancelled", "message": "This request was not executed because the batch was cancelled."}})  # fmt: skip
        with self._lock:
            if out:
                b.output_file_id = f"file-out-{b.index}"
                self.files[b.output_file_id] = "".join(json.dumps(x) + "\n" for x in out).encode()
            if err:
                b.error_file_id = f"file-err-{b.index}"
                self.files[b.error_file_id] = "".join(json.dumps(x) + "\n" for x in err).encode()


def batch_api(path: str) -> str:
    return "anthropic" if "/messages/" in path else "openai"


def _refusal(api: str, message: str) -> dict[str, Any]:
    """A 4xx refusal body of a request that is valid but not allowed now."""
    if api == "anthropic":
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


def _error(api: str, message: str) -> dict[str, Any]:
    if api == "anthropic":
        return {"type": "error", "error": {"type": "api_error", "message": message}}
    return {"error": {"message": message, "type": "server_error", "code": None}}


class BatchRunInterrupted(BaseException):
    """What Ctrl-C does to a run waiting on its batch, at a moment the test chooses (a
    ``BaseException``, as ``KeyboardInterrupt`` is)."""


def interrupt_once_submitted(run: Callable[[], Any], db: Path) -> None:
    """Run ``run`` and interrupt it (``BatchRunInterrupted``, from a 50 ms SIGALRM poll) once a
    batch in ``db``'s ``batches`` table is ``submitted``: left open at the provider."""

    def submitted() -> bool:
        if not db.exists():
            return False
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                rows = conn.execute("SELECT state FROM batches").fetchall()
        except sqlite3.OperationalError:
            return False
        return any(state == "submitted" for (state,) in rows)

    def handler(signum: int, frame: Any) -> None:
        if submitted():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise BatchRunInterrupted

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        try:
            run()
        except BatchRunInterrupted:
            return
        raise AssertionError("the run ended before its batch was submitted")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
