"""Lung-view caches for the classifier: pool images through the segmenter, and lung-masked extra sets.

``preprocess.lungs`` = ``crop`` or ``mask`` makes every training, validation and export image go through the lung
segmenter (an onnxruntime bundle, the same one ``predict`` uses) and ``core.lungs.lung_view``. A lung-masked extra
set (``data.extra_masked``: RSNA images masked and intensity-inverted by someone else's network, see
``../shared/data/README.md``) is brought to the same representation: its mask is where the image is not black, its
lungs are inverted back, then the same ``lung_view`` (``mask`` mode only; those images have nothing outside the lungs).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cxr_triage.core.classes import CLASS_IDS, class_from_name
from cxr_triage.core.lungs import lung_view
from cxr_triage.core.preprocess import PreprocessSpec, load_grey, model_square
from cxr_triage.training.datasets import cache_key, save_atomic

log = logging.getLogger(__name__)
BLACK = 12  # grey level at or below which a masked image is 'outside the mask' (JPEG ringing stays below it)


def build_lung_cache(
    df: pd.DataFrame,
    spec: PreprocessSpec,
    cache_dir: Path,
    segmenter_dir: Path | None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    batch: int = 64,
) -> np.ndarray:
    """uint8 (N, size, size) lung views of every manifest row, cached per (rows, spec, segmenter)."""
    from cxr_triage.runtime.segment import LungSegmenter

    seg = LungSegmenter(segmenter_dir)
    target = Path(cache_dir) / f"lungs-{cache_key(df, spec)}-{seg.meta['onnx_sha256'][:12]}-{spec.size}.npy"
    if target.exists():
        arr = np.load(target, mmap_mode="r")
        if arr.shape == (len(df), spec.size, spec.size):
            return arr
    target.parent.mkdir(parents=True, exist_ok=True)
    out = np.empty((len(df), spec.size, spec.size), np.uint8)
    starts: Iterable[int] = range(0, len(df), batch)
    if progress is not None:
        starts = progress(starts, len(range(0, len(df), batch)))
    for i in starts:
        greys = [load_grey(p) for p in df["abspath"].iloc[i : i + batch]]
        for j, (g, m) in enumerate(zip(greys, seg.masks(greys), strict=True)):
            out[i + j] = model_square(g, spec, m)
    save_atomic(target, out)
    return out


def masked_extra_view(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """An already lung-masked, inverted image -> the ``mask`` lung view (its own mask, lungs inverted back)."""
    mask = ndimage.binary_opening(grey > BLACK, iterations=1)
    labels, n = ndimage.label(mask)
    if n:  # specks: components under 0.5 % of the image (their holes are kept: they are that party's, see trap 4)
        sizes = np.bincount(labels.ravel())
        mask = (sizes >= 0.005 * mask.size)[labels] & mask
    return lung_view(255 - grey, mask, spec.size, "mask", spec.lung_margin)


def load_extra_masked(root: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows (abspath, label) of a lung-masked extra set that may be used for training without leaking.

    Kept: images whose pool twin (``same_patient_as``) is in the train split, and Lung Opacity images with no known
    twin (new patients). Dropped: any image whose twin is in validation/test, and Normals with no identified twin
    (every Normal there is a copy of some pool Normal, possibly one in validation or test)."""
    root = Path(root)
    src = pd.read_csv(root / "sources.csv")
    split_of = dict(zip(manifest["path"].map(lambda p: Path(p).name), manifest["split"], strict=True))
    twin = src["same_patient_as"].fillna("").map(lambda t: Path(t).name if t else "")
    twin_split = twin.map(lambda t: split_of.get(t, "unknown") if t else "")
    label = src["label"].map(class_from_name)
    keep = (twin_split == "train") | ((twin == "") & (label == "lung_opacity"))
    out = pd.DataFrame({"abspath": [str(root / f) for f in src["file"]], "label": label})[keep.to_numpy()]
    if out["label"].isna().any() or not set(out["label"]) <= set(CLASS_IDS):
        raise ValueError(f"{root}/sources.csv has labels outside {CLASS_IDS}")
    log.info(
        "extra masked set: %d kept of %d (%s); dropped %d with a twin outside train, %d Normals without a known twin",
        len(out),
        len(src),
        out["label"].value_counts().to_dict(),
        int(((twin_split != "train") & (twin != "")).sum()),
        int(((twin == "") & (label == "normal")).sum()),
    )
    return out.reset_index(drop=True)


def build_extra_cache(rows: pd.DataFrame, spec: PreprocessSpec, cache_dir: Path) -> np.ndarray:
    """uint8 (N, size, size) lung views of an extra masked set, cached."""
    h = hashlib.sha256(repr((sorted(spec.to_dict().items()), BLACK, list(rows["abspath"]))).encode())
    target = Path(cache_dir) / f"extra-{h.hexdigest()[:16]}-{spec.size}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    target.parent.mkdir(parents=True, exist_ok=True)
    out = np.stack([masked_extra_view(load_grey(p), spec) for p in rows["abspath"]])
    save_atomic(target, out)
    return out
