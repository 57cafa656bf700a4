"""Archive scoring without a Ray cluster (batch/archive.py, batch/shards.py): the result store resumes from shards
and refuses files it did not write, resumed jobs rescore changed inputs, manifests as input, a plain CLI that never
imports Ray, and the whole job with Ray Data replaced by in-process scoring. The jobs on a local Ray are in
tests/integration/test_archive_ray.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_triage.batch.shards import (
    NotAResultFile,
    ResultStore,
    input_key,
    marker_path,
    predictions_table,
    read_results,
    rows_to_table,
)
from cxr_triage.cli import app
from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.runtime.formats import write_csv_rows
from cxr_triage.runtime.predict import collect_inputs
from cxr_triage.runtime.prediction import CSV_COLUMNS
from cxr_triage.runtime.predictor import Predictor
from tests.archive_rows import assert_same_rows, png_bytes
from tests.conftest import class_image

ray = pytest.importorskip("ray")
archive = pytest.importorskip("cxr_triage.batch.archive")
SAMPLES = Path(str(resources.files("cxr_triage") / "assets" / "samples"))


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
    table, dups, dropped = ResultStore(out).finish([r["path"] for r in rows])
    assert dups == 1 and dropped == 0 and not store.parts.exists()
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    buf = io.StringIO()
    write_csv_rows(rows, buf)
    assert out.read_text() == buf.getvalue()  # byte for byte the CLI's CSV
    assert read_results(out).equals(table)
    assert ResultStore(out).done_paths() == {r["path"] for r in rows}
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a result file"):
        ResultStore(tmp_path / "junk.parquet").done_paths()


def _row(path: str, label: str = "normal") -> dict:
    probs = {f"p_{c}": 0.9 if c == label else 0.1 / 3 for c in CLASS_IDS}
    return {"path": path, "label": label, "confidence": 0.9, **probs, "decision": "accept", "error": ""}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("people.csv", "name,score\nbob,1\n"),  # an unrelated table: was overwritten and gained a blank row
        ("plain.csv", ",".join(CSV_COLUMNS) + "\nx.png,,,,,,,error,gone\n"),  # predict's CSV, not an archive's
        ("notes.parquet", "not parquet at all"),
    ],
)
def test_an_out_this_tool_did_not_write_is_refused_and_left_alone(tmp_path: Path, name: str, text: str):
    out = tmp_path / name
    out.write_text(text)
    (tmp_path / "a.png").write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))
    with pytest.raises(NotAResultFile, match=r"not a result file of cxr-triage .*move it or pick another --out"):
        ResultStore(out).done_paths()
    with pytest.raises(archive.ArchiveError, match="not a result file"):
        archive.score_archive([str(tmp_path / "a.png")], out)  # refused before Ray starts
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "a.png"), "--engine", "ray", "--out", str(out)])
    assert result.exit_code == 2 and "not a result file" in result.output
    assert out.read_text() == text and not marker_path(out).exists()
    assert not out.with_name(out.name + ".parts").exists()


def test_a_marker_does_not_make_another_table_ours(tmp_path: Path):
    out = tmp_path / "res.csv"
    ResultStore(out).finish([])  # an empty result file and its marker
    out.write_text("name,score\nbob,1\n")  # replaced by another table under the same name
    with pytest.raises(NotAResultFile, match="its columns are not those"):
        ResultStore(out).done_paths()
    marker_path(out).write_text("{}")
    with pytest.raises(NotAResultFile, match="is not its marker"):
        ResultStore(out).done_paths()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_resume_rescores_changed_files_and_drops_rows_of_gone_inputs(tmp_path: Path, fmt: str):
    files = {n: tmp_path / f"{n}.png" for n in ("a", "b", "c", "d")}
    for f in files.values():
        f.write_bytes(b"first version")
    paths = [str(f) for f in files.values()]
    out = tmp_path / f"res.{fmt}"
    store = ResultStore(out, keys={p: input_key(p) for p in paths})
    store.append(rows_to_table([_row(p) for p in paths]))
    assert store.finish(paths).dropped == 0 and ResultStore(out).done_paths() == set(paths)
    files["b"].write_bytes(b"second version, longer")  # another size
    st = files["c"].stat()
    os.utime(files["c"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, newer
    now = [str(files["a"]), str(files["b"]), str(files["c"])]  # d is no longer an input
    store = ResultStore(out, keys={p: input_key(p) for p in now})
    assert store.done_paths() & set(now) == {str(files["a"])}
    store.append(rows_to_table([_row(str(files["b"]), "covid"), _row(str(files["c"]), "covid")]))
    table, dups, dropped = store.finish(now)
    assert dups == 0 and dropped == 3  # the stale b and c rows, and d's
    assert [(r["path"], r["label"]) for r in table.to_pylist()] == list(
        zip(now, ["normal", "covid", "covid"], strict=True)
    )
    assert read_results(out).equals(table) and ResultStore(out).done_paths() == set(now)


def test_a_result_file_changed_by_hand_is_scored_again_not_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (tmp_path / "a.png").write_bytes(b"x")
    path = str(tmp_path / "a.png")
    out = tmp_path / "res.csv"
    store = ResultStore(out)
    store.append(rows_to_table([_row(path)]))
    store.finish([path])
    out.write_text(out.read_text().replace(",normal,", ",covid,"))  # someone edited a label
    assert ResultStore(out).done_paths() == set()
    assert "changed since cxr-triage wrote it" in caplog.text


def test_score_archive_resumes_by_content_key_without_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The whole job with Ray Data replaced by the same scoring in this process: what each rerun scores."""
    engine, scored = Predictor(), []

    def local_stream(paths, bundle, workers, lang, batch_size):
        scored.append(sorted(paths))
        yield predictions_table(archive.score_blobs(engine, paths, [Path(p).read_bytes() for p in paths], lang))

    monkeypatch.setattr(archive, "_stream", local_stream)
    monkeypatch.setattr(archive, "ray_session", lambda address, num_cpus: contextlib.nullcontext())
    rng = np.random.default_rng(7)
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, cid in enumerate(CLASS_IDS):
        Image.fromarray(class_image(cid, 96, 96, rng)).save(folder / f"{i}.png")
    out = tmp_path / "results.csv"
    first = archive.score_archive([str(folder)], out)
    assert (first.scored, first.skipped, first.total, first.dropped) == (4, 0, 4, 0)
    Image.fromarray(class_image("covid", 120, 100, rng)).save(folder / "1.png")  # rewritten with another image
    (folder / "3.png").unlink()  # gone from the folder
    second = archive.score_archive([str(folder)], out)
    assert scored[-1] == [str(folder / "1.png")]
    assert (second.scored, second.skipped, second.total, second.dropped) == (1, 2, 3, 2)
    expected = {s.prediction.path: s.prediction.csv_row() for s in engine.predict_files(collect_inputs([str(folder)]))}
    assert_same_rows(read_results(out).to_pylist(), expected)
    third = archive.score_archive([str(folder)], out)
    assert (third.scored, third.skipped, len(scored)) == (0, 3, 2)


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
