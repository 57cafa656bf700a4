"""DICOM reading: 16/8-bit, MONOCHROME1, rescale, windowing, refusals, and no patient data in any message."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_triage.core.dicom import read_dicom
from cxr_triage.core.preprocess import ImageReadError, PreprocessSpec, load_grey, normalise, prepare

PHI = {"PatientName": "Doe^Jane^Q", "PatientID": "PID-0047113", "PatientBirthDate": "19510317"}
PHI_STRINGS = ["Doe", "Jane", "PID-0047113", "19510317"]
SPEC = PreprocessSpec(size=64)


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    pixel_data: bool = True,
    sop_class: str = DigitalXRayImageStorageForPresentation,
    **extra,
) -> bytes:
    """A DICOM Part-10 file (Explicit VR Little Endian) holding ``pixels`` and made-up patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(pixels.shape), photometric])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.Modality = "DX" if sop_class == DigitalXRayImageStorageForPresentation else "OT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if pixels.dtype == np.uint16 else 8
    ds.BitsStored = 12 if pixels.dtype == np.uint16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixel_data:
        ds.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def image12(class_image) -> np.ndarray:
    """A 12-bit (0..4095) 80 x 96 image with structure, spanning the full range."""
    u8 = class_image("lung_opacity", 80, 96, np.random.default_rng(3)).astype(np.float64)
    return np.rint((u8 - u8.min()) * 4095 / (u8.max() - u8.min())).astype(np.uint16)


@pytest.fixture
def ramp() -> np.ndarray:
    """64 x 128 horizontal ramp 0..4095 (uint16)."""
    return np.tile(np.rint(np.linspace(0, 4095, 128)).astype(np.uint16), (64, 1))


def assert_no_phi(*texts: str) -> None:
    for text in texts:
        for s in PHI_STRINGS:
            assert s not in text, f"patient data {s!r} leaked into {text!r}"


def test_file_is_a_real_dicom(image12, tmp_path):
    import pydicom

    data = dicom_bytes(image12)
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, image12)


def test_monochrome2_16bit_matches_png(image12, tmp_path):
    dcm = tmp_path / "a.dcm"
    dcm.write_bytes(dicom_bytes(image12))
    png = tmp_path / "a.png"
    Image.fromarray(np.rint(image12 * (255 / 4095)).astype(np.uint8)).save(png)
    a, b = normalise(prepare(dcm, SPEC), SPEC), normalise(prepare(png, SPEC), SPEC)
    assert a.shape == b.shape == (1, 64, 64) and a.dtype == np.float32
    assert np.abs(a - b).max() <= 1.01 / 255 / SPEC.std  # at most one grey level apart
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    raw = read_dicom(dcm.read_bytes())
    assert raw.dtype == np.float32 and np.array_equal(raw, image12)


def test_dicom_is_recognised_by_content_or_suffix(image12, tmp_path):
    data = dicom_bytes(image12)
    (tmp_path / "no_suffix").write_bytes(data)
    ref = load_grey(data)
    assert ref.shape == (80, 96)
    assert np.array_equal(load_grey(tmp_path / "no_suffix"), ref)  # by the DICM marker
    # a .dcm without the 128-byte preamble is still read as DICOM thanks to its suffix
    (tmp_path / "bare.dcm").write_bytes(data[132:])
    assert np.array_equal(load_grey(tmp_path / "bare.dcm"), ref)


def test_monochrome1_is_inverted_back(image12):
    m2 = normalise(prepare(dicom_bytes(image12), SPEC), SPEC)
    m1 = normalise(prepare(dicom_bytes((4095 - image12).astype(np.uint16), "MONOCHROME1"), SPEC), SPEC)
    np.testing.assert_allclose(m1, m2, rtol=0, atol=1e-6)
    inverted_raw = normalise(prepare(dicom_bytes((4095 - image12).astype(np.uint16)), SPEC), SPEC)
    assert np.corrcoef(inverted_raw.ravel(), m2.ravel())[0, 1] < -0.99  # the inversion really mattered


def test_rescale_slope_intercept(ramp):
    out = read_dicom(dicom_bytes(ramp, RescaleSlope=2, RescaleIntercept=-1024))
    assert np.array_equal(out, ramp.astype(np.float32) * 2 - 1024)


