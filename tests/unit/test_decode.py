"""The decode boundary (issue 13): every reader's failure is an ImageReadError with a kind and one sentence; pixel
budgets are checked from headers before decoding; large JPEGs decode at reduced resolution; files that are not
regular files are never opened."""

from __future__ import annotations

import os
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_triage.core import decode, dicom, limits
from cxr_triage.core.decode import load_grey
from cxr_triage.core.errors import ImageReadError
from tests.hostile_corpus import CORPUS, PATIENT, deflate_bomb, encode, shared_hostile_files, xray
from tests.hostile_corpus import dicom as make_dicom

SHARED_OK = {  # controls in ../shared/data/hostile-inputs that must be read
    "good.png", "good.jpg", "good.dcm", "grey.tif", "grey.webp", "grey_as_bmp.bmp", "16bit.png", "la.png",
    "bilevel.png", "cmyk.jpg", "ycbcr.jpg", "lab.tif", "palette_transp.png", "bad_orient.jpg", "rle.dcm",
    "palette_color.dcm", "photometric_rgb_1sample.dcm", "rescale_text.dcm", "xss_patient.dcm",
    "window_zero.dcm",  # Window Width 0 is invalid: the window is skipped, the pixels are fine
}  # fmt: skip


def outcome(data: bytes, name: str) -> str | np.ndarray:
    """The grey image, or the error's one line; anything else escaping fails the test."""
    try:
        return load_grey(data, name=name)
    except ImageReadError as exc:
        text = str(exc)
        assert text and "\n" not in text and "Traceback" not in text and len(text) < 400, text
        assert exc.kind in ("missing", "not_a_file", "denied", "empty", "too_large", "unsupported", "corrupt")
        assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
        return text


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_generated_hostile_file(name: str):
    make, want = CORPUS[name]
    got = outcome(make(), name)
    if want == "ok":
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and got.ndim == 2, got
    else:
        assert isinstance(got, str), f"{name} was decoded; it must be refused"
        assert "Doe" not in got and PATIENT not in got


@pytest.mark.skipif(not shared_hostile_files(), reason="../shared/data/hostile-inputs is not present")
@pytest.mark.parametrize("path", shared_hostile_files(), ids=lambda p: p.name)
def test_shared_hostile_file(path: Path):
    got = outcome(path.read_bytes(), path.name)
    assert isinstance(got, np.ndarray) == (path.name in SHARED_OK), (path.name, got)


def test_image_kind_is_strict_where_is_dicom_is_lenient():
    assert decode.image_kind(b"\x89PNG\r\n\x1a\n" + b"\0" * 124) == "png"
    assert decode.image_kind(b"\xff\xd8\xff\xe0" + b"\0" * 128) == "jpeg"
    assert decode.image_kind(b"\0" * 128 + b"DICM") == "dicom"
    assert decode.image_kind(b"\x08\x00\x05\x00CS" + b"\0" * 126, "x.dcm") == "dicom"
    assert decode.image_kind(b"\x08\x00\x05\x00CS" + b"\0" * 126, "x.bin") is None
    assert decode.image_kind(b"%PDF-1.4" + b"\0" * 124, "x.png") is None
    garbage = b"%PDF-1.4" + b"\0" * 124  # under a .dcm name: refused at the door, but read as DICOM once taken in
    assert decode.image_kind(garbage, "x.dcm") is None and decode.is_dicom(garbage, "x.dcm")
    assert not decode.is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 124, "x.dcm")  # a PNG named .dcm is a PNG


def test_kinds_of_refusal():
    kinds = {}
    for name in ("empty.png", "text.png", "bomb_8000_16bit.png", "deflate_bomb.dcm", "trunc.png", "anim.gif"):
        with pytest.raises(ImageReadError) as info:
            load_grey(CORPUS[name][0](), name=name)
        kinds[name] = info.value.kind
    assert kinds == {
        "empty.png": "empty",
        "text.png": "unsupported",
        "bomb_8000_16bit.png": "too_large",
        "deflate_bomb.dcm": "too_large",
        "trunc.png": "corrupt",
        "anim.gif": "unsupported",
    }


