"""The README: it starts with the commands and the five-line Python example, and that example runs (doctest)."""

from __future__ import annotations

import doctest
import re

import pytest

from tests.conftest import REPO

README = REPO / "README.md"


def code_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def test_readme_starts_with_the_commands_and_a_five_line_example():
    (lang1, commands), (lang2, example) = code_blocks(README.read_text(encoding="utf-8"))[:2]
    assert lang1 == "bash" and [line.split()[:2] for line in commands.splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
        ["make", "serve"],
    ]
    statements = [line for line in example.splitlines() if line.startswith(">>> ")]
    assert lang2 == "python" and len(statements) == 5
    assert statements[0] == ">>> from cxr_triage import Triage"


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch):
    """Every ``python`` block of the README with ``>>>`` lines, run as a doctest from the repository root."""
    monkeypatch.chdir(README.parent)
    blocks = [body for lang, body in code_blocks(README.read_text(encoding="utf-8")) if lang == "python"]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for i, body in enumerate(b for b in blocks if ">>> " in b):
        test = doctest.DocTestParser().get_doctest(body, {}, f"README.md python block {i}", str(README), 0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 5 and result.failed == 0
