"""The SR and the heatmap Secondary Capture: content, references, identifiers copied (and not), DICOM validity."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

pytest.importorskip("highdicom", reason="the [dicom] extra is not installed")

from cxr_triage.core.classes import CLASS_IDS  # noqa: E402
from cxr_triage.dicom.report import (  # noqa: E402
    CAPTION,
    PROBABILITY_CODES,
    RESEARCH_ONLY,
    ReportContent,
    ReportError,
    build_sc,
    build_sr,
    burn_caption,
    content_of,
    filing_dataset,
)
from cxr_triage.runtime.prediction import ModelInfo, Prediction  # noqa: E402
from cxr_triage.runtime.predictor import Predictor  # noqa: E402
from tests.dicom_samples import FILED, PRIVATE, PRIVATE_STRINGS, chest_dicom, sr_summary  # noqa: E402

MODEL = {"name": "cxr-triage-test", "version": "9.9.9", "sha256": "ab" * 32}


def error_pred(path: str, reason: str) -> Prediction:
    """The prediction the DICOM node makes of an instance it cannot read."""
    return Prediction.unreadable(path, reason, ModelInfo(**MODEL))


@pytest.fixture(scope="module")
def engine() -> Predictor:
    return Predictor()


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return chest_dicom()


@pytest.fixture(scope="module")
def source(source_bytes: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True)


@pytest.fixture(scope="module")
def pred(engine: Predictor, source_bytes: bytes) -> Prediction:
    """The source's prediction with its heatmap, as if made by the MODEL test model."""
    p = engine.predict(source_bytes, "x.dcm", "x.dcm", heatmap=True)
    return p.model_copy(update={"model": ModelInfo(**MODEL)})


def roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def all_text(ds: Dataset) -> str:
    """Every value in the dataset, nested sequences included, as one string."""
    parts: list[str] = []
    ds.walk(lambda _ds, elem: parts.append(str(elem.value)) if elem.VR not in ("SQ", "OB", "OW") else None)
    return "\n".join(parts)


def test_content_of_maps_every_field(pred):
    c = content_of(pred)
    assert c.label == pred.label and c.decision == pred.decision and c.advice == pred.advice
    assert c.probabilities == {k: pytest.approx(getattr(pred, f"p_{k}")) for k in CLASS_IDS}
    assert (c.model_name, c.model_version, c.model_sha256) == ("cxr-triage-test", "9.9.9", "ab" * 32)
    err = content_of(error_pred("x.dcm", "pixel data is truncated"))
    assert err.decision == "error" and err.label == "" and err.probabilities == {}
    assert err.error == "pixel data is truncated"


def test_sr_holds_the_prediction_and_references_the_source(source, pred):
    sr = roundtrip(build_sr(source, content_of(pred)))
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    got = sr_summary(sr)
    assert got["label"] == pred.label and got["decision"] == pred.decision
    assert got["probabilities"] == {PROBABILITY_CODES[k]: pytest.approx(getattr(pred, f"p_{k}")) for k in CLASS_IDS}
    assert got["advice"] == pred.advice and got["error"] == ""
    assert (got["model_name"], got["model_version"], got["model_sha256"]) == ("cxr-triage-test", "9.9.9", "ab" * 32)
    assert got["notice"] == RESEARCH_ONLY and "research use only" in got["notice"].lower()
    assert got["source"] == source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"


def test_results_copy_only_the_identifiers_that_file_them(source, pred):
    content = content_of(pred)
    for result in (build_sr(source, content), build_sc(source, pred.heatmap, content)):
        ds = roundtrip(result)
        assert str(ds.PatientName) == FILED["PatientName"] and ds.PatientID == FILED["PatientID"]
        assert ds.AccessionNumber == FILED["AccessionNumber"]
        text = all_text(ds)
        for s in PRIVATE_STRINGS:
            assert s not in text, f"{s!r} was copied from the source header"
        for keyword in PRIVATE:
            assert not ds.get(keyword), f"{keyword} should be absent or empty"


