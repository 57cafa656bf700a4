"""Text that leaves the program safely: CSV cells a spreadsheet will not run as formulas, log text on one line."""

from __future__ import annotations

import re
from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # OWASP CSV injection: what a spreadsheet may read as a formula


def csv_cell(value: Any) -> Any:
    """A text cell that starts like a formula gets a leading ``'`` (OWASP); numbers and other text pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` on one line: control characters (newlines included) escaped as ``\\n``, ``\\x1b``, ``\\u2028``, so a
    value from a request can never start a forged log line or move the terminal's cursor."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
