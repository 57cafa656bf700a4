"""The one preprocessing function: image file / bytes / array -> model input. numpy + Pillow only.

Every stage (training's cache and validation, evaluate, predict, the service) goes through
``prepare`` (decode -> grey uint8 square) and ``normalise`` (uint8 -> float32 CHW): the model input of one
image is ``normalise(prepare(source, spec), spec)``. The ``PreprocessSpec`` travels inside every checkpoint
and bundle.
"""

from __future__ import annotations

import numpy as np

from cxr_triage.core.decode import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    Source,
    colourfulness,
    load_grey,
)
from cxr_triage.core.errors import ImageReadError
from cxr_triage.core.geometry import PreprocessSpec, square
from cxr_triage.core.limits import MAX_PIXELS, MIN_SIDE
from cxr_triage.core.lungs import lung_view

__all__ = [  # the decoding and geometry names are re-exported here, where every stage has always imported them from
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
    "square",
]


def model_square(grey: np.ndarray, spec: PreprocessSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """The square uint8 model input of a decoded grey image: ``square`` for whole-image specs, the lung view
    (``core.lungs.lung_view``) when ``spec.lungs`` is set, for which ``mask`` is the image's lung mask."""
    if spec.lungs == "none":
        return square(grey, spec)
    return lung_view(grey, mask, spec.size, spec.lungs, spec.lung_margin)


def prepare(source: Source, spec: PreprocessSpec, name: str = "") -> np.ndarray:
    """Decode and square an image: uint8 array of shape (spec.size, spec.size). Training caches this."""
    return square(load_grey(source, name), spec)


def normalise(u8: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (..., H, W) -> float32 (..., 1, H, W) scaled by the spec's mean and std."""
    x = u8.astype(np.float32) * (1.0 / 255.0)
    x = (x - spec.mean) / spec.std
    return x[..., None, :, :]
