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
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from cxr_triage.core.classes import CLASS_IDS, class_from_name
from cxr_triage.core.lungs import input_mask, lung_box, lung_view, resize_mask
from cxr_triage.core.preprocess import PreprocessSpec, load_grey, model_square
from cxr_triage.training.datasets import cache_key, masked_item, save_atomic

log = logging.getLogger(__name__)
BLACK = 12  # grey level at or below which a masked image is 'outside the mask' (JPEG ringing stays below it)


def _segmented_cache(
    kind: str,
    each: Callable[[np.ndarray, np.ndarray], np.ndarray],
    dtype: type,
    df: pd.DataFrame,
    spec: PreprocessSpec,
    cache_dir: Path,
    segmenter_dir: Path | None,
    progress: Callable[[Iterable, int], Iterable] | None,
    batch: int,
) -> np.ndarray:
    """(N, size, size) of ``each(grey, lung mask)`` for every manifest row through the segmenter, cached per
    (kind, rows, spec, segmenter)."""
    from cxr_triage.runtime.segment import LungSegmenter

    seg = LungSegmenter(segmenter_dir)
    target = Path(cache_dir) / f"{kind}-{cache_key(df, spec)}-{seg.meta['onnx_sha256'][:12]}-{spec.size}.npy"
    if target.exists():
        arr = np.load(target, mmap_mode="r")
        if arr.shape == (len(df), spec.size, spec.size):
            return arr
    target.parent.mkdir(parents=True, exist_ok=True)
    out = np.zeros((len(df), spec.size, spec.size), dtype)
    starts: Iterable[int] = range(0, len(df), batch)
    if progress is not None:
        starts = progress(starts, len(range(0, len(df), batch)))
    for i in starts:
        greys = [load_grey(p) for p in df["abspath"].iloc[i : i + batch]]
        for j, (g, m) in enumerate(zip(greys, seg.masks(greys), strict=True)):
            out[i + j] = each(g, m)
    save_atomic(target, out)
    return out


def build_lung_cache(
    df: pd.DataFrame,
    spec: PreprocessSpec,
    cache_dir: Path,
    segmenter_dir: Path | None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    batch: int = 64,
) -> np.ndarray:
    """uint8 (N, size, size) lung views of every manifest row, cached per (rows, spec, segmenter)."""
    view = lambda g, m: model_square(g, spec, m)  # noqa: E731
    return _segmented_cache("lungs", view, np.uint8, df, spec, cache_dir, segmenter_dir, progress, batch)


def build_mask_cache(
    df: pd.DataFrame,
    spec: PreprocessSpec,
    cache_dir: Path,
    segmenter_dir: Path | None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    batch: int = 64,
) -> np.ndarray:
    """bool (N, size, size): every manifest row's lung mask (the segmenter's, as ``predict`` computes it) in the
    classifier input's coordinates (``core.lungs.input_mask``), cached per (rows, spec, segmenter). Lung guidance
    of a whole-image network reads it."""
    mask = lambda g, m: input_mask(m, spec)  # noqa: E731
    return _segmented_cache("masks", mask, bool, df, spec, cache_dir, segmenter_dir, progress, batch)


def composite(
    donor: np.ndarray, donor_mask: np.ndarray, view: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """A whole image made of a donor's body and another patient's lungs: (uint8 image, bool lung mask), or None.

    ``donor`` and ``donor_mask`` are a whole-image square and its lung mask; ``view`` is a ``mask`` lung view (0
    outside the lungs, equalised inside) of another image. The view is stretched onto the donor's lung box (the
    box a lung view shows) and its lung pixels take the donor's own lung grey levels by rank (quantile mapping), so
    brightness and contrast are the donor's and the pattern inside the lungs is the other patient's."""
    box = lung_box(donor_mask, margin)
    inside = np.asarray(donor_mask, bool)
    if box is None or inside.sum() < 0.05 * inside.size or not (view > 0).any():
        return None
    y0, y1, x0, x1 = box
    part = np.asarray(Image.fromarray(view).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), np.uint8)
    pasted = resize_mask(view > 0, (y1 - y0, x1 - x0))
    levels = np.sort(donor[inside])
    q = (np.clip(part.astype(np.float32), 1, 255) - 1) / 254
    out, mask = donor.copy(), inside.copy()
    region = out[y0:y1, x0:x1]
    region[pasted] = levels[np.minimum((q[pasted] * (len(levels) - 1)).round().astype(int), len(levels) - 1)]
    mask[y0:y1, x0:x1] |= pasted
    return out, mask


class CompositeImages(Dataset):
    """Extra lung-masked images as whole images (``composite`` onto a random donor per draw), with lung masks:
    items like ``CachedImages`` with masks. Donors should be one split's normals of the extra set's own source."""

    def __init__(
        self,
        views: np.ndarray,
        labels: np.ndarray,
        donors: np.ndarray,
        donor_masks: np.ndarray,
        spec: PreprocessSpec,
        augment: Callable | None,
    ) -> None:
        self.views, self.labels, self.donors, self.donor_masks = views, labels, donors, donor_masks
        self.spec, self.augment = spec, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        view = np.asarray(self.views[i])
        for _ in range(8):
            k = int(torch.randint(len(self.donors), (1,)))
            donor, donor_mask = np.asarray(self.donors[k]), np.asarray(self.donor_masks[k])
            made = composite(donor, donor_mask, view, self.spec.lung_margin)
            if made is not None:
                return masked_item(
                    made[0], torch.from_numpy(made[1])[None], int(self.labels[i]), self.spec, self.augment
                )
        raise ValueError(f"no donor with lungs found for extra image {i}")


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
    src = pd.read_csv(root / "sources.csv", dtype={"same_patient_as": str})
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
