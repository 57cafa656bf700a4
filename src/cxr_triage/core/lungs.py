"""Lung masks without torch: clean-up, geometry, the lung views of the classifier input, lung attention.

A lung mask here is a 2-D bool array over an image (any size). The segmenter's raw output is cleaned by
``cleaned`` (the two largest components, holes filled); ``lung_box`` and ``lung_stats`` describe it;
``lung_view`` turns (grey image, mask) into the classifier's square input for ``PreprocessSpec.lungs`` =
``crop`` (the lungs' bounding box plus a margin) or ``mask`` (the same, zero outside the mask, the lung
intensities equalised inside the mask only, so that the mask's size cannot shift the grey levels).
``lung_atlas`` / ``atlas_overlap``: where lungs usually are (the mean of the segmenter's training masks on a coarse
grid) and how much a mask overlaps it: the lung gate's layout check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from cxr_triage.core.geometry import PreprocessSpec, SquareMap, resize_mask

MIN_LUNG_FRACTION = 0.02  # a lung component smaller than this share of the image is noise
# lung area share outside which predict rejects / abstains (validation split: 0.061 to 0.60, see RESULTS.md); the
# layout overlap below which it rejects, for two or more lung fields / one single field (validation: >= 0.19 / >= 0.50)
LUNG_GATE = {"min_area": 0.03, "max_area": 0.65, "min_layout": 0.15, "min_layout_one_field": 0.45}
ATLAS_SIDE = 32  # the lung atlas grid (32 x 32 cells over the segmenter's square)


@dataclass(frozen=True)
class LungStats:
    """What a mask says about the image: lung area share, whether each side holds a lung, how many separate lung
    fields (connected components) it has and, given an atlas, its overlap with where lungs usually are."""

    area_fraction: float
    left_found: bool  # the patient's left lung: the image's right half (radiological convention)
    right_found: bool
    fields: int = 2
    layout: float | None = None  # atlas_overlap, None without an atlas

    @property
    def both_found(self) -> bool:
        return self.left_found and self.right_found


def cleaned(mask: np.ndarray, keep: int = 2) -> tuple[np.ndarray, int]:
    """Keep the ``keep`` largest connected components (each at least MIN_LUNG_FRACTION / 4 of the image), fill
    holes: (bool array of the same shape, its number of connected components (lung fields), known from the
    clean-up: labelled again only when two kept fields may have been joined by a filled hole)."""
    mask = np.asarray(mask, bool)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask, 0
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:keep]
    order = [i for i in order if sizes[i] >= MIN_LUNG_FRACTION / 4 * mask.size]
    keep_label = np.zeros(n + 1, bool)
    keep_label[np.asarray(order, int) + 1] = True
    out, filled = _fill_holes(keep_label[labels])
    return out, len(order) if len(order) < 2 or not filled else int(ndimage.label(out)[1])


def _fill_holes(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the mask with its holes filled, whether any hole was filled): background components that do not touch the
    border become foreground (one labelling pass; scipy's ``binary_fill_holes`` dilates iteratively and is ~10x
    slower at these sizes)."""
    mask = np.asarray(mask, bool)
    bg, n = ndimage.label(~mask)
    if n == 0:
        return mask, False
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    hole = np.ones(n + 1, bool)
    hole[edge] = False
    hole[0] = False
    return (mask | hole[bg], True) if hole.any() else (mask, False)