def test_filing_dataset_is_minimal_and_refuses_without_uids(source):
    filing = filing_dataset(source)
    assert set(filing.dir()) <= {
        "SpecificCharacterSet",
        *FILED,
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
    }
    broken = Dataset()
    broken.SOPClassUID, broken.SOPInstanceUID, broken.SeriesInstanceUID = source.SOPClassUID, "1.2.3", "1.2.4"
    with pytest.raises(ReportError, match="StudyInstanceUID"):
        filing_dataset(broken)


def test_error_sr_says_why(source):
    sr = roundtrip(build_sr(source, content_of(error_pred("x.dcm", "DICOM pixel data is truncated"))))
    got = sr_summary(sr)
    assert got["decision"] == "error" and got["label"] == "" and got["probabilities"] == {}
    assert got["error"] == "DICOM pixel data is truncated" and got["source"] == source.SOPInstanceUID


def test_result_uids_are_stable_per_source_and_model(source, pred):
    content = content_of(pred)
    a, b = build_sr(source, content), build_sr(source, content)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    other = pydicom.dcmread(io.BytesIO(chest_dicom(study_uid=str(source.StudyInstanceUID))), stop_before_pixels=True)
    c = build_sr(other, content)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID == a.SeriesInstanceUID  # one series a study
    newer = build_sr(source, ReportContent(**{**content.__dict__, "model_sha256": "cd" * 32}))
    assert newer.SOPInstanceUID != a.SOPInstanceUID


def test_caption_is_burned_below_the_image():
    rgb = np.full((120, 200, 3), 90, np.uint8)
    out = burn_caption(rgb, [CAPTION, "second line"])
    assert out.shape[1:] == (200, 3) and out.shape[0] > 120
    assert np.array_equal(out[:120], rgb)
    band = out[120:]
    assert (band > 200).sum() > 50 and (band == 0).mean() > 0.5  # white text on black


def test_sc_is_the_captioned_heatmap_in_a_new_series(source, pred):
    content = content_of(pred)
    sc = roundtrip(build_sc(source, pred.heatmap, content))
    h, w = pred.heatmap.shape[:2]
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.PhotometricInterpretation == "RGB"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, build_sr(source, content).SeriesInstanceUID)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    px = sc.pixel_array
    assert px.shape[0] > h and px.shape[1] == w and np.array_equal(px[:h], pred.heatmap)
    assert (px[h:] > 200).sum() > 50  # the caption


def dciodvfy_errors(ds: Dataset, tmp: Path) -> list[str]:
    path = tmp / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("kind", ["sr", "error-sr", "sc"])
def test_results_pass_dciodvfy(kind, source, pred, tmp_path):
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy is missing: .ci/run installs Debian's dicom3tools")
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    content = content_of(pred if kind != "error-sr" else error_pred("x", "unreadable"))
    ds = build_sc(source, pred.heatmap, content) if kind == "sc" else build_sr(source, content)
    assert dciodvfy_errors(ds, tmp_path) == []


def test_odd_identifiers_are_kept_as_received_and_never_echoed(pred, recwarn, caplog):
    caplog.set_level("DEBUG")
    odd = pydicom.dcmread(io.BytesIO(chest_dicom(PatientName="DOE JANE")), stop_before_pixels=True)
    content = content_of(pred)
    for result in (build_sr(odd, content), build_sc(odd, pred.heatmap, content)):
        assert str(roundtrip(result).PatientName) == "DOE JANE"  # a single-component name, copied as it is
    echoed = [str(w.message) for w in recwarn] + [caplog.text]
    assert not [m for m in echoed if "DOE" in m]


# --- no PHI in what we make: burned-in text declared, copied values cut to their VR's length (issue 24) ---

