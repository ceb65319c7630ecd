"""The JSON answer every strategy asks for, and its strict parser.

One schema for all providers: Anthropic receives it as a tool's ``input_schema`` (forced tool
use), OpenAI-compatible endpoints as a ``json_schema`` response format. The parser is strict on
purpose: a truncated, non-JSON or off-schema answer raises :class:`MalformedAnswerError` and is
retried or recorded as a failure, never stored as a label.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_host.errors import SpdHostError


class MalformedAnswerError(SpdHostError):
    """The LLM answered, but not with a JSON object matching the label schema.

    Clients attach what the server sent (``raw``) and the tokens it billed, so the failure is
    recorded with its evidence and its cost counts against the cap.
    """

    raw: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    def with_response(
        self, raw: str, input_tokens: int, output_tokens: int
    ) -> MalformedAnswerError:
        self.raw = raw
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        return self


class LabelAnswer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(min_length=1, max_length=200)
    confidence: Literal["low", "medium", "high"]
    reasoning: str


ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "description": "short label for what the component does"},
        "confidence": {
            "type": "string",
            "enum": ["low", "medium", "high"],
            "description": "high: specific pattern backed by all evidence; low: speculative",
        },
        "reasoning": {"type": "string", "description": "1-3 sentences citing the evidence"},
    },
    "required": ["label", "confidence", "reasoning"],
    "additionalProperties": False,
}


def parse_answer(payload: str | dict[str, Any], *, truncated: bool = False) -> LabelAnswer:
    """Validate an answer (a JSON string or an already-decoded object)."""
    if truncated:
        raise MalformedAnswerError(
            "the answer was cut off at the output-token limit",
            hint="raise --max-output-tokens",
        )
    obj: Any = payload
    if isinstance(payload, str):
        text = _strip_fences(payload)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise MalformedAnswerError(
                f"the answer is not JSON ({err.msg} at char {err.pos}): {payload[:120]!r}"
            ) from None
    if not isinstance(obj, dict):
        raise MalformedAnswerError(f"the answer is JSON but not an object: {str(obj)[:120]!r}")
    # strip before validating: a blank or whitespace label is a malformed answer (a failure
    # row, retried), never a label of "" and never a crash after validation
    obj = {
        k: v.strip() if isinstance(v, str) and k in ("label", "reasoning") else v
        for k, v in obj.items()
    }
    try:
        answer = LabelAnswer.model_validate(obj)
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise MalformedAnswerError(
            f"the answer does not match the label schema ({fields})"
        ) from None
    return answer


def _strip_fences(text: str) -> str:
    """Accept an answer wrapped in a Markdown code fence (common for JSON-mode-less endpoints)."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip()


#: the ``LabelAnswer`` placed in a completion whose request asked for any JSON object
#: (``answer_format="object"``): the answer itself is in ``Completion.data``
OBJECT_ANSWER = LabelAnswer(
    label="(a JSON object: see Completion.data)", confidence="low", reasoning=""
)


def parse_object(payload: str | dict[str, Any], *, truncated: bool = False) -> dict[str, Any]:
    """Any JSON object (a string or already decoded), strictly: truncated, non-JSON or
    non-object answers raise :class:`MalformedAnswerError`; the caller validates its fields."""
    if truncated:
        raise MalformedAnswerError(
            "the answer was cut off at the output-token limit",
            hint="raise --max-output-tokens",
        )
    obj: Any = payload
    if isinstance(payload, str):
        try:
            obj = json.loads(_strip_fences(payload))
        except json.JSONDecodeError as err:
            raise MalformedAnswerError(
                f"the answer is not JSON ({err.msg} at char {err.pos}): {payload[:120]!r}"
            ) from None
    if not isinstance(obj, dict):
        raise MalformedAnswerError(f"the answer is JSON but not an object: {str(obj)[:120]!r}")
    return obj


def parse_reply(
    payload: str | dict[str, Any],
    *,
    truncated: bool,
    answer_format: str,
    raw: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
) -> tuple[LabelAnswer, dict[str, Any] | None]:
    """What a client returns for a request of ``answer_format``: ``(label answer, None)`` for
    the label schema, ``(OBJECT_ANSWER, the decoded object)`` for ``"object"``.

    With ``raw``, a ``MalformedAnswerError`` carries the raw response and its billed usage
    (``with_response``), so a malformed answer is still paid for and shown."""
    try:
        if answer_format == "object":
            return OBJECT_ANSWER, parse_object(payload, truncated=truncated)
        return parse_answer(payload, truncated=truncated), None
    except MalformedAnswerError as err:
        if raw is None:
            raise
        raise err.with_response(raw, input_tokens, output_tokens) from None