@pytest.mark.parametrize("error", [struct.error("unpack"), TypeError("x"), NotImplementedError(), KeyError("k")])
def test_any_pillow_exception_becomes_a_read_error(monkeypatch: pytest.MonkeyPatch, error: Exception):
    def broken(*args: object, **kwargs: object) -> Image.Image:
        raise error

    monkeypatch.setattr(decode.Image, "open", broken)
    with pytest.raises(ImageReadError, match=rf"x\.png: corrupt or truncated image \({type(error).__name__}") as info:
        load_grey(encode(xray(), "PNG"), name="x.png")
    assert info.value.kind == "corrupt"


def test_dicom_exception_text_is_never_shown(monkeypatch: pytest.MonkeyPatch):
    """pydicom's messages may quote elements (patient data): only the exception's type is reported."""

    def broken(data: bytes, label: str = "") -> np.ndarray:
        raise KeyError(f"PatientName {PATIENT}")

    monkeypatch.setattr(dicom, "read_dicom", broken)
    with pytest.raises(ImageReadError, match=r"scan\.dcm: unreadable DICOM file \(KeyError\)") as info:
        load_grey(make_dicom(), name="scan.dcm")
    assert PATIENT not in str(info.value)


def test_memory_error_is_too_large(monkeypatch: pytest.MonkeyPatch):
    def exhausted(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(decode, "pil_to_grey", exhausted)
    with pytest.raises(ImageReadError, match="not enough memory") as info:
        load_grey(encode(xray(), "PNG"))
    assert info.value.kind == "too_large"


def test_budget_is_checked_from_headers_before_decoding():
    """Each bomb is refused while allocating almost nothing (a decode would need 144-900 MB)."""
    bombs = {n: CORPUS[n][0]() for n in ("bomb_30000.png", "bomb_8000_16bit.png", "rle_bomb.dcm", "deflate_bomb.dcm")}
    bombs["rows_huge.dcm"] = CORPUS["rows_huge.dcm"][0]()
    for name, data in bombs.items():
        tracemalloc.start()
        with pytest.raises(ImageReadError) as info:
            load_grey(data, name=name)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert info.value.kind == "too_large", (name, str(info.value))
        assert peak < 24 * 2**20, f"{name}: {peak / 2**20:.0f} MB traced while refusing"


def test_deflated_dicom_is_capped_when_its_header_is_out_of_reach(monkeypatch: pytest.MonkeyPatch):
    """Without a header in the first inflated MB, the data set's inflated size is counted, never held."""
    monkeypatch.setattr(dicom, "_header_of_deflated", lambda stream, chunk: None)
    monkeypatch.setattr(limits, "MAX_INFLATED_BYTES", 32 * 2**20)  # the bomb inflates to 64 MB
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="inflates to over 32 MB") as info:
        load_grey(deflate_bomb(), name="bomb.dcm")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.kind == "too_large" and peak < 16 * 2**20


def test_large_jpeg_is_decoded_at_reduced_resolution(monkeypatch: pytest.MonkeyPatch):
    data = encode(xray(400, 320), "JPEG", quality=95)
    assert load_grey(data).shape == (400, 320)
    monkeypatch.setattr(limits, "MAX_PIXELS", 200 * 160)  # 1/2 fits: libjpeg decodes at half scale
    assert load_grey(data).shape == (200, 160)
    monkeypatch.setattr(limits, "MAX_PIXELS", 60 * 50)  # 1/8 (50 x 40) fits
    assert load_grey(data).shape == (50, 40)
    monkeypatch.setattr(limits, "MAX_PIXELS", 1000)  # nothing fits
    with pytest.raises(ImageReadError, match="400 pixels, over the 1,000-pixel limit") as info:
        load_grey(data)
    assert info.value.kind == "too_large"


