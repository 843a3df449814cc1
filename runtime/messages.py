"""Messages on one line, for errors and notes that must not span lines: folded, or one line of several."""
from __future__ import annotations

from typing import Any


def _fallback(e: Any) -> str:
    return type(e).__name__ if isinstance(e, BaseException) else ""


def _lines(e: Any) -> list[str]:
    return [ln.strip() for ln in str(e).splitlines() if ln.strip()]


def one_line(text: Any, limit: int | None = None) -> str:
    """``str(text)`` with its white space folded into single spaces, cut to ``limit`` characters (ending "…");
    an exception without a message gives its type's name."""
    s = " ".join(str(text).split()) or _fallback(text)
    return s if limit is None or len(s) <= limit else s[: limit - 1] + "…"


def first_line(e: Any, limit: int = 300) -> str:
    """The first non-empty line of an exception's message or of a text, at most ``limit`` characters; an
    exception without a message gives its type's name."""
    lines = _lines(e)
    return lines[0][:limit] if lines else _fallback(e)


def last_line(e: Any) -> str:
    """The last non-empty line (OpenCV's and Pillow's messages carry context above it); as :func:`first_line`
    otherwise."""
    lines = _lines(e)
    return lines[-1] if lines else _fallback(e)
