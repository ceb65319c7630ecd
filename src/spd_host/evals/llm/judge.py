"""Asking a judge (an LLM through the autointerp providers, or the offline baseline) about trials.

The calls go through the autointerp provider registry and its limits (concurrency, requests
per minute, shared Retry-After pause, retries with backoff, a hard cost cap with in-flight
reservations). The judge answers in the providers' label schema: the example number(s) in
``label`` (``"3"``, ``"1, 4"`` or ``"none"``), its reasoning in ``reasoning``. A trial whose
calls all fail is recorded as *failed*, with the error, and never scored.

With the ``offline`` provider no call is made: a deterministic baseline judge answers from
token overlap and the component's top tokens, and every result says it is a baseline.

Detection and fuzzing can also be asked in delphi's form (:class:`PromptStyle`
``form="binary"``): one 0/1 per example as a list in ``label`` (examples numbered from 0, as
delphi numbers them, marks grouped into one ``<<span>>`` per run of marked tokens), with the
judge's ``P(1)`` per example read from the provider's log-probabilities when asked and given
(:mod:`spd_host.evals.llm.binary`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from spd_host.autointerp.answer import ANSWER_SCHEMA, MalformedAnswerError
from spd_host.autointerp.calls import Outcome
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.ledger import SpendLedger
from spd_host.autointerp.providers.base import Completion, CompletionRequest
from spd_host.autointerp.registry import get_provider
from spd_host.evals.llm.binary import p_one, parse_binary
from spd_host.evals.llm.requests import Calls, arun_requests, scope_of
from spd_host.evals.llm.trials import Shown, Trial

SYSTEM = (
    "You are a careful judge in an interpretability experiment. You read short text excerpts "
    "and answer exactly the question asked. Put ONLY the example number(s) in the 'label' "
    "field, comma-separated (or 'none'), and your brief reasoning in 'reasoning'."
)

QUESTIONS = {
    "intruder": (
        "All but one of these examples come from the same neural-network component; tokens "
        "where a component fires are marked <<like this>>. One example is an intruder from a "
        "different component. Which example is the intruder? Answer with one number."
    ),
    "detection": (
        'A component has been described as: "{label}". Which of these examples make it fire '
        "(anywhere in the example)? Answer with every such number, or 'none'."
    ),
    "fuzzing": (
        'A component has been described as: "{label}". In each example some tokens are marked '
        "<<like this>>. In which examples are the marked tokens exactly where such a component "
        "would fire? Answer with every such number, or 'none'."
    ),
}

SYSTEM_BINARY = (
    "You are a careful judge in an interpretability experiment. You read short text excerpts "
    "and decide, for each example in turn, 1 (yes) or 0 (no). Put ONLY a list with one 0 or 1 "
    "per example, in the order shown, in the 'label' field, e.g. [1, 0, 1], and your brief "
    "reasoning in 'reasoning'."
)

QUESTIONS_BINARY = {
    "detection": (
        'A component has been described as: "{label}". For each example, would this '
        "component fire somewhere in it? Answer 1 if it would, 0 if not."
    ),
    "fuzzing": (
        'A component has been described as: "{label}". In each example some tokens are marked '
        "<<like this>>. For each example, are all the marked tokens ones where such a "
        "component fires? Answer 1 if every mark is right, 0 if any is wrong."
    ),
}


@dataclass(frozen=True)
class PromptStyle:
    """How a trial is asked: today's multi-select question (``select``) or delphi's one 0/1
    per example (``binary``); ``top_logprobs``: ask the provider for that many alternatives
    per generated token (binary form only, for ``P(1)``)."""

    form: Literal["select", "binary"] = "select"
    top_logprobs: int | None = None

    @property
    def binary(self) -> bool:
        return self.form == "binary"


def render(shown: Shown, decode: Callable[[list[int]], str], *, group: bool = False) -> str:
    """The example's text with marked tokens in ``<<...>>``: each token alone, or (``group``,
    delphi's ``_highlight``) one span per run of consecutive marked tokens."""
    parts = []
    prev = False
    for tok, mark in zip(shown.tokens, shown.marks, strict=True):
        text = decode([tok])
        if not group:
            parts.append(f"<<{text}>>" if mark else text)
            continue
        if mark and not prev:
            parts.append("<<")
        if prev and not mark:
            parts.append(">>")
        parts.append(text)
        prev = mark
    if group and prev:
        parts.append(">>")
    return "".join(parts).replace("\n", "\\n")


