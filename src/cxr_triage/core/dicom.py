"""DICOM pixel reading with pydicom: modality LUT, VOI LUT / window, MONOCHROME1 inversion.

Only pixel data leaves this module: no patient identifier is ever returned, logged or written. The pixel budget is
checked from the header (Rows x Columns x frames x samples x bits) before any pixel is decoded, and a deflated data
set is inflated only up to ``limits.MAX_INFLATED_BYTES``. Frames over ``limits.DICOM_LUT_PIXELS`` are subsampled
before the LUTs (reduced resolution: the model sees a few hundred pixels). Invalid VOI or rescale values are ignored
(the image is then min-max scaled), since the pixels themselves are fine.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib

import numpy as np

from cxr_triage.core import limits
from cxr_triage.core.errors import ImageReadError, over_budget

log = logging.getLogger(__name__)
DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _quiet_pydicom() -> None:
    """pydicom warns with the offending value (which may be a patient's name) and logs decoder failures with a
    traceback; this reader reports both itself, as one sentence without patient data."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def meta_end(data: bytes) -> tuple[int, str]:
    """(offset of the data set after the File Meta group, TransferSyntaxUID) of a file with the DICM preamble."""
    pos, syntax = 132, ""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        element, vr = struct.unpack_from("<H", data, pos + 2)[0], data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, start = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        if element == 0x0010:
            syntax = data[start : start + length].decode("ascii", "replace").strip("\0 ")
        pos = start + length
    return pos, syntax


def _header_of_deflated(stream: zlib._Decompress, chunk: bytes):
    """The data set's elements before the pixel data, read from its first inflated MB (None if they run longer)."""
    from pydicom.filereader import read_dataset

    head = stream.decompress(chunk, 1 << 20)
    try:
        return read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag >= 0x7FE00000)
    except Exception:  # the header runs past the first MB or is damaged: the full read below will tell
        return None


def check_deflated(data: bytes, label: str) -> None:
    """A deflated data set: its header's pixel budget from the first inflated MB, then its inflated size (counted,
    never held) against ``limits.MAX_INFLATED_BYTES``, before pydicom inflates it whole."""
    if data[128:132] != b"DICM":
        return
    start, syntax = meta_end(data)
    if syntax != DEFLATED:
        return
    cap = limits.MAX_INFLATED_BYTES
    try:
        header = _header_of_deflated(zlib.decompressobj(-zlib.MAX_WBITS), data[start:])
        if header is not None and "Rows" in header:
            check_budget(header, label)
        _check_inflated_size(data[start:], cap, label)
    except zlib.error:
        raise ImageReadError(f"{label}: deflated DICOM data is corrupt; export the image again", "corrupt") from None


def _check_inflated_size(deflated: bytes, cap: int, label: str) -> None:
    """Count what a raw deflate stream inflates to, 1 MB at a time and never held; refuse it once over ``cap``."""
    stream, total, chunk = zlib.decompressobj(-zlib.MAX_WBITS), 0, deflated
    while chunk and total <= cap:
        total += len(stream.decompress(chunk, 1 << 20))
        chunk = stream.unconsumed_tail
    if total > cap:
        raise ImageReadError(
            f"{label}: deflated DICOM inflates to over {cap // 2**20} MB; export the image uncompressed or smaller",
            "too_large",
        )


def read_header(data: bytes, max_inflated: int, label: str = "instance"):
    """The elements before the pixel data (pydicom Dataset) of a Part-10 file. A deflated data set is never inflated
    whole: its inflated size is counted against ``max_inflated`` (refused with ``too_large`` past it) and the header
    is read from its first inflated MB (``corrupt`` when it runs longer)."""
    import pydicom

    start, syntax = meta_end(data) if data[128:132] == b"DICM" else (0, "")
    if syntax != DEFLATED:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    try:
        _check_inflated_size(data[start:], max_inflated, label)
        header = _header_of_deflated(zlib.decompressobj(-zlib.MAX_WBITS), data[start:])
    except zlib.error:
        raise ImageReadError(f"{label}: deflated DICOM data is corrupt; send it again", "corrupt") from None
    if header is None or "SOPInstanceUID" not in header:
        raise ImageReadError(f"{label}: deflated DICOM header is unreadable or over 1 MB; send it uncompressed")
    return header


IS_MAX = 2**31 - 1  # the largest Integer String (IS) value DICOM allows


def _count(ds, keyword: str, default: int) -> int:
    """A whole-number header value (Rows, NumberOfFrames...), or a sentence naming the bad tag."""
    value = getattr(ds, keyword, None)
    if value in (None, ""):
        return default
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise ImageReadError(f"DICOM {keyword} is not a whole number; export the image again", "corrupt") from None
    if number < 0:
        raise ImageReadError(f"DICOM {keyword} is negative; export the image again", "corrupt")
    if number > IS_MAX:  # e.g. a float of 1e300 written as an integer string: never echoed back digit by digit
        raise ImageReadError(f"DICOM {keyword} is over {IS_MAX:,}, out of range; export the image again", "corrupt")
    return number


