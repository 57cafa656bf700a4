"""DICOM pixel reading with pydicom: modality LUT, VOI LUT / window, MONOCHROME1 inversion.

Only pixel data leaves this module: no patient identifier is ever returned, logged or written.
"""

from __future__ import annotations

import io

import numpy as np

from cxr_triage.core.preprocess import ImageReadError


def read_dicom(data: bytes) -> np.ndarray:
    """Return the display-ready grey pixels of a single-frame DICOM image as float32 (HxW).

    Raises ImageReadError for non-image objects, multi-frame images, colour images and
    compressed transfer syntaxes whose decoder is not installed (naming what to install).
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageReadError(f"unreadable DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImageReadError("DICOM object holds no image (no PixelData); export the X-ray image itself")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"multi-frame DICOM ({frames} frames); give a single-frame radiograph")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_transfer_syntax and not syntax.is_compressed:
            raise ImageReadError(  # uncompressed: no decoder helps; the file itself is damaged
                "DICOM pixel data is truncated or does not match Rows/Columns/BitsAllocated; "
                f"export the image again ({type(exc).__name__})"
            ) from None
        name = getattr(syntax, "name", str(syntax))
        raise ImageReadError(
            f"cannot decode DICOM pixel data in transfer syntax {name!r}; install a decoder, e.g. "
            "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` or `pip install python-gdcm`"
            f" ({type(exc).__name__})"
        ) from None
    except AttributeError:
        raise ImageReadError("DICOM pixel data is incomplete (missing Rows/Columns/BitsAllocated)") from None
    if pixels.ndim != 2:
        if photometric.startswith("MONOCHROME"):
            raise ImageReadError(f"DICOM pixel array has shape {pixels.shape}; expected one 2-D frame")
        from pydicom.pixels import convert_color_space

        rgb = convert_color_space(pixels, photometric, "RGB") if photometric.startswith("YBR") else pixels
        return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    arr = apply_modality_lut(pixels, ds)
    arr = apply_voi_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float32)
    if photometric == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return arr
