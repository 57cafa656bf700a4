"""No silent drop (issue 13), end to end: the hostile folder through `cxr-triage predict --format csv` as a child
process (exit 3, one row per entry, no traceback, no formula cell) and the count of skipped files on stderr."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_triage.core.safe_text import FORMULA_START
from tests.conftest import REPO
from tests.hostile_corpus import SHARED_HOSTILE, encode, odd_entries, write_corpus, xray


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cxr_triage.cli", "predict", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "200"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_hostile_folder_through_predict_csv(tmp_path: Path):
    """Generated hostile files (plus ../shared/data/hostile-inputs when present) and the odd entries: exit 3, one row
    per entry, in order, no traceback, no formula cell; the FIFO, named explicitly too, is never opened."""
    folder = tmp_path / "hostile"
    expected = write_corpus(folder)
    if SHARED_HOSTILE.is_dir():
        for p in SHARED_HOSTILE.iterdir():
            if p.name != "README.md":
                shutil.copy(p, folder / f"shared_{p.name}")
                expected[f"shared_{p.name}"] = "any"
    expected |= odd_entries(folder)
    out = tmp_path / "o.csv"
    proc = run_cli([".", "fifo.png", "missing[1].png", "--format", "csv", "--out", str(out)], cwd=folder)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "skipped 3 files" in proc.stderr  # notes.md, list.csv, .DS_Store
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["path"].removeprefix("'") for r in rows]
    assert len(names) == len(set(names)) == len(expected) + 1
    assert set(names) == set(expected) | {"missing[1].png"}
    assert not [v for r in rows for v in r.values() if v.startswith(FORMULA_START)]
    for r, name in zip(rows, names, strict=True):
        want = expected.get(name, "error")
        if want == "ok":
            assert r["decision"] in ("accept", "uncertain", "rejected") and not r["error"], r
        elif want == "error":
            assert r["decision"] == "error" and r["error"] and "\n" not in r["error"], r
    by_name = dict(zip(names, rows, strict=True))
    assert "FIFO" in by_name["fifo.png"]["error"] and "link loop" in by_name["loop_a.png"]["error"]
    assert "dangling" in by_name["dangling.png"]["error"] and "directory" in by_name["x.png"]["error"]
    assert "no such file" in by_name["missing[1].png"]["error"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_skipped_files_are_counted_on_stderr(tmp_path: Path, fmt: str):
    (tmp_path / "a.png").write_bytes(encode(xray(), "PNG"))
    (tmp_path / "notes.md").write_text("x")
    proc = run_cli([str(tmp_path), "--format", fmt], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 file that is not images (.md: 1)" in proc.stderr
    assert "notes.md" not in proc.stdout and "a.png" in proc.stdout
