"""Dataset folder -> manifest.csv: one row per image with label, hashes, duplicate group, origin and split.

Paths in manifest.csv are relative to the dataset folder, which is recorded as ``dataset_root`` in the
``manifest.json`` beside it (see ``load_manifest``). Same inputs + seed -> byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from cxr_triage.core.classes import CLASS_IDS, class_from_name
from cxr_triage.core.preprocess import IMAGE_SUFFIXES, ImageReadError, load_grey

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "label",
    "sha256",
    "phash",
    "group",
    "origin",
    "copy_px",
    "width",
    "height",
    "mean",
    "split",
]
THUMB = 16


class DatasetError(ValueError):
    """The dataset folder cannot be used; the message says why."""


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    n_dup_groups: int
    n_exact_groups: int


def find_images(root: Path) -> list[tuple[str, str]]:
    """(relative path, class id) of every image file under recognised class folders.

    Accepts ``<Class>/images/*`` and ``<Class>/*`` (any depth); ignores ``masks`` folders and non-image files.
    """
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; give the dataset folder that holds the class folders")
    class_dirs = sorted((d, class_from_name(d.name)) for d in root.iterdir() if d.is_dir())
    class_dirs = [(d, c) for d, c in class_dirs if c is not None]
    if not class_dirs:
        raise DatasetError(
            f"no class folder found in {root}; expected folders named like "
            "COVID, Lung_Opacity, Normal, 'Viral Pneumonia'"
        )
    found: list[tuple[str, str]] = []
    for cdir, cid in class_dirs:
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if d.lower() != "masks")
            for fn in sorted(filenames):
                if Path(fn).suffix.lower() in IMAGE_SUFFIXES:
                    found.append((Path(dirpath, fn).relative_to(root).as_posix(), cid))
    if not found:
        raise DatasetError(f"the class folders in {root} hold no image files (png/jpg/bmp/tif/webp/dcm)")
    return sorted(found)


def hash_image(path: str) -> dict | str:
    """Hashes and simple stats of one image file, or an error sentence."""
    try:
        data = Path(path).read_bytes()
        grey = load_grey(data, name=Path(path).name)
    except (ImageReadError, OSError) as exc:
        return str(exc)
    im = Image.fromarray(grey)
    thumb = np.asarray(im.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": str(imagehash.phash(im)),
        "thumb": thumb.tobytes(),
        "width": grey.shape[1],
        "height": grey.shape[0],
        "mean": round(float(grey.mean()), 2),
    }


def read_origins(root: Path) -> pd.DataFrame:
    """Origin (and copy_px where known) per relative path from sources.csv or <Class>.metadata.xlsx files."""
    src = root / "sources.csv"
    if src.exists():
        df = pd.read_csv(src, dtype=str)
        if {"file", "origin"} <= set(df.columns):
            cols = ["file", "origin"] + (["copy_px"] if "copy_px" in df.columns else [])
            return df[cols].rename(columns={"file": "path"})
        log.warning("%s lacks 'file' and 'origin' columns; origins unknown", src)
    frames = []
    for xlsx in sorted(root.glob("*.metadata.xlsx")):
        try:
            meta = pd.read_excel(xlsx, dtype=str)
        except Exception as exc:  # openpyxl missing or broken file: origins stay unknown
            log.warning("cannot read %s (%s); origins unknown for it", xlsx.name, exc)
            continue
        meta.columns = [c.strip().upper() for c in meta.columns]
        if {"FILE NAME", "URL"} <= set(meta.columns):
            frames.append(
                pd.DataFrame(
                    {
                        "stem": meta["FILE NAME"].str.strip().str.lower(),
                        "origin": meta["URL"].map(lambda u: urlparse(str(u)).netloc or str(u).strip() or "unknown"),
                    }
                )
            )
    return pd.concat(frames) if frames else pd.DataFrame(columns=["path", "origin"])


def _near_pairs(phashes: list[str], thumbs: np.ndarray, max_dist: int, min_corr: float) -> Iterable[tuple]:
    """Index pairs whose perceptual hashes differ in <= max_dist bits and whose thumbnails correlate >= min_corr."""
    h = np.array([int(p, 16) for p in phashes], dtype=np.uint64)
    t = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    t -= t.mean(1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-6
    for start in range(0, len(h), 1024):
        block = h[start : start + 1024]
        dist = np.bitwise_count(block[:, None] ^ h[None, :])
        ii, jj = np.nonzero(dist <= max_dist)
        ii += start
        keep = jj > ii
        for i, j in zip(ii[keep], jj[keep], strict=True):
            if float(t[i] @ t[j]) >= min_corr:
                yield int(i), int(j)


def group_duplicates(
    df: pd.DataFrame, thumbs: np.ndarray, max_dist: int = 10, min_corr: float = 0.99
) -> tuple[np.ndarray, int, int]:
    """Union-find over identical sha256 and near-identical images. Returns group ids and group counts."""
    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[str, int] = {}
    for i, sha in enumerate(df["sha256"]):
        if sha in first:
            union(first[sha], i)
        else:
            first[sha] = i
    for i, j in _near_pairs(list(df["phash"]), thumbs, max_dist, min_corr):
        union(i, j)
    roots = np.array([find(i) for i in range(len(df))])
    _, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    n_exact_groups = int((df["sha256"].value_counts() > 1).sum())
    return inverse, int((counts > 1).sum()), n_exact_groups


def assign_splits(df: pd.DataFrame, val: float, test: float, seed: int) -> pd.Series:
    """Stratified (label x origin) split that keeps every duplicate group on one side."""
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"need 0 <= val, test and val + test < 1; got val={val}, test={test}")
    groups = (
        df.groupby("group")
        .agg(label=("label", lambda s: s.mode().iloc[0]), origin=("origin", "first"), n=("path", "size"))
        .reset_index()
    )
    rng = np.random.default_rng(seed)
    split_of: dict[int, str] = {}
    for _, stratum in groups.sort_values("group").groupby(["label", "origin"], sort=True):
        order = rng.permutation(len(stratum))
        total = stratum["n"].sum()
        n_test, n_val = round(total * test), round(total * val)
        done = 0
        for k in order:
            g = stratum.iloc[k]
            split_of[int(g["group"])] = "test" if done < n_test else "val" if done < n_test + n_val else "train"
            done += int(g["n"])
    return df["group"].map(split_of)


def ingest(
    root: Path,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
) -> IngestResult:
    """Scan, hash, group and split a dataset folder. ``progress(iterable, total)`` wraps the hashing loop."""
    root = Path(root).resolve()
    files = find_images(root)
    paths = [str(root / rel) for rel, _ in files]
    workers = workers or min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(hash_image, paths, chunksize=64)
        if progress is not None:
            results = progress(results, len(paths))
        results = list(results)
    rows, skipped, thumbs = [], [], []
    for (rel, cid), res in zip(files, results, strict=True):
        if isinstance(res, str):
            skipped.append({"path": rel, "reason": res})
            continue
        thumbs.append(np.frombuffer(res.pop("thumb"), np.uint8))
        rows.append({"path": rel, "label": cid, **res})
    if not rows:
        raise DatasetError(f"none of the {len(files)} image files in {root} could be read")
    df = pd.DataFrame(rows)
    origins = read_origins(root)
    if "path" in origins.columns and len(origins):
        df = df.merge(origins.drop_duplicates("path"), on="path", how="left")
    elif len(origins):
        stems = df["path"].map(lambda p: Path(p).stem.lower())
        df["origin"] = stems.map(origins.drop_duplicates("stem").set_index("stem")["origin"])
    for col in ("origin", "copy_px"):
        if col not in df.columns:
            df[col] = pd.NA
    df["origin"] = df["origin"].fillna("unknown")
    df["copy_px"] = df["copy_px"].fillna("")
    df["group"], n_groups, n_exact = group_duplicates(df, np.stack(thumbs))
    df["split"] = assign_splits(df, val, test, seed)
    return IngestResult(df[MANIFEST_COLUMNS], pd.DataFrame(skipped, columns=["path", "reason"]), n_groups, n_exact)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temporary sibling and rename, so a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` by rename (no half-written folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle must be readable by a service user
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_outputs(result: IngestResult, root: Path, out_dir: Path, settings: dict) -> None:
    """manifest.csv, manifest.json (dataset root, settings, counts) and skipped.csv, each written atomically."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "manifest.csv", result.manifest.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(out_dir / "skipped.csv", result.skipped.to_csv(index=False, lineterminator="\n"))
    m = result.manifest
    meta = {
        "dataset_root": str(Path(root).resolve()),
        "paths": "relative to dataset_root",
        "settings": settings,
        "images": len(m),
        "skipped": len(result.skipped),
        "duplicate_groups": result.n_dup_groups,
        "exact_duplicate_groups": result.n_exact_groups,
        "counts": {
            s: {c: int(((m["split"] == s) & (m["label"] == c)).sum()) for c in CLASS_IDS}
            for s in ("train", "val", "test")
        },
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_manifest(path: Path) -> pd.DataFrame:
    """Read manifest.csv and add ``abspath`` using the dataset root recorded in manifest.json beside it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"manifest {path} does not exist; run `cxr-triage ingest DATASET --out DIR` first")
    df = pd.read_csv(path, dtype={"phash": str, "sha256": str, "copy_px": str, "origin": str}, keep_default_na=False)
    missing = {"path", "label", "split"} - set(df.columns)
    if missing:
        raise DatasetError(f"{path} is not a cxr-triage manifest (missing columns {sorted(missing)})")
    meta_path = path.with_name("manifest.json")
    root = Path(json.loads(meta_path.read_text())["dataset_root"]) if meta_path.exists() else path.parent
    df["abspath"] = [str(p) if Path(p).is_absolute() else str(root / p) for p in df["path"]]
    return df
