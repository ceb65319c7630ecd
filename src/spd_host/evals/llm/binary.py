"""delphi's prompt form: one 0/1 decision per example, and ``P(1)`` from log-probabilities.

delphi shows a judge a handful of examples (``n_examples_shown``) and asks for a list such as
``[1, 0, 0, 1, 1]``; its parser takes the first ``[...]`` in the answer, reads it as JSON and
requires exactly one entry per example shown (``Classifier._parse``). With log-probabilities it
reads, for every generated token containing ``1`` or ``0``, the summed probability of the
alternatives containing ``0`` and (else) ``1`` among the top ones, and takes
``P(1) / (P(0) + P(1))`` (0 when neither appears); one such token per example is required
(``Classifier._parse_logprobs``).

Here the list travels in the label schema's ``label`` field, so the token search is limited to
the list inside it (digits in the reasoning are not decisions). Stricter than delphi: entries
must be 0, 1, true or false (delphi takes any truthy value as 1), and a wrong length or any
other entry is a malformed answer (retried, then a failed trial, never a score).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.providers.base import TokenLogprob

_LIST = re.compile(r"\[.*?\]")
_LABEL_KEY = re.compile(r'"label"\s*:\s*"')


def parse_binary(text: str, n_items: int) -> frozenset[int]:
    """The 1-based numbers of the examples the judge marked 1; malformed unless the first
    ``[...]`` in ``text`` is a JSON list of exactly ``n_items`` entries, each 0/1/true/false."""
    match = _LIST.search(text)
    if match is None:
        raise MalformedAnswerError(f"the judge's answer has no [0/1 list]: {text[:80]!r}")
    try:
        values = json.loads(match.group(0))
    except json.JSONDecodeError:
        raise MalformedAnswerError(
            f"the judge's list is not JSON: {match.group(0)[:80]!r}"
        ) from None
    if not isinstance(values, list) or len(values) != n_items:
        raise MalformedAnswerError(
            f"the judge's list has {len(values)} entries for {n_items} examples: "
            f"{match.group(0)[:80]!r}"
        )
    if any(v not in (0, 1) or isinstance(v, float) for v in values):
        raise MalformedAnswerError(
            f"the judge's list holds something other than 0/1: {match.group(0)[:80]!r}"
        )
    return frozenset(i for i, v in enumerate(values, 1) if v)


def p_one(logprobs: Sequence[TokenLogprob] | None, n_items: int) -> list[float] | None:
    """Per example, ``P(1) / (P(0) + P(1))`` over the top alternatives of the answer token
    that carries its decision; None where there are no log-probabilities or the decision
    tokens in the answer's list are not exactly ``n_items``."""
    if not logprobs:
        return None
    text = "".join(t.token for t in logprobs)
    key = _LABEL_KEY.search(text)
    span = _LIST.search(text, key.end() if key else 0)
    if span is None:
        return None
    out: list[float] = []
    pos = 0
    for tok in logprobs:
        start, pos = pos, pos + len(tok.token)
        if pos <= span.start() or start >= span.end():
            continue
        if "1" not in tok.token and "0" not in tok.token:
            continue
        p0 = p1 = 0.0
        for alt, lp in tok.top:
            if "0" in alt:
                p0 += math.exp(lp)
            elif "1" in alt:
                p1 += math.exp(lp)
        out.append(p1 / (p0 + p1) if p0 + p1 > 0 else 0.0)
    return out if len(out) == n_items else None
