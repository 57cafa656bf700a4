"""Ingest: dataset folder -> manifest (labels, hashes, duplicate groups, origins, splits) and its files."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_triage.core.classes import CLASS_IDS
from cxr_triage.data.manifest import (
    MANIFEST_COLUMNS,
    DatasetError,
    IngestResult,
    assign_splits,
    find_images,
    hash_image,
    ingest,
    load_manifest,
    write_outputs,
)

SETTINGS = {"val": 0.2, "test": 0.2, "seed": 0}


def run_ingest(root: Path, seed: int = 0, workers: int = 2) -> IngestResult:
    return ingest(root, val=SETTINGS["val"], test=SETTINGS["test"], seed=seed, workers=workers)


@pytest.fixture(scope="module")
def ingested(shared_dataset):
    """One ingest of the session's shared dataset, for read-only checks."""
    return run_ingest(shared_dataset.root)


def test_columns_labels_and_stats(ingested, shared_dataset):
    m = ingested.manifest
    assert list(m.columns) == MANIFEST_COLUMNS
    assert dict(zip(m["path"], m["label"], strict=True)) == shared_dataset.files
    assert set(m["label"]) <= set(CLASS_IDS)
    assert m["label"].value_counts().to_dict() == shared_dataset.counts
    assert list(m["path"]) == sorted(m["path"])  # stable order
    for row in m.sample(6, random_state=0).itertuples():
        path = shared_dataset.path(row.path)
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
        assert (row.width, row.height) == (grey.shape[1], grey.shape[0])
        assert row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row.mean == pytest.approx(grey.mean(), abs=0.01)
        assert re.fullmatch(r"[0-9a-f]{16}", row.phash) and row.phash == str(imagehash.phash(Image.fromarray(grey)))


def test_phash_is_close_for_near_copies_and_far_for_different_images(tmp_path: Path, class_image):
    """Re-encoded, brightened, resized or noisy copies stay within a few bits (the duplicate search's radius is 10);
    different images, of one class or of two, are at least 12 bits apart."""
    rng = np.random.default_rng(0)
    images = {f"{cid}{k}": class_image(cid, 200, 180, rng) for cid in CLASS_IDS for k in range(3)}

    def phash(arr: np.ndarray, name: str = "x.png", **save) -> str:
        Image.fromarray(arr).save(tmp_path / name, **save)
        return hash_image(str(tmp_path / name))["phash"]

    def bits(a: str, b: str) -> int:
        return (int(a, 16) ^ int(b, 16)).bit_count()

    hashes = {k: phash(v) for k, v in images.items()}
    assert min(bits(hashes[a], hashes[b]) for a, b in itertools.combinations(hashes, 2)) >= 12
    for key, arr in images.items():
        copies = [
            phash(arr, "x.jpg", quality=85),
            phash(np.clip(arr.astype(int) + 6, 0, 255).astype(np.uint8)),
            phash(np.asarray(Image.fromarray(arr).resize((150, 167)))),
            phash(np.clip(arr + rng.normal(0, 3, arr.shape), 0, 255).astype(np.uint8)),
        ]
        assert max(bits(hashes[key], c) for c in copies) <= 8, key


def test_variant_folder_name_is_mapped(ingested):
    vp = ingested.manifest[ingested.manifest["path"].str.startswith("viral pneumonia/")]
    assert len(vp) > 0 and set(vp["label"]) == {"viral_pneumonia"}


def test_masks_and_stray_files_are_ignored(ingested, shared_dataset):
    listed = set(ingested.manifest["path"]) | set(ingested.skipped["path"])
    assert not listed & set(shared_dataset.ignored)
    assert not any("/masks/" in p or p.endswith(".txt") for p in listed)
    found = find_images(shared_dataset.root)
    assert {p for p, _ in found} == set(shared_dataset.files) | set(shared_dataset.unreadable)


def test_unreadable_files_are_skipped_with_reasons(ingested, shared_dataset):
    skipped = dict(zip(ingested.skipped["path"], ingested.skipped["reason"], strict=True))
    assert set(skipped) == set(shared_dataset.unreadable)
    for rel, fragment in shared_dataset.unreadable.items():
        assert fragment in skipped[rel]
        assert Path(rel).name in skipped[rel]  # the reason names the file
    assert not set(skipped) & set(ingested.manifest["path"])


