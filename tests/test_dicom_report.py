"""The SR and the heatmap Secondary Capture: content, references, identifiers copied (and not), DICOM validity."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

pytest.importorskip("highdicom", reason="the [dicom] extra is not installed")

from cxr_triage.core.classes import CLASS_IDS  # noqa: E402
from cxr_triage.runtime.dicom_report import (  # noqa: E402
    CAPTION,
    PROBABILITY_CODES,
    RESEARCH_ONLY,
    ReportContent,
    ReportError,
    build_sc,
    build_sr,
    burn_caption,
    content_from_row,
    filing_dataset,
)
from cxr_triage.runtime.engine import Engine  # noqa: E402
from cxr_triage.runtime.predict import error_row, predict_bytes  # noqa: E402
from tests.dicom_samples import FILED, PRIVATE, PRIVATE_STRINGS, chest_dicom, sr_summary  # noqa: E402

MODEL = {"name": "cxr-triage-test", "version": "9.9.9", "sha256": "ab" * 32}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return chest_dicom()


@pytest.fixture(scope="module")
def source(source_bytes: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True)


@pytest.fixture(scope="module")
def row(engine: Engine, source_bytes: bytes) -> dict:
    return predict_bytes(engine, source_bytes, name="x.dcm", heatmap=True)


def roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def all_text(ds: Dataset) -> str:
    """Every value in the dataset, nested sequences included, as one string."""
    parts: list[str] = []
    ds.walk(lambda _ds, elem: parts.append(str(elem.value)) if elem.VR not in ("SQ", "OB", "OW") else None)
    return "\n".join(parts)


def test_content_from_row_maps_every_field(row):
    c = content_from_row(row, MODEL)
    assert c.label == row["label"] and c.decision == row["decision"] and c.advice == row["advice"]
    assert c.probabilities == {k: pytest.approx(row[f"p_{k}"]) for k in CLASS_IDS}
    assert (c.model_name, c.model_version, c.model_sha256) == ("cxr-triage-test", "9.9.9", "ab" * 32)
    err = content_from_row(error_row("x.dcm", "pixel data is truncated"), MODEL)
    assert err.decision == "error" and err.label == "" and err.probabilities == {}
    assert err.error == "pixel data is truncated"


def test_sr_holds_the_prediction_and_references_the_source(source, row):
    sr = roundtrip(build_sr(source, content_from_row(row, MODEL)))
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    got = sr_summary(sr)
    assert got["label"] == row["label"] and got["decision"] == row["decision"]
    assert got["probabilities"] == {PROBABILITY_CODES[k]: pytest.approx(row[f"p_{k}"]) for k in CLASS_IDS}
    assert got["advice"] == row["advice"] and got["error"] == ""
    assert (got["model_name"], got["model_version"], got["model_sha256"]) == ("cxr-triage-test", "9.9.9", "ab" * 32)
    assert got["notice"] == RESEARCH_ONLY and "research use only" in got["notice"].lower()
    assert got["source"] == source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"


def test_results_copy_only_the_identifiers_that_file_them(source, row):
    content = content_from_row(row, MODEL)
    for result in (build_sr(source, content), build_sc(source, row["heatmap"], content)):
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
    sr = roundtrip(build_sr(source, content_from_row(error_row("x.dcm", "DICOM pixel data is truncated"), MODEL)))
    got = sr_summary(sr)
    assert got["decision"] == "error" and got["label"] == "" and got["probabilities"] == {}
    assert got["error"] == "DICOM pixel data is truncated" and got["source"] == source.SOPInstanceUID


def test_result_uids_are_stable_per_source_and_model(source, row):
    content = content_from_row(row, MODEL)
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


def test_sc_is_the_captioned_heatmap_in_a_new_series(source, row):
    content = content_from_row(row, MODEL)
    sc = roundtrip(build_sc(source, row["heatmap"], content))
    h, w = row["heatmap"].shape[:2]
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.PhotometricInterpretation == "RGB"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, build_sr(source, content).SeriesInstanceUID)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    px = sc.pixel_array
    assert px.shape[0] > h and px.shape[1] == w and np.array_equal(px[:h], row["heatmap"])
    assert (px[h:] > 200).sum() > 50  # the caption


def dciodvfy_errors(ds: Dataset, tmp: Path) -> list[str]:
    path = tmp / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("kind", ["sr", "error-sr", "sc"])
def test_results_pass_dciodvfy(kind, source, row, tmp_path):
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy is missing: .ci/run installs Debian's dicom3tools")
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    content = content_from_row(row if kind != "error-sr" else error_row("x", "unreadable"), MODEL)
    ds = build_sc(source, row["heatmap"], content) if kind == "sc" else build_sr(source, content)
    assert dciodvfy_errors(ds, tmp_path) == []


def test_odd_identifiers_are_kept_as_received_and_never_echoed(row, recwarn, caplog):
    caplog.set_level("DEBUG")
    odd = pydicom.dcmread(io.BytesIO(chest_dicom(PatientName="DOE JANE")), stop_before_pixels=True)
    content = content_from_row(row, MODEL)
    for result in (build_sr(odd, content), build_sc(odd, row["heatmap"], content)):
        assert str(roundtrip(result).PatientName) == "DOE JANE"  # a single-component name, copied as it is
    echoed = [str(w.message) for w in recwarn] + [caplog.text]
    assert not [m for m in echoed if "DOE" in m]
