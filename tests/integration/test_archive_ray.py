"""Archive scoring on a local Ray (batch/archive.py): the same rows as the CLI, resumable after an interruption, one
row per input even when a worker process is killed, and `cxr-triage predict --engine ray`. The tests share one local
Ray (2 CPUs, 2 workers): 45-100 s on this 2-core machine under moderate load (15 minutes once beside a training run,
which starves Ray's own start-up processes). The result store and the inputs without Ray: tests/unit/test_archive.py."""

from __future__ import annotations

import csv
import os
import shutil
import signal
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_triage.batch.shards import ResultStore, read_results
from cxr_triage.cli import app
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.predict import collect_inputs
from cxr_triage.runtime.prediction import CSV_COLUMNS
from cxr_triage.runtime.predictor import Predictor
from tests.archive_rows import assert_same_rows, png_bytes
from tests.conftest import class_image

ray = pytest.importorskip("ray")
archive = pytest.importorskip("cxr_triage.batch.archive")
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
    (root / "bad" / "tiny.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    return root


def _inputs(root: Path) -> list[str]:
    return [str(root / "gen"), str(root / "samples"), str(root / "bad"), str(root / "missing.png")]


@pytest.fixture(scope="module")
def cli_rows(archive_dir: Path) -> dict[str, dict]:
    """The plain predictor's rows (what `cxr-triage predict` prints: ``Prediction.csv_row``), by path."""
    paths = collect_inputs(_inputs(archive_dir))
    return {s.prediction.path: s.prediction.csv_row() for s in Predictor().predict_files(paths)}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, started the way `score_archive` starts it (2 CPUs)."""
    with archive.ray_session(None, 2):
        yield


def test_ray_rows_match_the_cli(local_ray, archive_dir: Path, cli_rows: dict, tmp_path: Path):
    out = tmp_path / "results.parquet"
    summary = archive.score_archive(_inputs(archive_dir), out, workers=2)
    table = pq.read_table(out)
    assert table.column_names == CSV_COLUMNS
    assert table.schema.field("p_covid").type == pa.float64()
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == list(cli_rows)  # input order, one row each
    assert_same_rows(rows, cli_rows)
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
    assert_same_rows(rows, cli_rows)


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
    assert_same_rows(read_results(out).to_pylist(), expected)
