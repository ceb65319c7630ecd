"""Shared pieces of the built-in prompts: rates, token lists and delimited examples.

Firing tokens are wrapped in ``<<`` ``>>``; a run of consecutive firing tokens shares one pair
so multi-token words stay readable. Token strings are shown with ``repr`` in lists (so spaces
and newlines are visible) and raw inside examples (so the text reads naturally), with newlines
rendered as ``⏎``.
"""

from __future__ import annotations

from collections.abc import Callable

from spd_host.autointerp.evidence import ActivationExample, ComponentEvidence, TokenValue

OPEN, CLOSE = "<<", ">>"


def rate_text(density: float) -> str:
    if density <= 0:
        return "0% (never fired in the harvest)"
    return f"{density * 100:.3g}% of tokens (about 1 in {max(1, round(1 / density)):,})"


def density_note(density: float) -> str:
    """Why density matters for reading the evidence (same thresholds for every method)."""
    if density > 0.2:
        return (
            "This component fires on a large share of tokens, so token statistics are diluted; "
            "prefer patterns visible across examples."
        )
    if 0 < density < 0.0005:
        return "This component fires rarely, so a handful of examples may be all the evidence."
    return ""


def context_lines(ev: ComponentEvidence) -> list[str]:
    lines = []
    if ev.model_name:
        lines.append(f"- Model: {ev.model_name}")
    if ev.dataset:
        lines.append(f"- Text the statistics were gathered on: {ev.dataset}")
    where = ev.location_description or ev.location
    lines.append(f"- Location: {where} (site `{ev.site}`, reads `{ev.location}`)")
    lines.append(f"- Firing rate: {rate_text(ev.firing_density)}")
    return lines


def token_list(title: str, values: tuple[TokenValue, ...], n: int, *, percent: bool) -> str:
    if not values or n == 0:
        return ""
    rows = [f"**{title}**"]
    for tv in values[:n]:
        shown = f"{tv.value * 100:.0f}%" if percent else f"{tv.value:.2f}"
        rows.append(f"- {tv.token!r}: {shown}")
    return "\n".join(rows) + "\n"


def _show(token: str) -> str:
    return token.replace("\n", "⏎")


def delimit(tokens: tuple[str, ...], marks: list[bool]) -> str:
    out: list[str] = []
    open_ = False
    for tok, mark in zip(tokens, marks, strict=True):
        if mark and not open_:
            out.append(OPEN)
            open_ = True
        elif not mark and open_:
            out.append(CLOSE)
            open_ = False
        out.append(_show(tok))
    if open_:
        out.append(CLOSE)
    return "".join(out)


def fires_on(example: ActivationExample) -> str:
    """The example with the firing tokens delimited."""
    return delimit(example.tokens, list(example.firings))


def says(example: ActivationExample) -> str:
    """The example with the token *after* each firing position delimited: what came next."""
    shifted = [False, *example.firings[:-1]] if example.tokens else []
    return delimit(example.tokens, shifted)


def clip(text: str, max_chars: int, mark: str = OPEN) -> str:
    """Shorten ``text`` to ``max_chars`` keeping the first span opened by ``mark`` in view."""
    if len(text) <= max_chars:
        return text
    anchor = max(text.find(mark), 0)
    start = max(0, min(anchor - max_chars // 3, len(text) - max_chars))
    body = text[start : start + max_chars]
    return ("…" if start > 0 else "") + body + ("…" if start + max_chars < len(text) else "")


def numbered(
    examples: list[ActivationExample], render: Callable[[ActivationExample], str], max_chars: int
) -> str:
    lines = [f"{i}. {clip(render(ex), max_chars)}" for i, ex in enumerate(examples, 1)]
    return "\n".join(lines) + ("\n" if lines else "(no firing examples in the harvest)\n")
