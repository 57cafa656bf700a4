"""The one decode boundary: file path / bytes / array / PIL image -> 2-D uint8 grey, or ``ImageReadError``.

Every reader (Pillow, pydicom, numpy) runs behind ``load_grey``: whatever they raise becomes an ``ImageReadError``
with a sentence and a kind, never a traceback. Files are checked before they are opened (a FIFO, socket or device is
never opened; a folder, dangling link or link loop is named as such), and pixel budgets are checked from headers
before any pixel is decoded (``cxr_triage.core.limits``). JPEGs over the pixel budget are decoded at reduced
resolution (``Image.draft``); other formats over it are refused.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_triage.core import dicom, limits
from cxr_triage.core.errors import ImageReadError, over_budget

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"GIF8")
_KIND_MAGIC = (  # (offset, bytes, kind): what ``image_kind`` accepts
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
    (128, b"DICM", "dicom"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (8, b"WEBP", "webp"),
)
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))
_SPECIAL += ((stat.S_ISBLK, "a block device"),)

Source = str | Path | bytes | np.ndarray | Image.Image


def is_dicom(head: bytes, name: str = "") -> bool:
    """Which decoder reads bytes already taken in: DICOM by content (the 'DICM' marker); a .dcm name counts only when
    the bytes are no known image type (pydicom then says what is wrong with them). Lenient where ``image_kind``,
    the check at the door, is strict."""
    if head[128:132] == b"DICM":
        return True
    return Path(name).suffix.lower() in DICOM_SUFFIXES and not head.startswith(_IMAGE_MAGIC)


def image_kind(head: bytes, name: str = "") -> str | None:
    """The kind of image the first 132 bytes show (png, jpeg, dicom, bmp, tiff, webp), or None for anything else:
    the strict check at the door (the web service answers None with 415 before reading the rest). Unlike
    ``is_dicom``, a .dcm name alone is not enough: DICOM without its 128-byte preamble must start with a group
    0002 or 0008 tag (little endian)."""
    for offset, magic, kind in _KIND_MAGIC:
        if head[offset : offset + len(magic)] == magic and (kind != "webp" or head[:4] == b"RIFF"):
            return kind
    if Path(name).suffix.lower() in DICOM_SUFFIXES and head[:2] in (b"\x02\x00", b"\x08\x00"):
        return "dicom"
    return None


def _stat(path: Path) -> os.stat_result:
    """``os.stat`` with every failure turned into a sentence."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageReadError(f"{path}: dangling symbolic link (its target does not exist)", "missing") from None
        raise ImageReadError(f"{path}: no such file", "missing") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied; check the file's read permission", "denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageReadError(f"{path}: symbolic link loop; point the link at an image file", "not_a_file") from None
        raise ImageReadError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})", "not_a_file") from None


def read_file(path: str | Path) -> bytes:
    """The bytes of a regular file, at most ``limits.MAX_FILE_BYTES``; anything that is not one is refused unopened."""
    path = Path(path)
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{path}: is a directory, not an image file", "not_a_file")
    for test, what in _SPECIAL:
        if test(st.st_mode):
            raise ImageReadError(f"{path}: is {what}, not a regular file; it was not opened", "not_a_file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{path}: is not a regular file; it was not opened", "not_a_file")
    if st.st_size > limits.MAX_FILE_BYTES:
        raise ImageReadError(
            f"{path}: file is {_mb(st.st_size)}, over the {_mb(limits.MAX_FILE_BYTES)} limit", "too_large"
        )
    try:  # O_NONBLOCK: should the path be swapped for a FIFO after the check, opening it still returns at once
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied; check the file's read permission", "denied") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be opened ({exc.strerror or type(exc).__name__})", "not_a_file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ImageReadError(f"{path}: is not a regular file", "not_a_file")
        data = f.read(limits.MAX_FILE_BYTES + 1)
    if len(data) > limits.MAX_FILE_BYTES:
        raise ImageReadError(f"{path}: file is over the {_mb(limits.MAX_FILE_BYTES)} limit", "too_large")
    return data


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n:,} bytes"