def test_duplicates_share_group_and_split(ingested, shared_dataset):
    m = ingested.manifest.set_index("path")
    exact, near = shared_dataset.exact_duplicates, shared_dataset.near_duplicates
    for a, b in (exact, near):
        assert m.at[a, "group"] == m.at[b, "group"]
        assert m.at[a, "split"] == m.at[b, "split"]
    assert m.at[exact[0], "group"] != m.at[near[0], "group"]
    assert m.at[exact[0], "sha256"] == m.at[exact[1], "sha256"]
    assert m.at[near[0], "sha256"] != m.at[near[1], "sha256"]
    # no other image is mistaken for a duplicate
    sizes = m.groupby("group").size()
    multi = {frozenset(m.index[m["group"] == g]) for g in sizes[sizes > 1].index}
    assert multi == {frozenset(exact), frozenset(near)}
    assert (ingested.n_dup_groups, ingested.n_exact_groups) == (2, 1)
    assert m["group"].nunique() == len(m) - 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_groups_never_straddle_splits(shared_dataset, seed):
    m = run_ingest(shared_dataset.root, seed=seed, workers=1).manifest
    assert set(m["split"]) == {"train", "val", "test"}
    assert m["split"].notna().all()
    assert (m.groupby("group")["split"].nunique() == 1).all()
    assert (m["split"] == "train").sum() > len(m) / 2


def test_same_seed_gives_byte_identical_files(shared_dataset, tmp_path):
    outs = []
    for i, workers in enumerate((1, 2)):  # the worker count must not change the result
        out = tmp_path / f"out{i}"
        write_outputs(run_ingest(shared_dataset.root, workers=workers), shared_dataset.root, out, SETTINGS)
        outs.append(out)
    for name in ("manifest.csv", "manifest.json", "skipped.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert not list(outs[0].glob(".*tmp*"))  # no temporary files left behind


def test_different_seed_gives_different_split(ingested, shared_dataset):
    other = run_ingest(shared_dataset.root, seed=1).manifest
    assert list(other["path"]) == list(ingested.manifest["path"])
    assert list(other["group"]) == list(ingested.manifest["group"])
    assert (other["split"] != ingested.manifest["split"]).any()


def test_origins_from_sources_csv(ingested, shared_dataset):
    m = ingested.manifest.set_index("path")
    for rel in shared_dataset.files:
        assert m.at[rel, "origin"] == shared_dataset.origins.get(rel, "unknown"), rel
        assert str(m.at[rel, "copy_px"]) == shared_dataset.copy_px.get(rel, ""), rel
    assert set(shared_dataset.origins) < set(shared_dataset.files)  # some files are unlisted: 'unknown'
    assert (m["origin"] == "unknown").sum() == len(shared_dataset.files) - len(shared_dataset.origins)


def test_origins_unknown_without_sources_csv(synthetic_dataset):
    (synthetic_dataset.root / "sources.csv").unlink()
    m = run_ingest(synthetic_dataset.root).manifest
    assert set(m["origin"]) == {"unknown"}
    assert set(m["copy_px"]) == {""}


def _no_class_folders(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"")
    (root / "Pneumothorax").mkdir()


def _empty_class_folders(root: Path) -> None:
    (root / "COVID" / "images").mkdir(parents=True)
    (root / "COVID" / "images" / "notes.txt").write_text("nothing")
    (root / "Normal" / "masks").mkdir(parents=True)
    Image.new("L", (64, 64)).save(root / "Normal" / "masks" / "m.png")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (None, "does not exist"),
        (lambda root: root.write_text("not a folder"), "is not a folder"),
        (_no_class_folders, "no class folder found"),
        (_empty_class_folders, "hold no image files"),
    ],
    ids=["missing", "file", "no-class-folders", "no-images"],
)
def test_bad_dataset_folders(tmp_path, setup, message):
    root = tmp_path / "data"
    if setup is not None:
        setup(root)
    with pytest.raises(DatasetError, match=message) as info:
        ingest(root, workers=1)
    assert str(root) in str(info.value)
    if message == "no class folder found":
        assert "Viral Pneumonia" in str(info.value)  # says which names are expected


