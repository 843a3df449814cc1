"""One-line messages: folded, first or last line, and the exception's type where there is no message."""
from __future__ import annotations

from runtime.messages import first_line, last_line, one_line


def test_one_line_folds_white_space_and_cuts_at_the_limit():
    assert one_line("a\n  b\tc ") == "a b c"
    assert one_line("x" * 10, 6) == "xxxxx…" and one_line("x" * 6, 6) == "x" * 6
    assert one_line(ValueError("bad\nvalue")) == "bad value"
    assert one_line(ValueError()) == "ValueError" and one_line("") == ""


def test_first_and_last_line_skip_blank_lines():
    e = RuntimeError("\n  first  \n\nmiddle\n last \n")
    assert first_line(e) == "first" and last_line(e) == "last"
    assert first_line("y" * 400) == "y" * 300 and first_line("y" * 400, 10) == "y" * 10
    assert first_line(KeyError()) == "KeyError" and last_line(OSError()) == "OSError"
    assert first_line("") == "" and first_line(" \n ") == ""