def test_other_formats_over_the_budget_are_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "MAX_PIXELS", 200 * 160)
    for fmt in ("PNG", "TIFF", "WEBP", "BMP"):
        with pytest.raises(ImageReadError, match="320x400 pixels, over the 32,000-pixel limit; downscale"):
            load_grey(encode(xray(400, 320), fmt))
    with pytest.raises(ImageReadError, match="over the 32,000-pixel limit"):
        load_grey(make_dicom(xray(400, 320)))
    with pytest.raises(ImageReadError, match="over the 32,000-pixel limit"):
        load_grey(xray(400, 320))


def test_decoded_bytes_budget_counts_bits_and_samples(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 96 * 80)  # an 8-bit frame fits, a 16-bit one does not
    assert load_grey(make_dicom(xray())).shape == (96, 80)
    with pytest.raises(ImageReadError, match="would decode to over"):
        load_grey(make_dicom(xray().astype(np.uint16) * 16))
    with pytest.raises(ImageReadError, match="decoded image would exceed"):
        load_grey(encode(xray().astype(np.uint16) * 257, "PNG"))


@pytest.mark.parametrize("value", [1e300, 2**31])
def test_header_counts_out_of_the_is_range_are_refused_in_one_short_line(value: object):
    """Found by the header fuzz with ten times the CI examples: NumberOfFrames = 1e300 came back as a 301-digit
    number inside the error message. Counts over DICOM's IS limit are refused without echoing them."""
    with pytest.raises(ImageReadError, match="DICOM NumberOfFrames is over 2,147,483,647, out of range") as info:
        load_grey(make_dicom(xray(), NumberOfFrames=value))
    assert len(str(info.value)) < 120 and info.value.kind == "corrupt"


def test_large_dicom_frames_are_subsampled_before_the_luts(monkeypatch: pytest.MonkeyPatch):
    pixels = (xray(400, 320).astype(np.uint16) * 16).astype(np.uint16)
    data = make_dicom(pixels, WindowCenter=2000, WindowWidth=4000)
    full = load_grey(data)
    monkeypatch.setattr(limits, "DICOM_LUT_PIXELS", 200 * 160)
    half = load_grey(data)
    assert full.shape == (400, 320) and half.shape == (200, 160)
    assert np.abs(half.astype(int) - full[::2, ::2].astype(int)).mean() < 3  # min-max scaling over fewer pixels


def test_file_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "big.png"
    path.write_bytes(encode(xray(), "PNG"))
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageReadError, match="over the 1,000 bytes limit") as info:
        load_grey(path)
    assert info.value.kind == "too_large"


def test_paths_that_are_not_regular_files(tmp_path: Path):
    (tmp_path / "loop_a.png").symlink_to("loop_b.png")
    (tmp_path / "loop_b.png").symlink_to("loop_a.png")
    (tmp_path / "dangling.png").symlink_to("nowhere.png")
    (tmp_path / "x.png").mkdir()
    (tmp_path / "ok.png").write_bytes(encode(xray(), "PNG"))
    (tmp_path / "link.png").symlink_to("ok.png")
    expected = {
        "loop_a.png": ("symbolic link loop", "not_a_file"),
        "dangling.png": ("dangling symbolic link", "missing"),
        "x.png": ("is a directory", "not_a_file"),
        "missing.png": ("no such file", "missing"),
    }
    for name, (text, kind) in expected.items():
        with pytest.raises(ImageReadError, match=text) as info:
            load_grey(tmp_path / name)
        assert info.value.kind == kind and name in str(info.value)
    assert load_grey(tmp_path / "link.png").shape == (96, 80)  # links to images are followed
    with pytest.raises(ImageReadError, match="character device"):
        load_grey("/dev/zero")  # reading it would never end


def test_fifo_is_never_opened(tmp_path: Path):
    """Opening a FIFO for reading blocks until a writer comes: the reader must refuse it by its type."""
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            load_grey(fifo)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("load_grey opened the FIFO and blocked")
    assert isinstance(result[0], ImageReadError) and "FIFO (named pipe)" in str(result[0])
    assert result[0].kind == "not_a_file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path):
    path = tmp_path / "secret.png"
    path.write_bytes(encode(xray(), "PNG"))
    path.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied") as info:
        load_grey(path)
    assert info.value.kind == "denied"
