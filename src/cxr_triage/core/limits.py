"""Every input limit in one place. Read them as ``limits.NAME`` at call time (tests may lower them).

Past a limit an input is refused with a sentence (``ImageReadError`` with ``kind="too_large"``), before its pixels
are decoded: the size comes from the file's header (Pillow) or from Rows x Columns x frames x samples x bits (DICOM).
"""

from __future__ import annotations

MIN_SIDE = 32  # smallest side (pixels) of an image worth classifying
MAX_PIXELS = 36_000_000  # decoded pixels per image (6000 x 6000); a large chest detector gives about 18 million
MAX_DECODED_BYTES = 160 * 2**20  # decoded pixel data (all frames, samples and bits) before any conversion
MAX_FILE_BYTES = 256 * 2**20  # bytes read from one file (an uncompressed 6000 x 6000 16-bit DICOM is 72 MB)
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 16 * 2**20  # a deflated DICOM data set, inflated
JPEG_REDUCE = (2, 4, 8)  # JPEGs over MAX_PIXELS are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
DICOM_LUT_PIXELS = 12_000_000  # larger DICOM frames are subsampled (every 2nd/3rd pixel) before the LUTs
