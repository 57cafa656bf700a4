"""The one preprocessing function: image file / bytes / array -> model input. numpy + Pillow only.

Every stage (training's cache and validation, evaluate, predict, the service) goes through
``prepare`` (decode -> grey uint8 square) and ``normalise`` (uint8 -> float32 CHW); ``preprocess``
is the two together. The ``PreprocessSpec`` travels inside every checkpoint and bundle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cxr_triage.core.decode import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    Source,
    colourfulness,
    load_grey,
)
from cxr_triage.core.errors import ImageReadError
from cxr_triage.core.limits import MAX_PIXELS, MIN_SIDE

__all__ = [  # the decoding names are re-exported here, where every stage has always imported them from
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageReadError",
    "PreprocessSpec",
    "Source",
    "colourfulness",
    "load_grey",
    "normalise",
    "prepare",
    "preprocess",
    "square",
]


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input. Stored in checkpoints and model.json."""

    size: int = 224
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    resize: str = "stretch"  # "stretch" (as the public dataset did), "pad" (letterbox) or "crop" (centre)
    border: float = 0.0  # fraction trimmed from every side before resizing (burned-in markers live there)
    equalize: bool = False  # global histogram equalisation (removes scanner/hospital contrast cues)
    lungs: str = "none"  # "none" (whole image), "crop" (lungs' box + margin) or "mask" (box, zero outside the lungs)
    lung_margin: float = 0.08  # box margin per side, as a share of the lungs' box (lung views only)

    def __post_init__(self) -> None:
        if self.size < MIN_SIDE:
            raise ValueError(f"preprocess size must be >= {MIN_SIDE}, got {self.size}")
        if self.channels != 1:
            raise ValueError("only single-channel (grey) models are supported: set channels: 1")
        if self.resize not in ("stretch", "pad", "crop"):
            raise ValueError(f"resize must be 'stretch', 'pad' or 'crop', got {self.resize!r}")
        if not 0.0 <= self.border < 0.25:
            raise ValueError(f"border must be in [0, 0.25), got {self.border}")
        if self.std <= 0:
            raise ValueError("std must be positive")
        if self.lungs not in ("none", "crop", "mask"):
            raise ValueError(f"lungs must be 'none', 'crop' or 'mask', got {self.lungs!r}")
        if not 0.0 <= self.lung_margin <= 0.5:
            raise ValueError(f"lung_margin must be in [0, 0.5], got {self.lung_margin}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Build a spec from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def square(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Trim the border, make square by the spec's rule, resize to spec.size, optionally equalise."""
    h, w = grey.shape
    if spec.border > 0:
        dy, dx = int(round(h * spec.border)), int(round(w * spec.border))
        grey = grey[dy : h - dy, dx : w - dx]
        h, w = grey.shape
    if spec.resize == "crop" and h != w:
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        grey = grey[y0 : y0 + s, x0 : x0 + s]
    elif spec.resize == "pad" and h != w:
        s = max(h, w)
        canvas = np.zeros((s, s), np.uint8)
        y0, x0 = (s - h) // 2, (s - w) // 2
        canvas[y0 : y0 + h, x0 : x0 + w] = grey
        grey = canvas
    im = Image.fromarray(grey)
    if im.size != (spec.size, spec.size):
        im = im.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    if spec.equalize:
        im = ImageOps.equalize(im)
    return np.asarray(im, dtype=np.uint8)


def model_square(grey: np.ndarray, spec: PreprocessSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """The square uint8 model input of a decoded grey image: ``square`` for whole-image specs, the lung view
    (``core.lungs.lung_view``) when ``spec.lungs`` is set, for which ``mask`` is the image's lung mask."""
    if spec.lungs == "none":
        return square(grey, spec)
    from cxr_triage.core.lungs import lung_view  # core.lungs imports this module

    return lung_view(grey, mask, spec.size, spec.lungs, spec.lung_margin)


def prepare(source: Source, spec: PreprocessSpec, name: str = "") -> np.ndarray:
    """Decode and square an image: uint8 array of shape (spec.size, spec.size). Training caches this."""
    return square(load_grey(source, name), spec)


def normalise(u8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (..., H, W) -> float32 (..., 1, H, W) scaled by the spec's mean and std."""
    x = u8.astype(np.float32) * (1.0 / 255.0)
    x = (x - spec.mean) / spec.std
    return x[..., None, :, :]


def preprocess(source: Source, spec: PreprocessSpec, name: str = "") -> np.ndarray:
    """The model input for one image: float32 array of shape (1, spec.size, spec.size)."""
    return normalise(prepare(source, spec, name), spec)
