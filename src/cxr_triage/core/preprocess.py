"""The one preprocessing function: image file / bytes / array -> model input. numpy + Pillow only.

Every stage (training's cache and validation, evaluate, predict, the service) goes through
``prepare`` (decode -> grey uint8 square) and ``normalise`` (uint8 -> float32 CHW); ``preprocess``
is the two together. The ``PreprocessSpec`` travels inside every checkpoint and bundle.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 32
MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom"}

Source = str | Path | bytes | np.ndarray | Image.Image


class ImageReadError(ValueError):
    """The input cannot be turned into a grey image; the message says why and what to do."""


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


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"GIF8")


def _is_dicom(head: bytes, name: str = "") -> bool:
    """DICOM by content (the 'DICM' marker); a .dcm name counts only when the bytes are no known image type."""
    if head[128:132] == b"DICM":
        return True
    return Path(name).suffix.lower() in DICOM_SUFFIXES and not head.startswith(_IMAGE_MAGIC)


def _array_to_grey(arr: np.ndarray) -> np.ndarray:
    """Any numeric 2-D (or HxWxC) array -> uint8 grey. 8-bit data is kept as is; wider data is min-max scaled."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        elif arr.shape[2] in (3, 4):
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            if np.asarray(arr).max(initial=0) <= 255 and arr.min(initial=0) >= 0:
                return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        else:
            raise ImageReadError(f"array has {arr.shape[2]} channels; give a grey (HxW) or RGB(A) (HxWx3/4) array")
    if arr.ndim != 2:
        raise ImageReadError(f"expected a 2-D image array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageReadError("image contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def colourfulness(rgb: Image.Image) -> float:
    """Mean chroma (max - min channel, 0..1) of an RGB image on a small copy; ~0 for any grey X-ray."""
    small = np.asarray(rgb.convert("RGB").resize((64, 64), Image.Resampling.BOX), dtype=np.int16)
    return float((small.max(axis=2) - small.min(axis=2)).mean() / 255.0)


def _pil_to_grey(im: Image.Image, info: dict | None = None) -> np.ndarray:
    if getattr(im, "n_frames", 1) > 1:
        raise ImageReadError(f"image has {im.n_frames} frames; give a single still image")
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageReadError(f"image is {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel limit; downscale it first")
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_grey(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode != "L":
        im = im.convert("RGB")
        if info is not None:
            info["colourfulness"] = colourfulness(im)
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


def load_grey(source: Source, name: str = "", info: dict | None = None) -> np.ndarray:
    """Decode a file path, bytes, array or PIL image into a 2-D uint8 grey array.

    Handles 8/16-bit, RGB/RGBA/palette/CMYK, EXIF orientation and DICOM (via ``cxr_triage.core.dicom``).
    If ``info`` is a dict, colour inputs add ``info["colourfulness"]`` (0..1; chest X-rays are grey).
    Raises ``ImageReadError`` with a sentence saying what is wrong.
    """
    if isinstance(source, Image.Image):
        grey = _pil_to_grey(source, info)
    elif isinstance(source, np.ndarray):
        if info is not None and source.ndim == 3 and source.shape[2] in (3, 4) and source.dtype == np.uint8:
            info["colourfulness"] = colourfulness(Image.fromarray(np.ascontiguousarray(source[..., :3])))
        grey = _array_to_grey(source)
    else:
        if isinstance(source, str | Path):
            path = Path(source)
            name = name or path.name
            if not path.exists():
                raise ImageReadError(f"{path}: no such file")
            if path.is_dir():
                raise ImageReadError(f"{path}: is a directory, not an image file")
            try:
                data = path.read_bytes()
            except PermissionError:
                raise ImageReadError(f"{path}: permission denied; check the file's read permission") from None
        else:
            data = bytes(source)
        if not data:
            raise ImageReadError(f"{name or 'input'}: file is empty (0 bytes)")
        if _is_dicom(data[:132], name):
            from cxr_triage.core.dicom import read_dicom

            grey = _array_to_grey(read_dicom(data))
        else:
            try:
                with Image.open(io.BytesIO(data)) as im:  # decoded lazily, after the size check
                    grey = _pil_to_grey(im, info)
            except UnidentifiedImageError:
                raise ImageReadError(
                    f"{name or 'input'}: not a recognised image (PNG, JPEG, BMP, TIFF, WebP or DICOM expected)"
                ) from None
            except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
                raise ImageReadError(f"{name or 'input'}: corrupt or truncated image ({exc})") from None
    if min(grey.shape) < MIN_SIDE:
        raise ImageReadError(
            f"image is {grey.shape[1]}x{grey.shape[0]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed"
        )
    return grey


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