def _reduce_jpeg(im: Image.Image, label: str) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that fits the pixel budget; refuse when none does."""
    w, h = im.size
    for factor in limits.JPEG_REDUCE:
        if math.ceil(w / factor) * math.ceil(h / factor) <= limits.MAX_PIXELS:
            im.draft(None, (w // factor, h // factor))
            if im.size[0] * im.size[1] <= limits.MAX_PIXELS:
                return
    raise over_budget(label, w, h)


def _check_budget(im: Image.Image, label: str) -> None:
    """Pixel and byte budgets from the header, before decoding; large JPEGs switch to a reduced-scale decode."""
    w, h = im.size
    if w * h > limits.MAX_PIXELS:
        if im.format != "JPEG":
            raise over_budget(label, w, h)
        _reduce_jpeg(im, label)
        w, h = im.size
    frames = getattr(im, "n_frames", 1)  # after the size check: counting frames reads through the file
    if frames > 1:
        raise ImageReadError(f"{label}: image has {frames} frames; give a single still image", "unsupported")
    bits = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(im.mode, 8)
    if w * h * len(im.getbands()) * bits // 8 > limits.MAX_DECODED_BYTES:
        raise ImageReadError(f"{label}: decoded image would exceed {_mb(limits.MAX_DECODED_BYTES)}", "too_large")


def array_to_grey(arr: np.ndarray) -> np.ndarray:
    """Any numeric 2-D (or HxWxC) array -> uint8 grey. 8-bit data is kept as is; wider data is min-max scaled
    (in float64, in bands of rows, so the working memory is the uint8 result plus one band)."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        elif arr.shape[2] in (3, 4):
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            if arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
                return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        else:
            raise ImageReadError(f"array has {arr.shape[2]} channels; give a grey (HxW) or RGB(A) (HxWx3/4) array")
    if arr.ndim != 2:
        raise ImageReadError(f"expected a 2-D image array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "uif":
        raise ImageReadError(f"image array has type {arr.dtype}; give numbers")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageReadError("image contains NaN or infinite values", "corrupt")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out, scale = np.empty(arr.shape, np.uint8), 255.0 / (hi - lo)
    for y in range(0, arr.shape[0], 256):  # float64 in bands of rows: exact, and little working memory
        band = (arr[y : y + 256].astype(np.float64) - lo) * scale
        out[y : y + 256] = np.clip(np.rint(band), 0, 255)
    return out


def colourfulness(rgb: Image.Image) -> float:
    """Mean chroma (max - min channel, 0..1) of an RGB image on a small copy; ~0 for any grey X-ray."""
    small = np.asarray(rgb.convert("RGB").resize((64, 64), Image.Resampling.BOX), dtype=np.int16)
    return float((small.max(axis=2) - small.min(axis=2)).mean() / 255.0)


def pil_to_grey(im: Image.Image, info: dict | None = None, label: str = "image") -> np.ndarray:
    """A PIL image (budget-checked first) -> grey uint8; colour inputs add ``info["colourfulness"]``."""
    _check_budget(im, label)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return array_to_grey(np.asarray(im))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
    if im.mode != "L":
        im = im.convert("RGB")
        if info is not None:
            info["colourfulness"] = colourfulness(im)
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8)


def _reason(exc: BaseException) -> str:
    """A short, one-line description of a reader's exception."""
    text = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode_bytes(data: bytes, label: str, name: str, info: dict | None) -> np.ndarray:
    if not data:
        raise ImageReadError(f"{label}: file is empty (0 bytes)", "empty")
    if is_dicom(data[:132], name):
        try:
            return array_to_grey(dicom.read_dicom(data, label))
        except (ImageReadError, MemoryError):
            raise
        except Exception as exc:  # the type only: pydicom's messages may quote the file's elements (patient data)
            raise ImageReadError(f"{label}: unreadable DICOM file ({type(exc).__name__})", "corrupt") from None
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: only the header is read before the budget check
            return pil_to_grey(im, info, label)
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{label}: not a recognised image (PNG, JPEG, BMP, TIFF, WebP or DICOM expected)", "unsupported"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{label}: image is far over the pixel limit ({_reason(exc)})", "too_large") from None


def _decode(source: Source, name: str, info: dict | None) -> tuple[np.ndarray, str]:
    if isinstance(source, Image.Image):
        return pil_to_grey(source, info, name or "image"), name or "image"
    if isinstance(source, np.ndarray):
        if source.ndim >= 2 and source.shape[0] * source.shape[1] > limits.MAX_PIXELS:
            raise over_budget(name or "array", source.shape[1], source.shape[0])
        if info is not None and source.ndim == 3 and source.shape[2] in (3, 4) and source.dtype == np.uint8:
            info["colourfulness"] = colourfulness(Image.fromarray(np.ascontiguousarray(source[..., :3])))
        return array_to_grey(source), name or "array"
    if isinstance(source, str | Path):
        label = name or Path(source).name
        return _decode_bytes(read_file(source), label, label, info), label
    label = name or "input"
    return _decode_bytes(bytes(source), label, name, info), label


def load_grey(source: Source, name: str = "", info: dict | None = None) -> np.ndarray:
    """Decode a file path, bytes, array or PIL image into a 2-D uint8 grey array.

    Handles 8/16-bit, RGB/RGBA/palette/CMYK, EXIF orientation and DICOM (via ``cxr_triage.core.dicom``).
    If ``info`` is a dict, colour inputs add ``info["colourfulness"]`` (0..1; chest X-rays are grey).
    Raises ``ImageReadError`` (and nothing else) with a sentence saying what is wrong.
    """
    label = name or (Path(source).name if isinstance(source, str | Path) else "input")
    try:
        grey, label = _decode(source, name, info)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(f"{label}: not enough memory to decode this image; downscale it", "too_large") from None
    except Exception as exc:  # the boundary: Pillow, numpy and pydicom raise many types for hostile files
        raise ImageReadError(f"{label}: corrupt or truncated image ({_reason(exc)})", "corrupt") from None
    if grey.ndim != 2 or min(grey.shape) < limits.MIN_SIDE:
        raise ImageReadError(
            f"image is {grey.shape[1]}x{grey.shape[0]} pixels; at least {limits.MIN_SIDE}x{limits.MIN_SIDE} is needed",
            "unsupported",
        )
    return grey
