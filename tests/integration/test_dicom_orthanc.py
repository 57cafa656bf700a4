"""Against a real PACS: Orthanc (Debian's package) sends chest X-rays to `cxr-triage dicom-node`, and the SR and the
heatmap picture come back into the same study, where the test finds them through Orthanc's REST API."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage

pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")
pytest.importorskip("httpx")

from cxr_triage.runtime.predictor import Predictor  # noqa: E402
from cxr_triage.runtime.worklist import read_worklist  # noqa: E402
from tests.dicom_samples import FILED, FILED_STRINGS, PRIVATE_STRINGS, chest_dicom, sr_summary  # noqa: E402
from tests.orthanc import NodeProcess, Orthanc, orthanc_binary  # noqa: E402
from tests.ports import free_port  # noqa: E402

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, NodeProcess, Path]]:
    """Orthanc (auto-routing CR/DX to the node) and the node, both child processes; the node's --store."""
    if orthanc_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc is missing: .ci/run installs Debian's orthanc package")
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc)")
    work = tmp_path_factory.mktemp("orthanc")
    node_port = free_port()
    orthanc = Orthanc(work / "pacs", "CXR_TRIAGE", node_port, route=True)
    try:
        node = NodeProcess(orthanc, node_port, work / "store", work / "node.log")
    except Exception:
        orthanc.stop()
        raise
    yield orthanc, node, work / "store"
    node.stop()
    orthanc.stop()


def result_datasets(orthanc: Orthanc, study: str, found: dict[str, list[str]]) -> dict[str, pydicom.Dataset]:
    return {m: pydicom.dcmread(io.BytesIO(orthanc.file(found[m][0]))) for m in ("SR", "OT") if m in found}


def sent_entry(store: Path, sop_uid: str, timeout: float = 10) -> dict:
    """The worklist entry of ``sop_uid`` once the outbox has marked its results sent (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while True:
        entry = next(e for e in read_worklist(store) if e["sop_instance_uid"] == sop_uid)
        if entry["results_sent"] or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def test_pacs_echoes_the_node(pacs):
    assert pacs[0].echo()


def test_sr_and_picture_come_back_into_the_study(pacs):
    orthanc, node, store = pacs
    data = chest_dicom("COVID-1803.jpg")
    source = pydicom.dcmread(io.BytesIO(data))
    stored = orthanc.upload(data)  # DX: auto-routed to the node by the Lua script
    found = orthanc.wait_for(stored["ParentStudy"], {"SR", "OT"})
    assert found["DX"] == [stored["ID"]] and len(found["SR"]) == len(found["OT"]) == 1
    results = result_datasets(orthanc, stored["ParentStudy"], found)
    engine = Predictor()
    expected = engine.predict(data, "x.dcm", "x.dcm")
    got = sr_summary(results["SR"])
    assert got["label"] == expected.label and got["decision"] == expected.decision
    assert got["probabilities"]["PCOVID"] == pytest.approx(expected.p_covid, abs=1e-6)
    assert got["model_sha256"] == engine.info["sha256"] and got["model_version"] == engine.info["version"]
    assert "research use only" in got["notice"].lower() and got["source"] == source.SOPInstanceUID
    for ds in results.values():
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert str(ds.PatientName) == FILED["PatientName"] and ds.AccessionNumber == FILED["AccessionNumber"]
    assert results["OT"].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    entry = sent_entry(store, str(source.SOPInstanceUID))
    assert entry["results_sent"] is True and entry["results_status"] == "sent" and entry["label"] == expected.label


def test_c_store_from_the_pacs_rest_api(pacs):
    orthanc = pacs[0]
    data = chest_dicom("Viral_Pneumonia-447.jpg", sop_class=ComputedRadiographyImageStorage)
    stored = orthanc.upload(data)  # CR: auto-routed too; sending it again on purpose must not duplicate results
    orthanc.wait_for(stored["ParentStudy"], {"SR", "OT"})
    job = orthanc.send([stored["ID"]])
    assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0
    found = orthanc.results(stored["ParentStudy"])
    assert len(found["SR"]) == len(found["OT"]) == 1  # same source, same model: the same result UIDs
    got = sr_summary(result_datasets(orthanc, stored["ParentStudy"], found)["SR"])
    assert got["label"] == Predictor().predict(data, "x.dcm", "x.dcm").label


def test_corrupt_instance_gets_the_error_sr(pacs):
    orthanc = pacs[0]
    data = chest_dicom(truncate_pixels=True)
    stored = orthanc.upload(data)
    found = orthanc.wait_for(stored["ParentStudy"], {"SR"})
    got = sr_summary(result_datasets(orthanc, stored["ParentStudy"], found)["SR"])
    assert got["decision"] == "error" and got["label"] == "" and "truncated" in got["error"]
    assert "OT" not in found
    assert orthanc.echo()  # the node is alive


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the test's own invalid birth date
def test_node_logs_hold_no_identifiers(pacs):
    orthanc, node, _ = pacs
    data = chest_dicom("Lung_Opacity-34.jpg")
    odd = chest_dicom("Normal-2279.jpg", PatientName="ODDNAME SINGLE", PatientBirthDate="1951-03-17")  # not valid
    source = pydicom.dcmread(io.BytesIO(data))
    for d in (data, odd):
        orthanc.wait_for(orthanc.upload(d)["ParentStudy"], {"SR", "OT"})
    log = node.log_path.read_text()
    assert "instance " in log and "sent" in log
    secrets = [*FILED_STRINGS, *PRIVATE_STRINGS, "ODDNAME", "1951-03-17"]
    for secret in [*secrets, str(source.SOPInstanceUID), str(source.StudyInstanceUID)]:
        assert secret not in log, f"{secret!r} reached the node's log"
