"""No silent drop (issue 13): which paths `predict` answers, safe CSV cells and literal Rich text, in process. The
hostile folder through `cxr-triage predict --format csv` as a child process is tests/integration/test_inputs_cli.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.core.safe_text import FORMULA_START, csv_cell
from cxr_triage.runtime.formats import write_csv_rows
from cxr_triage.runtime.inputs import scan_inputs
from tests.hostile_corpus import FORMULA_NAMES, encode, odd_entries, xray


def test_scan_rules(tmp_path: Path):
    expected = odd_entries(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(encode(xray(), "JPEG"))
    (tmp_path / "sub" / "up").symlink_to("..")  # a folder link loop: each real folder is scanned once
    found = scan_inputs([str(tmp_path)])
    names = [Path(p).name for p in found.paths]
    assert sorted(names) == sorted([*expected, "a.jpg"])
    assert found.skipped[".md"] == 1 and found.skipped[".csv"] == 1 and found.skipped["hidden"] == 1
    assert "skipped" in found.summary() and ".md: 1" in found.summary()


def test_named_paths_literal_glob_and_missing(tmp_path: Path):
    png = encode(xray(), "PNG")
    (tmp_path / "scan[1].png").write_bytes(png)
    (tmp_path / "scan1.png").write_bytes(png)
    (tmp_path / "a.png").write_bytes(png)
    literal = str(tmp_path / "scan[1].png")
    assert scan_inputs([literal]).paths == [literal]  # exists: taken literally, not as a pattern
    assert scan_inputs([str(tmp_path / "a*.png")]).paths == [str(tmp_path / "a.png")]
    missing = str(tmp_path / "missing[2].png")
    assert scan_inputs([missing]).paths == [missing]  # matches nothing: a row, never a silent drop
    assert scan_inputs([str(tmp_path / "a.png"), f"{tmp_path}/./a.png"]).paths == [str(tmp_path / "a.png")]


def test_csv_cells_never_start_a_formula():
    rows = [
        {"path": name, "label": "", "decision": "error", "error": f"{name}: no such file"}
        for name in (*FORMULA_NAMES, "\rcr.png", "plain.png")
    ]
    buf = io.StringIO()
    write_csv_rows(rows, buf)
    cells = [v for r in csv.DictReader(io.StringIO(buf.getvalue())) for v in r.values()]
    assert not [c for c in cells if c.startswith(FORMULA_START)]
    assert "'=1+2.png" in cells and "plain.png" in cells
    assert csv_cell(-2.5) == -2.5 and csv_cell("-2+3") == "'-2+3"


def test_table_shows_markup_in_names_literally(tmp_path: Path):
    name = "[bold red]x[red] [link=evil]y.png"
    (tmp_path / name).write_bytes(b"not an image")
    res = CliRunner().invoke(app, ["predict", str(tmp_path / name)], env={"COLUMNS": "300"})
    assert res.exit_code == 3, res.output
    assert "[bold red]x[red]" in res.output and "[link=evil]" in res.output
