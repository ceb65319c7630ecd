"""Reading numbers off a judge's token log-probabilities (OpenAI-compatible ``top_logprobs``).

A judge that writes an integer answer (an activation 0-10, a 0/1 decision) also says, through
the log-probabilities of that token's alternatives, how sure it was. :func:`value_distribution`
turns one generated token's alternatives into a distribution over the integers in a range
(renormalised over those alternatives, as the OpenAI neuron simulator and delphi do);
:func:`expected_value` is its mean. :func:`values_at` finds, for each number in the answer
text, the generated token that wrote it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from spd_host.autointerp.providers.base import TokenLogprob

_LEADING_INT = re.compile(r"\s*(\d+)")


def value_distribution(
    alternatives: Sequence[tuple[str, float]], lo: int, hi: int, prefix: str = ""
) -> dict[int, float]:
    """``{value: probability}`` over the alternatives that read as an integer in ``[lo, hi]``.

    ``prefix`` is the part of the generated token before the number (a token such as ``":3"``
    carries it): an alternative counts only if it starts with the same prefix. Probabilities
    of alternatives naming the same value add up; the result sums to 1 (empty if none fits).
    """
    mass: dict[int, float] = {}
    for text, logprob in alternatives:
        if not text.startswith(prefix):
            continue
        m = _LEADING_INT.match(text[len(prefix) :])
        if m is None:
            continue
        v = int(m.group(1))
        if lo <= v <= hi:
            mass[v] = mass.get(v, 0.0) + math.exp(logprob)
    total = math.fsum(mass.values())
    return {v: p / total for v, p in sorted(mass.items())} if total > 0 else {}


def expected_value(distribution: dict[int, float]) -> float | None:
    return math.fsum(v * p for v, p in distribution.items()) if distribution else None


def token_offsets(tokens: Sequence[TokenLogprob], content: str) -> list[int] | None:
    """Character offset of each generated token in ``content``; ``None`` if the tokens do not
    spell ``content`` (then nothing can be aligned)."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    if "".join(t.token for t in tokens) != content:
        return None
    return offsets


def values_at(
    tokens: Sequence[TokenLogprob], content: str, spans: Sequence[tuple[int, int]], lo: int, hi: int
) -> list[float | None]:
    """The expected value at each number of the answer (``spans``: its character ranges).

    A number is read from the token whose text starts it; ``None`` where the tokens do not
    spell the content, the number spans several tokens, or no alternative is in range.
    """
    offsets = token_offsets(tokens, content)
    if offsets is None:
        return [None] * len(spans)
    out: list[float | None] = []
    j = 0
    for start, end in spans:
        while j + 1 < len(offsets) and offsets[j + 1] <= start:
            j += 1
        tok_start, tok = offsets[j], tokens[j]
        tok_end = tok_start + len(tok.token)
        if not tok_start <= start < tok_end or end > tok_end:
            out.append(None)
            continue
        prefix = content[tok_start:start]
        alternatives = tok.top or ((tok.token, tok.logprob),)
        out.append(expected_value(value_distribution(alternatives, lo, hi, prefix)))
    return out
