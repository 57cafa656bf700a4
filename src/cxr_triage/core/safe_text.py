"""Text that leaves the program safely: CSV cells a spreadsheet will not run as formulas."""

from __future__ import annotations

from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # OWASP CSV injection: what a spreadsheet may read as a formula


def csv_cell(value: Any) -> Any:
    """A text cell that starts like a formula gets a leading ``'`` (OWASP); numbers and other text pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