def prompt_for(
    trial: Trial, decode: Callable[[list[int]], str], style: PromptStyle | None = None
) -> str:
    binary = style is not None and style.binary
    question = (QUESTIONS_BINARY if binary else QUESTIONS)[trial.kind]
    lines = [f"Trial {trial.trial_id}", question.format(label=trial.label or ""), ""]
    for i, item in enumerate(trial.items, 0 if binary else 1):
        lines.append(f"Example {i}: {render(item, decode, group=binary)}")
    return "\n".join(lines)


_NUM = re.compile(r"\d+")


def parse_indices(text: str, n_items: int, kind: str | None = None) -> frozenset[int]:
    """Example numbers in the judge's answer; malformed if none (and not 'none') or out of range.

    An intruder trial has exactly one intruder, so there the answer must be exactly one number:
    "none" or several numbers is a malformed answer (retried, then a failed trial), never a
    score of 0.
    """
    t = text.strip().lower()
    nums = [int(x) for x in _NUM.findall(t)]
    if kind == "intruder" and len(set(nums)) != 1:
        raise MalformedAnswerError(
            f"an intruder answer must name exactly one example, got {text[:80]!r}"
        )
    if not nums:
        if t in ("none", "no", "[]"):
            return frozenset()
        raise MalformedAnswerError(f"the judge's answer has no example number: {text[:80]!r}")
    bad = [n for n in nums if not 1 <= n <= n_items]
    if bad:
        raise MalformedAnswerError(f"the judge named example(s) {bad} of {n_items}")
    return frozenset(nums)


def trial_score(kind: str, truth: frozenset[int], predicted: frozenset[int], n_items: int) -> float:
    """Intruder: 1 if the single named example is the intruder. Detection/fuzzing: balanced
    accuracy (mean of true-positive and true-negative rates) over the items."""
    if kind == "intruder":
        return 1.0 if predicted == truth else 0.0
    negatives = set(range(1, n_items + 1)) - truth
    tpr = len(predicted & truth) / len(truth) if truth else None
    tnr = len(negatives - predicted) / len(negatives) if negatives else None
    rates = [r for r in (tpr, tnr) if r is not None]
    return sum(rates) / len(rates)


class TrialRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trial_id: str
    component_key: str
    status: Literal["ok", "failed"]
    truth: list[int]
    predicted: list[int] | None = None
    score: float | None = None
    error: str | None = None
    cost_usd: float = 0.0
    attempts: int = 0
    n_items: int | None = None  # examples shown (so the negatives' outcomes can be counted)
    probabilities: list[float] | None = None  # the judge's P(1) per item, from logprobs


def baseline_answer(trial: Trial, top_tokens: set[int]) -> frozenset[int]:
    """The deterministic offline judge (not an LLM).

    intruder: the example sharing the fewest distinct tokens with the others; detection: the
    examples containing one of the component's top input tokens; fuzzing: the examples whose
    marked tokens are mostly top input tokens.
    """
    if trial.kind == "intruder":
        sets = [set(s.tokens) for s in trial.items]

        def overlap(i: int) -> float:
            others = set().union(*(sets[j] for j in range(len(sets)) if j != i))
            return len(sets[i] & others) / max(1, len(sets[i]))

        return frozenset({min(range(len(sets)), key=lambda i: (overlap(i), i)) + 1})
    if trial.kind == "detection":
        return frozenset(i for i, s in enumerate(trial.items, 1) if top_tokens & set(s.tokens))
    out = set()
    for i, s in enumerate(trial.items, 1):
        marked = [t for t, m in zip(s.tokens, s.marks, strict=True) if m]
        if marked and sum(t in top_tokens for t in marked) * 2 >= len(marked):
            out.add(i)
    return frozenset(out)


