"""Text that came from outside (an LLM's label, a server's error, a user's ID) made safe to
store and to print.

Two separate jobs:

- :func:`redact` removes secrets (API keys) from anything about to be stored or printed. A
  model can echo its key back in a label; a server can put it in an error body.
- :func:`printable` escapes control characters, so a label holding a terminal escape
  sequence (``\\x1b[2J``, a hyperlink, a title change) prints as text instead of acting on
  the terminal. Rich markup is a third concern, left to ``rich.markup.escape``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "***"

# C0 controls, DEL and C1 controls (which include the 8-bit CSI, 0x9b); newline and tab too:
# a label is one line, and a tab can hide text in a table.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret (longest first, so one never hides part of another) starred."""
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """Control characters as visible escapes (``\\x1b``, ``\\n``); everything else unchanged."""

    def sub(m: re.Match[str]) -> str:
        ch = m.group(0)
        if keep_newlines and ch == "\n":
            return ch
        return _NAMED.get(ch, f"\\x{ord(ch):02x}")

    return _CONTROL.sub(sub, text)