def test_window_center_width_clips(ramp):
    out = read_dicom(dicom_bytes(ramp, WindowCenter=2048, WindowWidth=1024))
    row, x = out[0], ramp[0].astype(int)
    below, above, inside = x < 1536, x > 2560, (x > 1540) & (x < 2555)
    assert below.any() and above.any()
    assert (row[below] == row.min()).all() and (row[above] == row.max()).all()
    assert (np.diff(row[inside]) > 0).all()
    assert row[inside].min() > row.min() and row[inside].max() < row.max()
    grey = load_grey(dicom_bytes(ramp, WindowCenter=2048, WindowWidth=1024))
    assert (grey[:, below] == 0).all() and (grey[:, above] == 255).all()


def test_window_is_in_rescaled_units(ramp):
    # stored 0..4095 -> HU -1024..3071; a window of 0 +/- 200 HU selects stored values 824..1224
    data = dicom_bytes(ramp, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=400)
    grey = load_grey(data)
    x = ramp[0].astype(int)
    assert (grey[:, x < 820] == 0).all() and (grey[:, x > 1230] == 255).all()
    inside = (x > 830) & (x < 1220)
    assert inside.sum() >= 10 and ((grey[0, inside] > 0) & (grey[0, inside] < 255)).all()


def test_8bit_secondary_capture_matches_png(image12, tmp_path):
    u8 = np.rint(image12 * (255 / 4095)).astype(np.uint8)
    data = dicom_bytes(u8, sop_class=SecondaryCaptureImageStorage)
    png = io.BytesIO()
    Image.fromarray(u8).save(png, "PNG")
    assert np.array_equal(load_grey(data), u8)
    assert np.array_equal(normalise(prepare(data, SPEC), SPEC), normalise(prepare(png.getvalue(), SPEC), SPEC))


def _no_pixels(image12):
    return dicom_bytes(image12, pixel_data=False)


def _multi_frame(image12):
    return dicom_bytes(np.stack([image12, image12]), frames=2)


def _truncated(image12):
    return dicom_bytes(image12)[:-2000]


def _garbage(image12):
    return np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_no_pixels, "no image"),
        (_multi_frame, "multi-frame"),
        (_truncated, "pixel data is truncated"),
        (_garbage, ""),
    ],
    ids=["no-pixel-data", "multi-frame", "truncated", "garbage"],
)
def test_refusals_name_the_problem_and_leak_no_patient_data(make, message, image12, tmp_path, caplog):
    path = tmp_path / "scan.dcm"
    path.write_bytes(make(image12))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError, match=message) as info:
            load_grey(path)
        with pytest.raises(ImageReadError, match=message):
            normalise(prepare(path.read_bytes(), SPEC, name="scan.dcm"), SPEC)
    assert_no_phi(str(info.value), repr(info.value), caplog.text, *(str(w.message) for w in caught))
    exc = info.value  # no pydicom traceback (which may quote the file's elements) rides along
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_successful_read_logs_no_patient_data(image12, caplog):
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_grey(dicom_bytes(image12, WindowCenter=2048, WindowWidth=4096))
    assert_no_phi(caplog.text, *(str(w.message) for w in caught))


def test_compressed_without_decoder_names_syntax_and_fix(caplog):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((64, 64), np.uint8))))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7not-really-jpeg-ls\xff\xd9"])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError, match="JPEG-LS") as info:
        load_grey(buf.getvalue())
    assert "pip install" in str(info.value)
    assert_no_phi(str(info.value), caplog.text)


def test_predictions_from_dicom_match_the_png(tiny_bundle, image12, tmp_path):
    """MONOCHROME2 and MONOCHROME1 16-bit DICOMs of an image are classified like its PNG."""
    from cxr_triage.runtime.predictor import Predictor

    (tmp_path / "m2.dcm").write_bytes(dicom_bytes(image12))
    (tmp_path / "m1.dcm").write_bytes(dicom_bytes((4095 - image12).astype(np.uint16), "MONOCHROME1"))
    Image.fromarray(np.rint(image12 * (255 / 4095)).astype(np.uint8)).save(tmp_path / "a.png")
    paths = [str(tmp_path / n) for n in ("a.png", "m2.dcm", "m1.dcm")]
    rows = list(s.prediction for s in Predictor(tiny_bundle).predict_files(paths))
    assert all(r.decision != "error" for r in rows), rows
    ref = np.array(list(rows[0].probabilities.values()))
    for r in rows[1:]:
        p = np.array(list(r.probabilities.values()))
        assert r.label == rows[0].label and np.abs(p - ref).max() < 2e-2
        assert all(v not in str(r) for v in PHI.values())