async def _ajudge(
    trials: Sequence[Trial],
    config: AutointerpConfig,
    decode: Callable[[list[int]], str],
    evidence_for: Callable[[str], ComponentEvidence],
    on_record: Callable[[TrialRecord], None],
    ledger: SpendLedger | None = None,
    style: PromptStyle | None = None,
    batch_scope: str = "",
) -> tuple[float, bool]:
    """Judge ``trials`` with a network provider; returns (spent USD, stopped by the cost cap).

    Through the shared request loop (:func:`spd_host.evals.llm.requests.arun_requests`): the
    same gates as autointerp's (worst-case reservation against the ledger's recorded spend,
    Retry-After ceiling, fail fast on 400/401/403/404), or with ``config.batch`` the
    provider's batch API (:mod:`spd_host.autointerp.batch`), resumable by ``batch_scope``.
    """
    judge_style = style or PromptStyle()
    calls: Calls[Trial] = Calls(
        item_id=lambda t: t.trial_id,
        make_request=lambda t: _request_for(t, config, decode, evidence_for, judge_style),
        accept=lambda t, c: _accept(c, len(t.items), t.kind, judge_style),
        on_outcome=lambda t, out: _record_outcome(t, out, on_record),
    )
    return await arun_requests(
        trials, config, calls, ledger, scope_of("judge", config, batch_scope)
    )


def _request_for(
    trial: Trial,
    config: AutointerpConfig,
    decode: Callable[[list[int]], str],
    evidence_for: Callable[[str], ComponentEvidence],
    style: PromptStyle,
) -> CompletionRequest:
    """One trial's judge request: the same bytes on the sync and the batch path."""
    return CompletionRequest(
        system=SYSTEM_BINARY if style.binary else SYSTEM,
        prompt=prompt_for(trial, decode, style),
        schema=ANSWER_SCHEMA,
        max_output_tokens=config.max_output_tokens,
        evidence=evidence_for(trial.key),
        top_logprobs=style.top_logprobs if style.binary else None,
    )


def _accept(
    c: Completion, n: int, kind: str, style: PromptStyle
) -> tuple[frozenset[int], list[float] | None]:
    """The judge's picks (and, in the binary form, P(1) per item) from one answer."""
    if style.binary:
        return parse_binary(c.answer.label, n), p_one(c.logprobs, n)
    return parse_indices(c.answer.label, n, kind), None


def _record_outcome(trial: Trial, out: Outcome, on_record: Callable[[TrialRecord], None]) -> None:
    """A trial's record from its calls' outcome (the same for the sync and batch paths)."""
    if not out.sent:
        return  # never sent: neither scored nor failed; a re-run picks it up
    n = len(trial.items)
    if out.ok:
        predicted, probabilities = out.value
        on_record(
            TrialRecord(
                trial_id=trial.trial_id,
                component_key=trial.key,
                status="ok",
                truth=sorted(trial.truth),
                predicted=sorted(predicted),
                score=trial_score(trial.kind, trial.truth, predicted, n),
                cost_usd=out.cost,
                attempts=out.attempts,
                n_items=n,
                probabilities=probabilities,
            )
        )
        return
    on_record(
        TrialRecord(
            trial_id=trial.trial_id,
            component_key=trial.key,
            status="failed",
            truth=sorted(trial.truth),
            error=out.error or "no attempt completed",
            cost_usd=out.cost,
            attempts=out.attempts,
            n_items=n,
        )
    )


def judge_trials(
    trials: Sequence[Trial],
    config: AutointerpConfig,
    *,
    decode: Callable[[list[int]], str],
    evidence_for: Callable[[str], ComponentEvidence],
    top_tokens: Callable[[str], set[int]],
    on_record: Callable[[TrialRecord], None],
    ledger: SpendLedger | None = None,
    style: PromptStyle | None = None,
    batch_scope: str = "",
) -> tuple[float, bool, bool, str]:
    """Judge every trial; returns (spent USD, stopped by cap, baseline?, judge name)."""
    provider = get_provider(config.provider)
    model = config.model or provider.default_model
    if provider.baseline:
        for t in trials:
            predicted = baseline_answer(t, top_tokens(t.key))
            on_record(
                TrialRecord(
                    trial_id=t.trial_id,
                    component_key=t.key,
                    status="ok",
                    truth=sorted(t.truth),
                    predicted=sorted(predicted),
                    score=trial_score(t.kind, t.truth, predicted, len(t.items)),
                    n_items=len(t.items),
                )
            )
        return 0.0, False, True, f"{provider.name}/baseline-judge"
    from spd_host.evals.progress import progress_bar

    with progress_bar(f"judging with {provider.name}/{model}", total=len(trials)) as advance:

        def record(rec: TrialRecord) -> None:
            on_record(rec)
            advance()

        spent, capped = asyncio.run(
            _ajudge(trials, config, decode, evidence_for, record, ledger, style, batch_scope)
        )
    return spent, capped, False, f"{provider.name}/{model}"