LONG_ACCESSION = "ACC-" + "7" * 32  # 36 characters; SH allows 16
LONG_PATIENT_ID = "PID-" + "4" * 76  # 80 characters; LO allows 64
LONG_NAME = "Doe" * 24 + "^" + "Jane" * 4  # 89 characters in one component group; PN allows 64
CORPUS = {  # name -> (header values of the source, BurnedInAnnotation the picture must say)
    "burned-in YES": ({"BurnedInAnnotation": "YES"}, "YES"),
    "burned-in not said": ({}, "YES"),
    "burned-in NO": ({"BurnedInAnnotation": "NO"}, "NO"),
    "burned-in lowercase no": ({"BurnedInAnnotation": "no"}, "YES"),  # not a valid NO: assume the worst
    "over-long accession": ({"AccessionNumber": LONG_ACCESSION}, "YES"),
    "over-long ids and name": ({"PatientID": LONG_PATIENT_ID, "PatientName": LONG_NAME}, "YES"),
    "over-long name groups": ({"PatientName": f"{'A' * 70}={'B' * 70}={'C' * 70}", "BurnedInAnnotation": "NO"}, "NO"),
}


def text_on_pixels() -> bytes:
    """A source whose pixels carry a patient's name and birth date (as old CR plates do), over-long values, no
    BurnedInAnnotation."""
    from PIL import Image, ImageDraw

    from tests.dicom_samples import sample_pixels

    img = Image.fromarray(sample_pixels())
    ImageDraw.Draw(img).text((8, 8), "DOE^JANE 19510317", fill=255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(chest_dicom(AccessionNumber=LONG_ACCESSION)))
        ds.PixelData = np.asarray(img).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def header(data: bytes) -> Dataset:
    """The header of a Part-10 file (pydicom's warnings about over-long values silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def corpus_source(values: dict) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return header(chest_dicom(**values))


def built(source: Dataset, pred: Prediction) -> list[Dataset]:
    """The SR and the SC of ``source``, through a file and back; no warning about a value's length on the way."""
    content = content_of(pred)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exceeds the maximum.*")
        return [roundtrip(build_sr(source, content)), roundtrip(build_sc(source, pred.heatmap, content))]


@pytest.mark.parametrize("case", list(CORPUS))
def test_picture_declares_burned_in_text_unless_the_source_says_none(case, pred):
    values, expected = CORPUS[case]
    sr, sc = built(corpus_source(values), pred)
    assert sc.BurnedInAnnotation == expected
    assert "BurnedInAnnotation" not in sr  # the SR holds no pixels


@pytest.mark.parametrize("case", list(CORPUS))
def test_copied_values_are_cut_to_their_vr_length(case, pred):
    values, _ = CORPUS[case]
    source = corpus_source(values)
    for ds in built(source, pred):
        assert len(ds.AccessionNumber) <= 16 and len(ds.PatientID) <= 64
        assert len(str(ds.PatientName)) <= 64 and "=" not in str(ds.PatientName)  # the alphabetic group only
        assert str(source.AccessionNumber).startswith(ds.AccessionNumber) and ds.AccessionNumber
        assert str(source.PatientID).startswith(ds.PatientID)
        assert ds.StudyInstanceUID == source.StudyInstanceUID  # UIDs are never cut
    if case == "over-long name groups":
        assert [str(ds.PatientName) for ds in built(source, pred)] == ["A" * 64] * 2


def test_text_burned_into_the_pixels_is_declared_and_values_cut(engine):
    data = text_on_pixels()
    source = header(data)
    pred = engine.predict(data, "x.dcm", "x.dcm", heatmap=True)
    sr, sc = built(source, pred)
    assert sc.BurnedInAnnotation == "YES"
    assert sr.AccessionNumber == sc.AccessionNumber == LONG_ACCESSION[:16]


def test_over_long_uids_are_refused_not_cut(pred):
    source = corpus_source({"StudyInstanceUID": "1.2." + "3" * 70})
    with pytest.raises(ReportError, match="StudyInstanceUID is longer than a UID may be"):
        build_sr(source, content_of(pred))


@pytest.mark.parametrize("case", ["burned-in YES", "over-long ids and name", "over-long name groups"])
def test_corpus_results_pass_dciodvfy(case, pred, tmp_path):
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy is missing: .ci/run installs Debian's dicom3tools")
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    for ds in built(corpus_source(CORPUS[case][0]), pred):
        assert dciodvfy_errors(ds, tmp_path) == []
