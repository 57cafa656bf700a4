"""The geometry of the model input, defined once: ``PreprocessSpec`` (how an image becomes a model input; stored in
checkpoints and model.json), ``SquareMap`` (one spec's border trim and square rule on one image shape, both ways:
``apply`` makes the square, ``invert`` puts a square-sized array back onto the image, ``crop_of`` maps another spec's
square into this one's) and ``square`` (``apply`` plus the optional equalisation). numpy + Pillow.

``core.preprocess`` (the preprocessing function), ``core.lungs`` (the lung views, the input mask) and the runtime's
heatmaps and lung masks all build on this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from cxr_triage.core.limits import MIN_SIDE


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


Box = tuple[int, int, int, int]  # (y0, y1, x0, x1): rows y0..y1-1, columns x0..x1-1


@dataclass(frozen=True)
class SquareMap:
    """A spec's border trim and square rule on an image of ``shape`` (h, w), both ways. ``trim`` is the image region
    kept after the border trim; ``window`` is the image region the square shows: the trimmed region (``stretch``,
    or any rule when it is already square), its centre square (``crop``) or the square around it (``pad``; it
    reaches past the trimmed region, where the square is zero). The spec's lung view (``spec.lungs``) is not part
    of this geometry: ``core.lungs`` makes those."""

    spec: PreprocessSpec
    shape: tuple[int, int]

    @property
    def trim(self) -> Box:
        h, w = self.shape
        dy, dx = round(h * self.spec.border), round(w * self.spec.border)
        return dy, h - dy, dx, w - dx

    @property
    def window(self) -> Box:
        y0, y1, x0, x1 = self.trim
        ih, iw = y1 - y0, x1 - x0
        if self.spec.resize == "stretch" or ih == iw:
            return y0, y1, x0, x1
        if self.spec.resize == "crop":
            s = min(ih, iw)
            top, left = y0 + (ih - s) // 2, x0 + (iw - s) // 2
        else:  # pad: the trimmed region sits at ((s - ih) // 2, (s - iw) // 2) inside the square
            s = max(ih, iw)
            top, left = y0 - (s - ih) // 2, x0 - (s - iw) // 2
        return top, top + s, left, left + s

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """The square (spec.size x spec.size) of an image (uint8) or a mask (bool: resized on 0/255 with a half
        threshold): the window of the trimmed image (zero past it), resized bilinearly. No equalisation: that is
        a pixel step (``square``)."""
        arr = np.asarray(arr)
        if arr.dtype == bool:
            return self.apply(arr.astype(np.uint8) * 255) >= 128
        return np.asarray(self.image(arr), dtype=np.uint8)

    def image(self, arr: np.ndarray) -> Image.Image:
        """``apply`` of a uint8 image, as the Pillow image (so a pixel step can follow without another copy)."""
        wy0, wy1, wx0, wx1 = self.window
        y0, y1, x0, x1 = self._shown()
        if (y0, y1, x0, x1) == (wy0, wy1, wx0, wx1):
            part = arr[y0:y1, x0:x1]
        else:
            part = np.zeros((wy1 - wy0, wx1 - wx0), arr.dtype)
            part[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = arr[y0:y1, x0:x1]
        im = Image.fromarray(part)
        size = self.spec.size
        return im.resize((size, size), Image.Resampling.BILINEAR) if im.size != (size, size) else im

    def invert(self, arr: np.ndarray, outside: Literal["zero", "edge"] = "zero") -> np.ndarray:
        """A square array (any resolution over the square: a mask (bool), an activation map (float)) back onto the
        (h, w) image: resized to the window (bilinear; masks on 0/255 with a half threshold), its part over the
        trimmed image placed there. The rest of the image (the trimmed border, a cropped-away side) is zero
        (``outside="zero"``: masks) or the nearest placed value (``"edge"``: heatmaps, so an overlay has no frame).
        Float arrays come back as float32."""
        wy0, wy1, wx0, wx1 = self.window
        big = resized(arr, (wy1 - wy0, wx1 - wx0))
        y0, y1, x0, x1 = self._shown()
        part = big[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
        h, w = self.shape
        pads = ((y0, h - y1), (x0, w - x1))
        return np.pad(part, pads, mode="edge") if outside == "edge" else np.pad(part, pads)

    def crop_of(self, other: SquareMap, grid: tuple[int, int]) -> Box | None:
        """The region of this square, on a ``grid`` (rows, columns) over it, that ``other``'s square (the same image,
        another spec) shows, when ``other``'s square is that region resized: both rules ``stretch`` and no border
        trim here (at least one cell each way); None otherwise."""
        if self.spec.resize != "stretch" or other.spec.resize != "stretch" or self.spec.border != 0:
            return None
        (wy0, wy1, wx0, wx1), (oy0, oy1, ox0, ox1) = self.window, other.window
        return (*_cells(oy0, oy1, wy0, wy1, grid[0]), *_cells(ox0, ox1, wx0, wx1, grid[1]))

    def _shown(self) -> Box:
        """The image region both trimmed and in the window (what the square shows of the image itself)."""
        (ty0, ty1, tx0, tx1), (wy0, wy1, wx0, wx1) = self.trim, self.window
        return max(ty0, wy0), min(ty1, wy1), max(tx0, wx0), min(tx1, wx1)


def _cells(a: int, b: int, lo: int, hi: int, n: int) -> tuple[int, int]:
    """Image span a..b on a grid of n cells over lo..hi: (first cell, end cell), at least one cell."""
    first = round((a - lo) * n / (hi - lo))
    return first, max(round((b - lo) * n / (hi - lo)), first + 1)


def resized(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An array resized to (h, w) bilinearly: a bool mask on 0/255 with a half threshold (``resize_mask``), anything
    else as float32."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return resize_mask(arr, shape)
    im = Image.fromarray(arr.astype(np.float32)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(im)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask resized to (h, w) (bilinear on 0/255, then half threshold: smooth edges when upsampling)."""
    if mask.shape == tuple(shape):
        return np.asarray(mask, bool)
    im = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(im) >= 128


def square(grey: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Trim the border, make square by the spec's rule, resize to spec.size (``SquareMap.apply``), optionally
    equalise."""
    im = SquareMap(spec, grey.shape).image(np.asarray(grey))
    return np.asarray(ImageOps.equalize(im) if spec.equalize else im, dtype=np.uint8)
