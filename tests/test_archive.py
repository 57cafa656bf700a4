"""Archive scoring on Ray Data (runtime/archive.py, runtime/shards.py): the same rows as the CLI, resumable after an
interruption, one row per input even when a worker process is killed, manifests as input, and a plain CLI that never
imports Ray. The Ray tests share one local Ray (2 CPUs, 2 workers): 45-100 s on this 2-core machine under moderate
load (15 minutes once beside a training run, which starves Ray's own start-up processes)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.formats import write_csv_rows
from cxr_triage.runtime.predict import collect_inputs, predict_paths
from cxr_triage.runtime.prediction import CSV_COLUMNS
from cxr_triage.runtime.shards import ResultStore, read_results, rows_to_table

from .conftest import class_image

ray = pytest.importorskip("ray")
archive = pytest.importorskip("cxr_triage.runtime.archive")
SAMPLES = Path(str(resources.files("cxr_triage") / "assets" / "samples"))
N_GENERATED = 300


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 generated images (PNG/JPEG, 64-220 px), the 16 shipped samples, and inputs that cannot be read."""
    root = tmp_path_factory.mktemp("archive")
    (root / "gen").mkdir()
    rng = np.random.default_rng(16)
    for i in range(N_GENERATED):
        cid = CLASS_IDS[i % 4]
        h, w = (int(v) for v in rng.integers(64, 221, size=2))
        Image.fromarray(class_image(cid, h, w, rng)).save(root / "gen" / f"{cid}-{i:03d}.{'png' if i % 2 else 'jpg'}")
    shutil.copytree(SAMPLES, root / "samples", ignore=shutil.ignore_patterns("*.csv"))
    (root / "bad").mkdir()
    (root / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "tiny.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    return root


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _inputs(root: Path) -> list[str]:
    return [str(root / "gen"), str(root / "samples"), str(root / "bad"), str(root / "missing.png")]


@pytest.fixture(scope="module")
def cli_rows(archive_dir: Path) -> dict[str, dict]:
    """The plain predictor's rows (what `cxr-triage predict` prints), by path."""
    paths = collect_inputs(_inputs(archive_dir))
    return {r["path"]: r for r in predict_paths(Engine(), paths)}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, started the way `score_archive` starts it (2 CPUs)."""
    with archive.ray_session(None, 2):
        yield


def _assert_same(rows: list[dict], expected: dict[str, dict]) -> None:
    """Identical rows: same paths once each, labels, decisions, errors; probabilities to 1e-6."""
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for r in rows:
        e = expected[r["path"]]
        assert (r["label"] or "", r["decision"], r["error"] or "") == (
            e["label"] or "",
            e["decision"],
            e["error"] or "",
        ), r["path"]
        if e["decision"] != "error":
            for c in CLASS_IDS:
                assert abs(r[f"p_{c}"] - e[f"p_{c}"]) <= 1e-6
            if e["confidence"] is None:  # rejected: no label, no confidence
                assert r["confidence"] is None
            else:
                assert abs(r["confidence"] - e["confidence"]) <= 1e-6


# --- without Ray: the result store and the inputs ---


def test_store_resumes_from_shards_and_merges_in_order(tmp_path: Path):
    rows = [
        {"path": f"img{i}.png", "label": "normal", "confidence": 0.9, "p_covid": 0.1, "p_lung_opacity": 0.0}
        | {"p_normal": 0.9, "p_viral_pneumonia": 0.0, "decision": "accept", "error": ""}
        for i in range(5)
    ]
    rows.append({"path": "bad.png", "label": "", "confidence": "", "decision": "error", "error": "bad.png: empty"})
    out = tmp_path / "res.csv"
    store = ResultStore(out)
    assert store.fmt == "csv" and store.done_paths() == set()
    store.append(rows_to_table(rows[3:]))
    store.append(rows_to_table(rows[:2] + rows[4:5]))  # img4 twice: delivered again after a retry
    assert ResultStore(out).done_paths() == {r["path"] for r in rows} - {"img2.png"}
    (store.parts / "x.tmp").write_bytes(b"half a shard")  # a killed writer's leftover is not a shard
    store.append(rows_to_table(rows[2:3]))
    table, dups = ResultStore(out).finish([r["path"] for r in rows])
    assert dups == 1 and not store.parts.exists()
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    buf = io.StringIO()
    write_csv_rows(rows, buf)
    assert out.read_text() == buf.getvalue()  # byte for byte the CLI's CSV
    assert read_results(out).equals(table)
    assert ResultStore(out).done_paths() == {r["path"] for r in rows}
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a result file"):
        ResultStore(tmp_path / "junk.parquet").done_paths()


def test_archive_inputs_reads_manifests_folders_and_globs(tmp_path: Path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    for name in ("a/1.png", "a/2.jpg", "b.png"):
        (data / name).write_bytes(b"x")
    lists = tmp_path / "lists"
    lists.mkdir()
    pd.DataFrame({"path": ["a/1.png", str(data / "b.png")], "label": ["covid", "normal"]}).to_csv(
        lists / "manifest.csv", index=False
    )
    (lists / "manifest.json").write_text(json.dumps({"dataset_root": str(data)}))  # as `cxr-triage ingest` writes
    pd.DataFrame({"file": ["2.jpg"]}).to_parquet(data / "a" / "list.parquet")  # relative to its own folder
    got = archive.archive_inputs([str(lists / "manifest.csv"), str(data / "a" / "list.parquet"), str(data / "*.png")])
    assert got == [str(data / "a/1.png"), str(data / "b.png"), str(data / "a/2.jpg")]
    pd.DataFrame({"image": ["x.png"]}).to_csv(tmp_path / "nopath.csv", index=False)
    with pytest.raises(archive.ArchiveError, match="name the image-path column 'path'"):
        archive.archive_inputs([str(tmp_path / "nopath.csv")])


def test_path_error_gives_the_cli_reasons(tmp_path: Path):
    (tmp_path / "ok.png").write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert archive.path_error(str(tmp_path / "ok.png")) is None
    assert archive.path_error(str(tmp_path / "no.png")) == f"{tmp_path / 'no.png'}: no such file"
    assert "is a directory" in archive.path_error(str(tmp_path / "dir.png"))


def test_plain_cli_never_imports_ray():
    code = (
        "import sys; from typer.testing import CliRunner; from cxr_triage.cli import app; "
        f"r = CliRunner().invoke(app, ['predict', {str(SAMPLES / 'Normal-1655.jpg')!r}, '--format', 'csv']); "
        "assert r.exit_code == 0, r.output; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_refuses_ray_without_an_output_file():
    result = CliRunner().invoke(app, ["predict", str(SAMPLES), "--engine", "ray"])
    assert result.exit_code == 2 and "--out" in result.output
    result = CliRunner().invoke(app, ["predict", str(SAMPLES), "--engine", "spark", "--out", "x.parquet"])
    assert result.exit_code == 2 and "unknown --engine" in result.output


# --- on a local Ray with 2 workers ---


def test_ray_rows_match_the_cli(local_ray, archive_dir: Path, cli_rows: dict, tmp_path: Path):
    out = tmp_path / "results.parquet"
    summary = archive.score_archive(_inputs(archive_dir), out, workers=2)
    table = pq.read_table(out)
    assert table.column_names == CSV_COLUMNS
    assert table.schema.field("p_covid").type == pa.float64()
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == list(cli_rows)  # input order, one row each
    _assert_same(rows, cli_rows)
    decisions = {r["decision"] for r in rows}
    assert {"accept", "error"} <= decisions and len(decisions) >= 3
    assert summary.total == len(cli_rows) == N_GENERATED + 16 + 4 and summary.scored == summary.total
    assert summary.errors == 4 and summary.duplicates == 0
    again = archive.score_archive(_inputs(archive_dir), out, workers=2)  # nothing left to do: Ray is not needed
    assert (again.skipped, again.scored, again.total) == (summary.total, 0, summary.total)
    assert pq.read_table(out).equals(table)


def _scorer_pids() -> list[int]:
    """Scoring actor processes started by this process's Ray (children of its raylet)."""
    me, pids = os.getpid(), []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            grandparent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(b"ray::MapWorker(MapBatches(Scorer))") and grandparent == me:
            pids.append(int(proc.name))
    return pids


def test_interrupted_job_resumes_and_survives_a_killed_worker(
    local_ray, archive_dir: Path, cli_rows: dict, tmp_path: Path
):
    """Stop a job after 100 rows (as Ctrl-C would), rerun it while SIGKILLing a scoring worker: every row once."""
    out = tmp_path / "results.csv"

    def stop_after_100(rows, total):
        for i, row in enumerate(rows):
            if i == 100:
                raise KeyboardInterrupt
            yield row

    with pytest.raises(KeyboardInterrupt):
        archive.score_archive(_inputs(archive_dir), out, workers=2, shard_rows=32, progress=stop_after_100)
    assert not out.exists()
    kept = ResultStore(out).done_paths()
    assert 100 <= len(kept) < len(cli_rows)  # finished rows (and the error rows found up front) were kept
    killed: list[int] = []

    def kill_one_worker(rows, total):
        for i, row in enumerate(rows):
            if i == 32 and not killed:
                pids = _scorer_pids()
                assert pids, "no scoring actor process found"
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            yield row

    summary = archive.score_archive(_inputs(archive_dir), out, workers=2, progress=kill_one_worker)
    assert killed and summary.skipped == len(kept) and summary.scored == len(cli_rows) - len(kept)
    with open(out, newline="", encoding="utf-8") as f:
        parsed = list(csv.DictReader(f))
    assert list(parsed[0]) == CSV_COLUMNS
    rows = read_results(out).to_pylist()
    assert len(rows) == len({r["path"] for r in rows}) == summary.total == len(cli_rows)
    _assert_same(rows, cli_rows)


def test_cli_engine_ray_writes_the_contract_columns(local_ray, archive_dir: Path, cli_rows: dict, tmp_path: Path):
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(
        app, ["predict", str(archive_dir / "samples"), str(archive_dir / "bad"), "--engine", "ray", "--out", str(out)]
    )
    assert result.exit_code == 3, result.output  # some inputs could not be read, as in the plain CLI
    assert "19 rows" in result.output
    with open(out, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        assert len(list(reader)) == 19
    expected = {p: r for p, r in cli_rows.items() if "/gen/" not in p and "missing" not in p}
    _assert_same(read_results(out).to_pylist(), expected)