def check_budget(ds, label: str) -> None:
    """Rows x Columns x frames x samples x bits from the header, against the pixel and byte budgets."""
    rows, cols = _count(ds, "Rows", 0), _count(ds, "Columns", 0)
    frames, samples = _count(ds, "NumberOfFrames", 1) or 1, _count(ds, "SamplesPerPixel", 1) or 1
    bits = _count(ds, "BitsAllocated", 16)
    if rows == 0 or cols == 0:
        raise ImageReadError("DICOM pixel data is incomplete (Rows or Columns missing or 0)", "corrupt")
    if rows * cols * frames > limits.MAX_PIXELS:
        raise over_budget(label, cols, rows, frames)
    if rows * cols * frames * samples * max(bits, 1) // 8 > limits.MAX_DECODED_BYTES:
        raise ImageReadError(
            f"{label}: DICOM pixel data would decode to over {limits.MAX_DECODED_BYTES // 2**20} MB", "too_large"
        )
    if frames > 1:
        raise ImageReadError(f"multi-frame DICOM ({frames} frames); give a single-frame radiograph", "unsupported")


def _pixels(ds) -> np.ndarray:
    """ds.pixel_array, with decoder failures named (transfer syntax and what to install)."""
    try:
        return ds.pixel_array
    except (AttributeError, KeyError):
        raise ImageReadError("DICOM pixel data is incomplete (missing Rows/Columns/BitsAllocated)") from None
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if not getattr(syntax, "is_transfer_syntax", False):
            raise ImageReadError(
                f"DICOM transfer syntax is missing or invalid; export the image again ({type(exc).__name__})"
            ) from None
        if not syntax.is_compressed:
            raise ImageReadError(  # uncompressed: no decoder helps; the file itself is damaged
                "DICOM pixel data is truncated or does not match Rows/Columns/BitsAllocated; "
                f"export the image again ({type(exc).__name__})"
            ) from None
        name = syntax.name
        raise ImageReadError(
            f"cannot decode DICOM pixel data in transfer syntax {name!r}; install a decoder, e.g. "
            "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` or `pip install python-gdcm`"
            f" ({type(exc).__name__})",
            "unsupported",
        ) from None


def _lut_header(ds):
    """The elements the LUTs read (group 0028 and the file meta), so the full data set and its pixels can go."""
    from pydicom.dataset import Dataset

    header = ds.group_dataset(0x0028)
    header.file_meta = getattr(ds, "file_meta", Dataset())
    return header


def _display(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Modality LUT, then VOI LUT / window; a step whose header values are invalid is skipped."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = pixels
    for step in (apply_modality_lut, apply_voi_lut):
        try:
            arr = step(arr, ds)
        except Exception as exc:  # e.g. Window Width 0, text in RescaleSlope: keep the pixels, drop the step
            log.debug("DICOM %s skipped (%s)", step.__name__, type(exc).__name__)
    arr = np.asarray(arr, dtype=np.float32)
    if photometric == "MONOCHROME1":
        np.subtract(arr.max() + arr.min(), arr, out=arr)
    return arr


def subsample(pixels: np.ndarray) -> np.ndarray:
    """Every k-th row and column of a frame over ``limits.DICOM_LUT_PIXELS`` (pydicom's LUTs work in float64)."""
    k = math.ceil(math.sqrt(pixels.shape[0] * pixels.shape[1] / limits.DICOM_LUT_PIXELS))
    return np.ascontiguousarray(pixels[::k, ::k]) if k > 1 else pixels


def read_dicom(data: bytes, label: str = "input") -> np.ndarray:
    """Return the display-ready grey pixels of a single-frame DICOM image as float32 (HxW).

    Raises ImageReadError for non-image objects, images over the pixel budget, multi-frame images and
    compressed transfer syntaxes whose decoder is not installed (naming what to install).
    """
    import pydicom

    _quiet_pydicom()
    check_deflated(data, label)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        has_pixels = "PixelData" in ds or "FloatPixelData" in ds
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageReadError(f"unreadable DICOM file ({type(exc).__name__})") from None
    if not has_pixels:
        raise ImageReadError("DICOM object holds no image (no PixelData); export the X-ray image itself", "unsupported")
    check_budget(ds, label)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    pixels = _pixels(ds)
    if pixels.ndim != 2 and (pixels.ndim != 3 or photometric.startswith("MONOCHROME")):
        raise ImageReadError(f"DICOM pixel array has shape {pixels.shape}; expected one 2-D frame")
    pixels, header = subsample(pixels), _lut_header(ds)
    del ds  # the data set caches the full-size pixel array
    if pixels.ndim == 3:  # colour (a Secondary Capture): luma, one channel at a time (no float copy of all three)
        from pydicom.pixels import convert_color_space

        rgb = convert_color_space(pixels, photometric, "RGB") if photometric.startswith("YBR") else pixels
        grey = rgb[..., 0] * np.float32(0.299)
        grey += rgb[..., 1] * np.float32(0.587)
        grey += rgb[..., 2] * np.float32(0.114)
        return grey
    return _display(pixels, header, photometric)
