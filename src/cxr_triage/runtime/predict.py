"""What predictions are drawn and read with: the input list (``collect_inputs``) and heatmap overlays over the image.

The route itself is ``runtime.predictor.Predictor``; CSV, JSON and the CLI table are rendered from its predictions
by ``formats.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from cxr_triage.core.geometry import SquareMap, resize_mask
from cxr_triage.core.lungs import outline, view_box
from cxr_triage.core.preprocess import PreprocessSpec
from cxr_triage.runtime.inputs import scan_inputs
from cxr_triage.runtime.prediction import png_bytes

__all__ = ["collect_inputs", "fit", "heat_field", "overlay", "png_bytes"]


def collect_inputs(items: Iterable[str]) -> list[str]:
    """Files as given, folders searched recursively, globs expanded; order kept, no repeats (see ``runtime.inputs``:
    every named path and every scanned entry that may be an image gets a row)."""
    return scan_inputs(items).paths


def jet(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with the jet colour map (no matplotlib on the predict path)."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * x - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def fit(grey: np.ndarray, max_side: int = 512) -> np.ndarray:
    """The grey image shrunk to at most ``max_side`` on its long side (aspect kept): what overlays are drawn on."""
    h, w = grey.shape
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return grey
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))


def heat_field(h: int, w: int, cam: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The class activation map on an (h, w) image, in [0, 1].

    The map is placed where the model's square came from (inside the trimmed border; for ``crop`` the centre
    square, for ``pad`` the image part of the letterbox) and extended to the edges with its nearest values over
    the trimmed border and any cropped-away side, so the overlay covers the whole image and leaves no frame.
    """
    return SquareMap(spec, (h, w)).invert(np.asarray(cam, np.float32), outside="edge").clip(0, 1)


def overlay(
    grey: np.ndarray,
    cam: np.ndarray,
    spec: PreprocessSpec,
    alpha: float = 0.4,
    max_side: int = 512,
    lungs: np.ndarray | None = None,
) -> np.ndarray:
    """The heatmap over the original image (its aspect ratio kept, the whole image covered): RGB uint8.
    ``lungs`` (the image's lung mask) draws the lung outline; lung-view classifiers' maps cover the lungs' box."""
    base = fit(grey, max_side).astype(np.float32)
    h, w = base.shape
    small = resize_mask(lungs, (h, w)) if lungs is not None else None
    if spec.lungs != "none":
        y0, y1, x0, x1 = view_box(small if small is not None else np.zeros((h, w), bool), spec.lung_margin)
        heat = np.zeros((h, w), np.float32)
        cam_img = Image.fromarray(cam.astype(np.float32)).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        heat[y0:y1, x0:x1] = np.asarray(cam_img).clip(0, 1)
    else:
        heat = heat_field(h, w, cam, spec)
    rgb = (1 - alpha * heat[..., None]) * base[..., None] + alpha * heat[..., None] * jet(heat)
    if small is not None:
        rgb[outline(small, width=max(1, round(max(h, w) / 256)))] = (0, 255, 255)  # lung outline in cyan
    return np.clip(rgb, 0, 255).astype(np.uint8)
