"""Text for errors and reports: one line, of bounded length, every character visible.

A message can carry what a user's files hold (a 50 MB config value, a file name with a newline or
bytes that are not UTF-8). Printed as it is, it would flood the terminal, split over lines, or fail
to print at all (a lone surrogate cannot be written to a UTF-8 stream).
"""

from __future__ import annotations

import re

#: The most characters a printed message keeps: its head and its tail, the middle left out.
LIMIT = 600
_NEWLINES = re.compile(r"\s*[\r\n]+\s*")


def clip(text: str, limit: int = LIMIT) -> str:
    """``text`` when it has at most ``limit`` characters; else its head and tail around a note
    saying how many characters were left out (the tail often says what to do)."""
    if len(text) <= limit:
        return text
    head, tail = (2 * limit) // 3, limit // 3
    return f"{text[:head]} [... {len(text) - head - tail} characters left out ...] {text[-tail:]}"


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, clipped: for values quoted in an error message."""
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:  # never build a 50 MB repr
        return f"<{type(value).__name__} of {len(value)} entries>"
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply to show>"
    return clip(text, limit)


def one_line(text: str, limit: int = LIMIT) -> str:
    """``text`` as one printable line: line breaks (with the spaces around them) become " | ",
    other control characters and lone surrogates (the bytes of a file name that are not UTF-8)
    are escaped (``\\x1b``, ``\\udcff``), then clipped to ``limit`` characters."""
    text = _NEWLINES.sub(" | ", clip(text, 4 * limit).strip())
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return clip(text, limit)
