"""How activation examples are written into a prompt: three renderings any strategy can use.

- ``delimited`` (the default): one numbered line per example, each run of consecutive firing
  tokens between ``<<`` ``>>``; newlines shown as ``⏎``; long examples clipped around the first
  firing span.
- ``single_line``: one numbered line per example, every firing token wrapped on its own
  (``[[[tok]]]`` or ``<<<tok>>>``), optionally followed by its activation, ``(act:0.82)``.
- ``xml``: one ``<example>`` block per example with a ``<raw>`` view (the literal window,
  whitespace kept) and an ``<annotated>`` view (firing tokens wrapped, optionally with their
  activation), both as CDATA so any text survives.

Options are an :class:`ExampleRendering` inside a strategy's options (``rendering``), so the
CLI and config files choose them the same way for every strategy. :func:`describe_rendering`
is the sentence that tells the model how to read the chosen format; it belongs to the shared
prompt prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from spd_host.autointerp.evidence import ActivationExample
from spd_host.autointerp.strategies.formatting import clip, delimit

NEWLINE = "⏎"


class ExampleRendering(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["delimited", "single_line", "xml"] = "delimited"
    annotate: bool = False
    """Show each firing token's activation (``single_line`` and ``xml`` only)."""
    delimiter: Literal["brackets", "angle"] = "brackets"
    """``[[[tok]]]`` or ``<<<tok>>>`` (``single_line`` and ``xml`` only)."""


def _pair(rendering: ExampleRendering) -> tuple[str, str]:
    return ("[[[", "]]]") if rendering.delimiter == "brackets" else ("<<<", ">>>")


def _marks(example: ActivationExample, shift: bool) -> list[bool]:
    """Firing flags, or (``shift``) the flags moved one token right: what came next."""
    if not shift:
        return list(example.firings)
    return [False, *example.firings[:-1]] if example.tokens else []


def _value(x: float) -> str:
    return f"{x:.2g}"


def _wrapped(
    example: ActivationExample,
    rendering: ExampleRendering,
    shift: bool,
    show: Callable[[str], str],
) -> str:
    """Each marked token wrapped on its own; the annotation is the activation at the firing
    position (for the shifted view, the position before the marked token)."""
    left, right = _pair(rendering)
    marks = _marks(example, shift)
    out: list[str] = []
    for i, (tok, mark) in enumerate(zip(example.tokens, marks, strict=True)):
        text = show(tok)
        if not mark:
            out.append(text)
            continue
        body = text.lstrip() or text  # a leading space stays outside the marks
        lead = text[: len(text) - len(body)]
        ann = f"act:{_value(example.activations[i - 1 if shift else i])}"
        if not rendering.annotate:
            out.append(f"{lead}{left}{body}{right}")
        elif rendering.format == "single_line" and rendering.delimiter == "brackets":
            out.append(f"{lead}{left}{body}{right} ({ann})")
        else:
            out.append(f"{lead}{left}{body} ({ann}){right}")
    return "".join(out)


def _visible(tok: str) -> str:
    return tok.replace("\n", NEWLINE)


def _cdata(text: str) -> str:
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def render_example(
    example: ActivationExample, rendering: ExampleRendering, max_chars: int, *, shift: bool = False
) -> str:
    """One example in the chosen format (without its number)."""
    if rendering.format == "delimited":
        return clip(delimit(example.tokens, _marks(example, shift)), max_chars)
    if rendering.format == "single_line":
        return clip(_wrapped(example, rendering, shift, _visible), max_chars, _pair(rendering)[0])
    raw = "".join(example.tokens)
    annotated = _wrapped(example, rendering, shift, lambda t: t)
    return f"<example>\n<raw>{_cdata(raw)}</raw>\n<annotated>{_cdata(annotated)}</annotated>\n</example>"


def render_examples(
    examples: Sequence[ActivationExample],
    rendering: ExampleRendering,
    max_chars: int,
    *,
    shift: bool = False,
) -> str:
    """All examples: numbered lines, or consecutive XML blocks."""
    if not examples:
        return "(no firing examples in the harvest)\n"
    items = [render_example(ex, rendering, max_chars, shift=shift) for ex in examples]
    if rendering.format == "xml":
        return "\n".join(items) + "\n"
    return "\n".join(f"{i}. {text}" for i, text in enumerate(items, 1)) + "\n"


def describe_rendering(rendering: ExampleRendering) -> str:
    """How to read the examples, for the shared prompt prefix."""
    left, right = _pair(rendering)
    ann = " (act:X)" if rendering.annotate else ""
    if rendering.format == "delimited":
        return (
            "In the examples, tokens where the component fires are between << and >> (a run of "
            f"consecutive firing tokens shares one pair); a newline shows as {NEWLINE}."
        )
    if rendering.format == "single_line" and rendering.delimiter == "brackets":
        token = f"{left}token{right}{ann}"
    else:
        token = f"{left}token{ann}{right}"
    act = (
        " act:X is the component's activation at that position (the method's primary "
        "activation, as described above)."
        if rendering.annotate
        else ""
    )
    if rendering.format == "single_line":
        return (
            f"Each example is one line; every firing token is wrapped as {token}.{act} "
            f"A newline shows as {NEWLINE}."
        )
    return (
        "Each example is an <example> block with two views of the same window: <raw>, the "
        "literal text (whitespace and newlines kept), and <annotated>, where every firing token "
        f"is wrapped as {token}.{act}"
    )
