"""Every ``cxr-triage`` command the README shows names a real subcommand and only options that subcommand has, so
the documentation cannot drift from the CLI unnoticed (the Python example is run by tests/unit/test_readme.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from cxr_triage.cli import app
from tests.conftest import REPO

README = REPO / "README.md"
GLOBAL_OPTIONS = {"--version", "--help"}
PROSE = {"result"}  # 'a "cxr-triage result" SR': the product's name in prose, not a command


def commands() -> Any:
    """The CLI's top-level command group (typer ships its own click, so it is used by its attributes)."""
    return typer.main.get_command(app)


def subcommands(cmd: Any) -> dict[str, Any]:
    return dict(getattr(cmd, "commands", {}))


def options_of(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def usages(text: str) -> list[list[str]]:
    """Each README mention of ``cxr-triage …`` (code blocks, inline code, the command table) as its words, up to
    the end of the inline code, the table cell, a comment or the line (a trailing backslash continues it)."""
    text = text.replace("\\\n", " ").replace("\\|", " ")  # continued lines; "a \| b" alternatives in a table cell
    found = []
    for m in re.finditer(r"(?<![\w/.-])cxr-triage((?:[ \t]+[^\s`|#]+)*)", text):
        words = [w.strip("[]") for w in m.group(1).split()]
        found.append([w for w in words if w])
    return found


def resolve(words: list[str]) -> tuple[Any, list[str]] | None:
    """The (sub)command a usage names and the rest of its words; None for a bare ``cxr-triage`` or a usage whose
    first word is not a command word (prose such as 'cxr-triage result')."""
    top = cmd = commands()
    rest = list(words)
    while subcommands(cmd) and rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        sub = subcommands(cmd).get(rest[0])
        if sub is None:
            return (cmd, rest) if cmd is not top else None
        cmd, rest = sub, rest[1:]
    return None if cmd is top and not any(w.startswith("--") for w in rest) else (cmd, rest)


def test_the_readme_mentions_the_main_commands():
    named = {u[0] for u in usages(README.read_text(encoding="utf-8")) if u}
    assert {"ingest", "eda", "train", "export", "evaluate", "predict", "serve", "dicom-node"} <= named


def test_every_readme_command_and_option_exists():
    problems = []
    for words in usages(README.read_text(encoding="utf-8")):
        if words and words[0] in PROSE:
            continue
        hit = resolve(words)
        if hit is None:
            if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                problems.append(f"unknown command: cxr-triage {' '.join(words)}")
            continue
        cmd, rest = hit
        known = options_of(cmd) | (GLOBAL_OPTIONS if subcommands(cmd) else set())
        for w in rest:
            opt = re.match(r"--[a-z0-9][a-z0-9-]*", w)
            if opt and opt.group(0) not in known:
                problems.append(f"cxr-triage {cmd.name}: no option {opt.group(0)} (README: {' '.join(words)})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("run `cxr-triage predict a.png --format json` now", ["predict", "a.png", "--format", "json"]),
        (
            "| `cxr-triage serve [--port 8000] [--token-file F \\| --no-auth]` | x |",
            ["serve", "--port", "8000", "--token-file", "F", "--no-auth"],
        ),
        (
            "cxr-triage serve --host 0.0.0.0 \\\n  --token-file t  # note",
            ["serve", "--host", "0.0.0.0", "--token-file", "t"],
        ),
    ],
)
def test_usages_are_read_as_a_person_reads_them(snippet, expected):
    assert usages(snippet) == [expected]


def test_a_made_up_option_or_command_is_caught(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    drifted = tmp_path / "README.md"
    drifted.write_text("Run `cxr-triage predict x.png --colour red` or `cxr-triage predcit x.png`.\n")
    monkeypatch.setattr(sys.modules[__name__], "README", drifted)
    with pytest.raises(AssertionError, match=r"(?s)no option --colour.*unknown command: cxr-triage predcit"):
        test_every_readme_command_and_option_exists()
