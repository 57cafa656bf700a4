"""Hostile inputs made in the test (nothing from ../shared/data is committed): the kinds of files in
``../shared/data/hostile-inputs`` (odd DICOM tags, truncations, bombs, fuzz-like damage), generated here so that CI
always has them; ``shared_hostile_files()`` adds the real folder when it is present.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

SHARED_HOSTILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hostile-inputs"
PATIENT = "Doe^Jane^Hostile"  # must never appear in any message


def xray(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth grey picture (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    img = 80 + 60 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 5, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray | Image.Image, fmt: str, **kw: object) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _meta(syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    return meta


def _image_tags(ds: Dataset, rows: int, cols: int, bits: int = 8) -> None:
    ds.SOPClassUID, ds.Modality = DigitalXRayImageStorageForPresentation, "DX"
    ds.PatientName, ds.PatientID = PATIENT, "H1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0


def dicom(pixels: np.ndarray | None = None, syntax: str = ExplicitVRLittleEndian, **tags: object) -> bytes:
    """A DX DICOM of ``pixels`` (default: a small X-ray), then ``tags`` set as given (any value, any type)."""
    pixels = xray() if pixels is None else pixels
    ds = FileDataset(None, {}, file_meta=_meta(syntax), preamble=b"\0" * 128)
    _image_tags(ds, *pixels.shape, bits=16 if pixels.dtype == np.uint16 else 8)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PixelData = pixels.tobytes()
    with warnings.catch_warnings():  # pydicom warns about the invalid values these files are made of
        warnings.simplefilter("ignore")
        for key, value in tags.items():
            try:
                setattr(ds, key, value)
            except (TypeError, ValueError, OverflowError):  # a value its VR refuses: stored as text, as in broken files
                ds.add_new(tag_for_keyword(key), "LO", str(value))
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@functools.cache
def deflate_bomb(side: int = 8_000) -> bytes:
    """A deflated DICOM whose data set inflates to side x side 8-bit pixels (64 MB in 292 KB for 8000)."""
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, _meta(DeflatedExplicitVRLittleEndian), enforce_standard=True)
    ds = Dataset()
    _image_tags(ds, side, side)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    z = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(head.getvalue() + b"\xe0\x7f\x10\x00OB\0\0" + struct.pack("<I", side * side))]
    zeros = b"\0" * (1 << 20)
    for _ in range(side * side // len(zeros)):
        parts.append(z.compress(zeros))
    parts.append(z.compress(b"\0" * (side * side % len(zeros))) + z.flush())
    return meta.getvalue() + b"".join(parts)


def rle_bomb(side: int = 12_000) -> bytes:
    """An RLE DICOM claiming side x side pixels with one tiny fragment."""
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return dicom(np.zeros((2, 2), np.uint8), RLELossless, Rows=side, Columns=side, PixelData=encapsulate([header]))


def png_bomb(side: int = 30_000, bits: int = 8) -> bytes:
    """A PNG whose IHDR claims side x side pixels; the IDAT holds only the first rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, bits, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side * bits // 8 + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _flip(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1 :]


