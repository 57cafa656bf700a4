"""EDA report: figures, counts.csv, summary.json and a self-contained report.html from a manifest."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_triage.core.classes import CLASS_IDS, DISPLAY_NAMES
from cxr_triage.data.eda import run_eda
from cxr_triage.data.manifest import ingest, write_outputs

FOLDERS = {
    "covid": "COVID",
    "lung_opacity": "Lung_Opacity",
    "normal": "Normal",
    "viral_pneumonia": "Viral Pneumonia",
}
# class -> (images, (height, width), suffix, origin, copy_px)
FULL = {
    "covid": (6, (96, 96), ".png", "mixed-public-covid", "256"),
    "lung_opacity": (4, (100, 80), ".jpg", "rsna-adult", "299"),
    "normal": (8, (96, 96), ".png", "rsna-adult", "224"),
    "viral_pneumonia": (5, (90, 112), ".png", "kermany-paediatric", "299"),
}


def _pattern(rng: np.random.Generator, cls: int, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 image: a class-specific texture over a random smooth field (so no two are near-identical)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    freq, phase = rng.uniform(6, 14), rng.uniform(0, 2 * np.pi)
    texture = [
        np.sin(freq * xx * 6 + phase),
        np.sign(np.sin(freq * xx * 3) * np.sin(freq * yy * 3)),
        np.cos(freq * np.hypot(xx - 0.5, yy - 0.5) * 8 + phase),
        xx + yy - 1,
    ][cls]
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR), dtype=float)
    return np.clip(0.6 * smooth + 50 * texture + 40, 0, 255).astype(np.uint8)


def make_dataset(root: Path, spec: dict, sources: bool, duplicate: bool, seed: int = 0) -> Path:
    """Kaggle layout ``<Class>/images/<Class>-N.ext``; optional sources.csv and one byte-identical pair."""
    rng = np.random.default_rng(seed)
    rows = []
    for cid, (n, shape, suffix, origin, copy_px) in spec.items():
        folder = root / FOLDERS[cid] / "images"
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            rel = f"{FOLDERS[cid]}/images/{FOLDERS[cid]}-{i}{suffix}"
            Image.fromarray(_pattern(rng, CLASS_IDS.index(cid), shape)).save(root / rel)
            rows.append({"file": rel, "label": FOLDERS[cid], "origin": origin, "copy_px": copy_px})
    if duplicate:
        rel = f"{FOLDERS['covid']}/images/{FOLDERS['covid']}-99.png"
        shutil.copyfile(root / "COVID/images/COVID-1.png", root / rel)
        rows.append({**rows[0], "file": rel})
    if sources:
        pd.DataFrame(rows).to_csv(root / "sources.csv", index=False)
    return root


def _ingest(root: Path, out: Path) -> pd.DataFrame:
    result = ingest(root, val=0.2, test=0.2, seed=0, workers=1)
    write_outputs(result, root, out, {})
    return pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All four classes, origins and copy_px known, one duplicate pair; EDA run once."""
    base = tmp_path_factory.mktemp("eda_full")
    root = make_dataset(base / "data", FULL, sources=True, duplicate=True)
    manifest = _ingest(root, base / "manifest")
    report = run_eda(base / "manifest" / "manifest.csv", base / "eda")
    return {
        "manifest": manifest,
        "report": report,
        "out": base / "eda",
        "html": report.read_text("utf-8"),
        "summary": json.loads((base / "eda" / "summary.json").read_text()),
    }


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """10 images of two classes, no sources.csv (origin unknown, copy_px empty), no duplicates."""
    spec = {"covid": (5, (64, 64), ".png", "", ""), "normal": (5, (72, 64), ".jpg", "", "")}
    root = make_dataset(tmp_path / "data", spec, sources=False, duplicate=False)
    return tmp_path / "manifest" / "manifest.csv", _ingest(root, tmp_path / "manifest")


def test_report_is_self_contained_html(full: dict) -> None:
    html = full["html"]
    assert full["report"] == full["out"] / "report.html"
    for name in DISPLAY_NAMES.values():
        assert name in html
    assert "not a medical device" in html
    assert not re.search(r"""(src|href)=["']?(https?:|file:|[\w./-]+\.png)""", html)
    for trap in ("Class ≈ source", "Resize history", "Duplicates"):
        assert trap in html