def lung_stats(mask: np.ndarray, atlas: np.ndarray | None = None, fields: int | None = None) -> LungStats:
    """Area share, per-side presence (a side counts when it holds >= MIN_LUNG_FRACTION / 2 of the image), the
    number of lung fields (counted here unless ``cleaned`` already did) and, with an ``atlas``, the layout
    overlap."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    half = w // 2
    need = MIN_LUNG_FRACTION / 2 * mask.size
    return LungStats(
        area_fraction=float(np.count_nonzero(mask) / mask.size),
        right_found=bool(np.count_nonzero(mask[:, :half]) >= need),
        left_found=bool(np.count_nonzero(mask[:, half:]) >= need),
        fields=int(ndimage.label(mask)[1]) if fields is None else fields,
        layout=atlas_overlap(mask, atlas) if atlas is not None else None,
    )


def coarse(mask: np.ndarray, side: int = ATLAS_SIDE) -> np.ndarray:
    """A mask's share of lung per cell of a side x side grid over it (float32 in [0, 1]): block means when the
    grid divides the mask (the segmenter's square), else PIL's box filter (the same means, fractional cells)."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if h % side == 0 and w % side == 0:  # rows of each cell, then its columns (one multi-axis sum is ~3x slower)
        rows = mask.view(np.uint8).reshape(side, h // side, w).sum(axis=1)
        return rows.reshape(side, side, w // side).sum(axis=2).astype(np.float32) / ((h // side) * (w // side))
    im = Image.fromarray(mask.astype(np.float32))
    return np.asarray(im.resize((side, side), Image.Resampling.BOX), np.float32)


def lung_atlas(masks: Iterable[np.ndarray], side: int = ATLAS_SIDE) -> np.ndarray:
    """Where lungs usually are: the mean of ``coarse`` masks (each over its own image, so any size)."""
    grids = [coarse(m, side) for m in masks]
    if not grids:
        raise ValueError("a lung atlas needs at least one mask")
    return np.mean(grids, axis=0).astype(np.float32)


def atlas_overlap(mask: np.ndarray, atlas: np.ndarray) -> float:
    """Soft Dice between a mask (on the coarse grid) and the atlas: about 0.7 for a frontal chest X-ray's two lungs,
    low when the 'lungs' found are somewhere else (a photograph, a drawing)."""
    grid = coarse(mask, atlas.shape[0])
    total = float(grid.sum() + atlas.sum())
    return 2 * float((grid * atlas).sum()) / total if total > 0 else 0.0


def lung_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the mask's bounding box grown by ``margin`` x its size per side, clipped; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    h, w = mask.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    my, mx = round((y1 - y0) * margin), round((x1 - x0) * margin)
    return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)


def equalize_inside(u8: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Histogram-equalise the pixels inside ``inside`` to 1..255; outside becomes 0 (0 means 'not lung')."""
    out = np.zeros_like(u8)
    vals = u8[inside]
    if vals.size == 0:
        return out
    hist = np.bincount(vals, minlength=256).astype(np.float64)
    cdf = np.cumsum(hist)
    lut = 1 + np.floor(254 * (cdf - cdf[vals.min()]) / max(cdf[-1] - cdf[vals.min()], 1))
    out[inside] = np.clip(lut, 1, 255).astype(np.uint8)[vals]
    return out


def lung_view(grey: np.ndarray, mask: np.ndarray | None, size: int, mode: str, margin: float) -> np.ndarray:
    """The classifier's square uint8 input from the grey image and its lung mask (any resolution).

    ``crop``: the lungs' box plus margin, resized (stretch) to ``size`` and equalised. ``mask``: the same box, zero
    outside the mask (no dilation: masks from other segmenters end exactly at their outline too), equalised inside
    only. No lungs (mask None or empty): the whole image is used (``mask`` mode: an all-zero input), and the
    caller's lung gate decides what to say.
    """
    if mode not in ("crop", "mask"):
        raise ValueError(f"lung view mode must be 'crop' or 'mask', got {mode!r}")
    m = resize_mask(mask, grey.shape) if mask is not None else np.zeros(grey.shape, bool)
    box = view_box(m, margin)
    if mode == "mask" and not m.any():
        return np.zeros((size, size), np.uint8)
    crop = crop_resize(grey, box, size)
    if mode == "crop":
        return np.asarray(ImageOps.equalize(Image.fromarray(crop)), np.uint8)
    return equalize_inside(crop, crop_resize(m, box, size))


def view_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """The image region a lung view shows: the mask's box plus margin, or the whole image when there is no lung."""
    return lung_box(mask, margin) or (0, mask.shape[0], 0, mask.shape[1])


def crop_resize(arr: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """``arr[box]`` resized to size x size: bilinear for uint8 images, half-threshold for bool masks."""
    y0, y1, x0, x1 = box
    part = np.ascontiguousarray(arr[y0:y1, x0:x1])
    if part.dtype == bool:
        return resize_mask(part, (size, size))
    return np.asarray(Image.fromarray(part).resize((size, size), Image.Resampling.BILINEAR), np.uint8)


def input_mask(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The image's lung mask in the classifier input's coordinates (what its heatmap covers): bool size x size; the
    spec's square (``SquareMap.apply``) or, for lung-view specs, the lung view's box."""
    mask = np.asarray(mask, bool)
    if spec.lungs == "none":
        return SquareMap(spec, mask.shape).apply(mask)
    return crop_resize(mask, view_box(mask, spec.lung_margin), spec.size)


@lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """PIL's bilinear resampling of n_in samples to n_out as an (n_out, n_in) matrix (PIL run on the identity), so
    that ``bilinear_matrix(h, H) @ a @ bilinear_matrix(w, W).T`` is PIL's float resize of ``a`` (within 1e-6)."""
    eye = Image.fromarray(np.eye(n_in, dtype=np.float32))
    return np.asarray(eye.resize((n_in, n_out), Image.Resampling.BILINEAR), np.float32)


def lung_attention(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the class-activation mass (cam >= 0 after bilinear resizing to the mask's size) that falls inside
    the lung mask. The resize is PIL's bilinear one written as two small matrix products (``bilinear_matrix``)."""
    cam, mask = np.asarray(cam, np.float32), np.asarray(mask, bool)
    if cam.shape != mask.shape:
        (h, w), (big_h, big_w) = cam.shape, mask.shape
        cam = bilinear_matrix(h, big_h) @ cam @ bilinear_matrix(w, big_w).T
    cam = np.maximum(cam, 0)
    total = float(cam.sum())
    return float(cam[mask].sum() / total) if total > 0 else 0.0


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The mask's boundary pixels (bool), ``width`` pixels wide: what overlays draw."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width)