# name -> (bytes maker, "ok" if it must be predicted, else "error")
CORPUS: dict[str, tuple[Callable[[], bytes], str]] = {
    "good.png": (lambda: encode(xray(), "PNG"), "ok"),
    "good.jpg": (lambda: encode(xray(), "JPEG", quality=90), "ok"),
    "good.dcm": (lambda: dicom(), "ok"),
    "grey16.png": (lambda: encode(xray().astype(np.uint16) * 257, "PNG"), "ok"),
    "grey.tif": (lambda: encode(xray(), "TIFF"), "ok"),
    "grey.webp": (lambda: encode(xray(), "WEBP"), "ok"),
    "grey.bmp": (lambda: encode(xray(), "BMP"), "ok"),
    "still.gif": (lambda: encode(xray(), "GIF"), "ok"),
    "window_zero.dcm": (lambda: dicom(WindowCenter=100, WindowWidth=0), "ok"),
    "rescale_text.dcm": (lambda: dicom(RescaleSlope="abc", RescaleIntercept="x"), "ok"),
    "frames_text.dcm": (lambda: dicom(NumberOfFrames="ab"), "error"),
    "multiframe.dcm": (lambda: dicom(np.stack([xray(), xray(seed=1)]).reshape(192, 80), NumberOfFrames=2), "error"),
    "bits_zero.dcm": (lambda: dicom(BitsAllocated=0), "error"),
    "rows_huge.dcm": (lambda: dicom(Rows=60_000, Columns=60_000), "error"),
    "truncated_pixels.dcm": (lambda: dicom()[:-3000], "error"),
    "no_pixels.dcm": (lambda: dicom()[:300], "error"),
    "deflate_bomb.dcm": (deflate_bomb, "error"),
    "rle_bomb.dcm": (rle_bomb, "error"),
    "bomb_30000.png": (png_bomb, "error"),
    "bomb_8000_16bit.png": (lambda: png_bomb(8000, 16), "error"),
    "empty.png": (lambda: b"", "error"),
    "text.png": (lambda: b"patient list\nnot an image\n", "error"),
    "trunc.png": (lambda: encode(xray(), "PNG")[:400], "error"),
    "trunc.jpg": (lambda: encode(xray(), "JPEG")[:300], "error"),
    "ihdr_cut.png": (lambda: encode(xray(), "PNG")[:20], "error"),
    "palette_damaged.bmp": (lambda: _flip(encode(Image.fromarray(xray()).convert("P"), "BMP"), 46, 0xFF), "error"),
    "one_px.png": (lambda: encode(np.zeros((1, 1), np.uint8), "PNG"), "error"),
    "anim.gif": (
        lambda: encode(Image.fromarray(xray()), "GIF", save_all=True, append_images=[Image.fromarray(xray(seed=2))]),
        "error",
    ),
    "nan_float.tif": (lambda: encode(np.full((64, 64), np.nan, np.float32), "TIFF"), "error"),
}


def write_corpus(root: Path) -> dict[str, str]:
    """Write CORPUS under ``root``; returns name -> "ok" / "error"."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (make, _) in CORPUS.items():
        (root / name).write_bytes(make())
    return {name: want for name, (_, want) in CORPUS.items()}


def shared_hostile_files() -> list[Path]:
    """The 50 files of ../shared/data/hostile-inputs when that folder is present (else none)."""
    if not SHARED_HOSTILE.is_dir():
        return []
    return sorted(p for p in SHARED_HOSTILE.iterdir() if p.is_file() and p.name != "README.md")


FORMULA_NAMES = ("=1+2.png", "+SUM(1).png", "-2+3.png", "@A1.png", "\tstarts_with_tab.png")


def odd_entries(root: Path) -> dict[str, str]:
    """Entries in ``root`` that no repository can hold (written here, never committed); name -> expected decision
    ('ok' or 'error')."""
    png = encode(xray(), "PNG")
    expected = {}
    for name in (*FORMULA_NAMES, "scan[1].png", "new\nline.png"):
        (root / name).write_bytes(png)
        expected[name] = "ok"
    (root / "IM0001").write_bytes(dicom())  # extensionless DICOM, as on CDs and PACS exports
    (root / "image.001").write_bytes(dicom())  # any extension: recognised by the DICM preamble
    (root / "loop_a.png").symlink_to("loop_b.png")
    (root / "loop_b.png").symlink_to("loop_a.png")
    (root / "dangling.png").symlink_to("no_such_target.png")
    (root / "x.png").mkdir()
    os.mkfifo(root / "fifo.png")
    (root / "README").write_text("a text file without suffix gets an error row\n")
    expected |= {"IM0001": "ok", "image.001": "ok", "README": "error"}
    expected |= dict.fromkeys(("loop_a.png", "loop_b.png", "dangling.png", "x.png", "fifo.png"), "error")
    (root / "notes.md").write_text("skipped\n")
    (root / "list.csv").write_text("a,b\n")
    (root / ".DS_Store").write_bytes(b"\0")
    return expected