def test_all_files_unreadable(tmp_path):
    (tmp_path / "Normal").mkdir()
    (tmp_path / "Normal" / "a.png").write_bytes(b"garbage")
    (tmp_path / "Normal" / "b.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 2 image files"):
        ingest(tmp_path, workers=1)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.1, -0.1), (0.5, 0.5), (0.7, 0.6)])
def test_invalid_fractions(val, test):
    df = pd.DataFrame({"path": ["a", "b"], "label": ["covid", "normal"], "origin": ["x", "x"], "group": [0, 1]})
    with pytest.raises(ValueError, match="val \\+ test < 1") as info:
        assign_splits(df, val, test, seed=0)
    assert not isinstance(info.value, DatasetError)
    assert f"val={val}" in str(info.value) and f"test={test}" in str(info.value)


def test_ingest_rejects_invalid_fractions(shared_dataset):
    with pytest.raises(ValueError, match="val \\+ test < 1"):
        ingest(shared_dataset.root, val=0.6, test=0.4, workers=1)


def test_zero_fractions_put_everything_in_train():
    df = pd.DataFrame({"path": list("abcd"), "label": ["covid"] * 4, "origin": ["x"] * 4, "group": [0, 1, 1, 2]})
    assert list(assign_splits(df, 0.0, 0.0, seed=0)) == ["train"] * 4


def test_write_and_load_manifest(ingested, shared_dataset, tmp_path):
    out = tmp_path / "out"
    write_outputs(ingested, shared_dataset.root, out, SETTINGS)
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["dataset_root"] == str(shared_dataset.root.resolve())
    assert meta["settings"] == SETTINGS
    assert (meta["images"], meta["skipped"]) == (shared_dataset.n_images, len(shared_dataset.unreadable))
    assert (meta["duplicate_groups"], meta["exact_duplicate_groups"]) == (2, 1)
    totals = {c: sum(meta["counts"][s][c] for s in ("train", "val", "test")) for c in CLASS_IDS}
    assert totals == shared_dataset.counts
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["path", "reason"]
    assert set(skipped["path"]) == set(shared_dataset.unreadable)

    df = load_manifest(out / "manifest.csv")
    assert list(df.columns) == [*MANIFEST_COLUMNS, "abspath"]
    for rel, absp in zip(df["path"], df["abspath"], strict=True):
        assert Path(absp).is_absolute() and Path(absp) == shared_dataset.root.resolve() / rel
        assert Path(absp).is_file()
    assert df["phash"].str.len().eq(16).all()  # read as text: leading zeros survive
    by_path = df.set_index("path")
    for rel, px in shared_dataset.copy_px.items():
        assert by_path.at[rel, "copy_px"] == px
    unlisted = next(r for r in shared_dataset.files if r not in shared_dataset.copy_px)
    assert by_path.at[unlisted, "copy_px"] == ""


def test_load_manifest_without_json_resolves_beside_csv(tmp_path):
    pd.DataFrame(
        {"path": ["COVID/a.png", "/abs/b.png"], "label": ["covid", "normal"], "split": ["train", "test"]}
    ).to_csv(tmp_path / "manifest.csv", index=False)
    df = load_manifest(tmp_path / "manifest.csv")
    assert list(df["abspath"]) == [str(tmp_path / "COVID/a.png"), "/abs/b.png"]


def test_load_manifest_errors(tmp_path):
    with pytest.raises(DatasetError, match="cxr-triage ingest"):
        load_manifest(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="missing columns"):
        load_manifest(tmp_path / "other.csv")


def test_progress_callback_sees_every_file(shared_dataset):
    seen = {}

    def progress(it, total):
        seen["total"] = total
        for x in it:
            seen["n"] = seen.get("n", 0) + 1
            yield x

    result = ingest(shared_dataset.root, workers=1, progress=progress)
    n_files = shared_dataset.n_images + len(shared_dataset.unreadable)
    assert seen == {"total": n_files, "n": n_files}
    assert len(result.manifest) == shared_dataset.n_images