def test_embedded_images_are_pngs(full: dict) -> None:
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', full["html"])
    assert len(uris) == len(full["summary"]["figures"])
    for data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_duplicate_section_counts_groups(full: dict) -> None:
    m = full["manifest"]
    n_groups = int((m["group"].value_counts() > 1).sum())
    assert n_groups == 1
    pattern = r'id="duplicate-summary"><strong>(\d+)</strong> duplicate groups, (\d+) files'
    found = re.search(pattern, full["html"])
    assert found and (int(found[1]), int(found[2])) == (1, 2)
    assert "COVID-99.png" in full["html"] and "COVID-1.png" in full["html"]


def test_png_files_are_valid(full: dict) -> None:
    names = full["summary"]["figures"]
    expected = {"class_counts", "splits", "origins", "sizes", "intensity", "samples", "duplicates"}
    assert {Path(n).stem for n in names} == expected
    for name in names:
        with Image.open(full["out"] / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_counts_csv_equals_manifest(full: dict) -> None:
    counts = pd.read_csv(full["out"] / "counts.csv", index_col="label")
    m = full["manifest"]
    assert list(counts.index) == list(CLASS_IDS)
    assert list(counts.columns) == ["train", "val", "test", "total"]
    for cid in CLASS_IDS:
        for split in ("train", "val", "test"):
            assert counts.loc[cid, split] == ((m["label"] == cid) & (m["split"] == split)).sum()
        assert counts.loc[cid, "total"] == (m["label"] == cid).sum()
    meta = json.loads((full["out"].parent / "manifest" / "manifest.json").read_text())
    assert all(counts.loc[c, s] == n for s, per in meta["counts"].items() for c, n in per.items())


def test_summary_json_values(full: dict) -> None:
    s, m = full["summary"], full["manifest"]
    assert s["n_images"] == len(m) == 24
    assert s["classes"] == {"covid": 7, "lung_opacity": 4, "normal": 8, "viral_pneumonia": 5}
    assert s["splits"] == m["split"].value_counts().to_dict() and sum(s["splits"].values()) == 24
    assert s["origins"] == {"kermany-paediatric": 5, "mixed-public-covid": 7, "rsna-adult": 12}
    assert s["copy_px"] == {"224": 8, "256": 7, "299": 9}
    dup = s["duplicates"]
    assert (dup["groups"], dup["files"], dup["exact_groups"]) == (1, 2, 1)
    assert dup["by_class"] == {"covid": 2, "lung_opacity": 0, "normal": 0, "viral_pneumonia": 0}
    assert dup["cross_split_groups"] == 0 and dup["cross_class_groups"] == 0


def test_tiny_manifest_without_origins_or_duplicates(tiny: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    manifest_csv, m = tiny
    report = run_eda(manifest_csv, tmp_path / "eda")
    s = json.loads((tmp_path / "eda" / "summary.json").read_text())
    html = report.read_text("utf-8")
    assert s["n_images"] == len(m) == 10
    assert s["classes"] == {"covid": 5, "lung_opacity": 0, "normal": 5, "viral_pneumonia": 0}
    assert s["origins"] == {"unknown": 10} and s["copy_px"] == {}
    assert s["duplicates"]["groups"] == 0 and "duplicates.png" not in s["figures"]
    assert not (tmp_path / "eda" / "duplicates.png").exists()
    assert "No duplicate groups found" in html and "copy_px is not recorded" in html
    assert re.search(r'id="duplicate-summary"><strong>0</strong>', html)
    counts = pd.read_csv(tmp_path / "eda" / "counts.csv", index_col="label")
    assert counts.loc["lung_opacity"].tolist() == [0, 0, 0, 0] and counts["total"].sum() == 10


def test_missing_image_is_skipped_with_warning(
    tiny: tuple[Path, pd.DataFrame], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest_csv, m = tiny
    gone = tmp_path / "data" / m["path"].iloc[0]
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="cxr_triage.data.eda"):
        report = run_eda(manifest_csv, tmp_path / "eda")
    assert report.exists() and "data:image/png;base64," in report.read_text("utf-8")
    assert any(gone.name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert json.loads((tmp_path / "eda" / "summary.json").read_text())["n_images"] == 10
