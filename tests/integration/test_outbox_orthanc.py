"""Store-and-forward against a real PACS (Debian's Orthanc): results reach it after it was down, slow, or the node
restarted; a permanent rejection is shown as such and not retried; one SOP Instance UID in two studies is two
entries with two sets of results. Short back-off settings keep each test to seconds."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

pynetdicom = pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")
pytest.importorskip("httpx")

from cxr_triage.dicom import node as dicom_node  # noqa: E402
from cxr_triage.dicom.outbox import RetryPolicy  # noqa: E402
from cxr_triage.dicom.triage import SUCCESS  # noqa: E402
from cxr_triage.runtime.worklist import read_worklist  # noqa: E402
from tests.dicom_samples import chest_dicom, sr_summary  # noqa: E402
from tests.orthanc import ORTHANC_AET, Orthanc, orthanc_binary  # noqa: E402
from tests.ports import free_port  # noqa: E402

pytestmark = pytest.mark.orthanc
FAST = RetryPolicy(first_delay=0.3, max_delay=1.0, give_up_after=300, timeout=10)
SLOW_FIRST_STORE = """
stores = 0
function ReceivedInstanceFilter(dicom, origin, info)
  stores = stores + 1
  if stores == 1 then os.execute('sleep 3') end
  return true
end
"""


@pytest.fixture(autouse=True)
def orthanc_installed() -> None:
    if orthanc_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc is missing: .ci/run installs Debian's orthanc package")
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc)")


class Node:
    """The node in this process, sending to ``send_to`` with ``retry``; ``stop()`` ends it and its outbox."""

    def __init__(self, send_to: str, store: Path, retry: RetryPolicy = FAST) -> None:
        self.port, self.store = free_port(), store
        self.server = dicom_node.start("CXR_TRIAGE", self.port, send_to, store=store, retry=retry)

    def send(self, data: bytes) -> tuple[int, float]:
        """C-STORE one Part-10 file as a modality would: (status, seconds to the answer)."""
        ds = pydicom.dcmread(io.BytesIO(data))
        ae = pynetdicom.AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID)
        t0 = time.perf_counter()
        assoc = ae.associate("127.0.0.1", self.port, ae_title="CXR_TRIAGE")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status), time.perf_counter() - t0
        finally:
            assoc.release()

    def entry(self, study_uid: str) -> dict[str, Any]:
        return next(e for e in read_worklist(self.store) if e["study_instance_uid"] == study_uid)

    def wait_status(self, study_uid: str, status: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (entry := self.entry(study_uid))["results_status"] != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"results are {entry['results_status']} ({entry['results_reason']}), not {status}")
            time.sleep(0.05)
        return entry

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


@pytest.fixture
def pacs_list() -> Iterator[list[Orthanc]]:
    started: list[Orthanc] = []
    yield started
    for orthanc in started:
        orthanc.stop()


def study_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


def test_pacs_down_then_up_gets_the_results_after_a_retry(tmp_path, nodes, pacs_list):
    port = free_port()
    node = Node(f"{ORTHANC_AET}@127.0.0.1:{port}", tmp_path / "store")
    nodes.append(node)
    data = chest_dicom("COVID-1803.jpg")
    status, seconds = node.send(data)
    assert status == SUCCESS  # stored and queued: the modality is done even though the PACS is down
    node.wait_status(study_of(data), "queued")
    deadline = time.monotonic() + 10  # the first retry is due 0.3 s after the first try; a busy runner may lag
    while (entry := node.entry(study_of(data)))["results"][0]["attempts"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entry["results"][0]["attempts"] >= 2  # tried again, with back-off
    assert "could not associate" in entry["results_reason"] and entry["retry_at"] is not None
    orthanc = Orthanc(tmp_path / "pacs", "CXR_TRIAGE", node.port, dicom_port=port)
    pacs_list.append(orthanc)
    found = orthanc.wait_for_study(study_of(data), {"SR", "OT"})
    assert len(found["SR"]) == len(found["OT"]) == 1
    entry = node.wait_status(study_of(data), "sent")
    assert entry["results_sent"] is True and [r["status"] for r in entry["results"]] == ["sent", "sent"]


def test_a_restarted_node_sends_what_it_had_queued(tmp_path, nodes, pacs_list):
    port, store = free_port(), tmp_path / "store"
    first = Node(f"{ORTHANC_AET}@127.0.0.1:{port}", store, RetryPolicy(first_delay=3600, max_delay=3600))
    data = chest_dicom("Lung_Opacity-34.jpg")
    assert first.send(data)[0] == SUCCESS
    deadline = time.monotonic() + 10
    while first.entry(study_of(data))["results"][0]["attempts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop()  # next try in an hour; the node goes down with its results queued
    orthanc = Orthanc(tmp_path / "pacs", "CXR_TRIAGE", 104, dicom_port=port)
    pacs_list.append(orthanc)
    again = Node(orthanc.send_to, store, RetryPolicy(first_delay=3600, max_delay=3600))
    nodes.append(again)
    orthanc.wait_for_study(study_of(data), {"SR", "OT"})
    assert again.wait_status(study_of(data), "sent")["results_sent"] is True


def test_a_slow_pacs_gets_both_results_and_the_worklist_says_sent(tmp_path, nodes, pacs_list):
    orthanc = Orthanc(tmp_path / "pacs", "CXR_TRIAGE", 104, lua=SLOW_FIRST_STORE)
    pacs_list.append(orthanc)
    node = Node(orthanc.send_to, tmp_path / "store", RetryPolicy(0.3, 1.0, 300, timeout=1.5))
    nodes.append(node)
    data = chest_dicom("Viral_Pneumonia-447.jpg")
    status, seconds = node.send(data)
    assert status == SUCCESS and seconds < 3  # not held up by the PACS's 3 s store
    found = orthanc.wait_for_study(study_of(data), {"SR", "OT"})
    assert len(found["SR"]) == len(found["OT"]) == 1
    entry = node.wait_status(study_of(data), "sent")
    assert max(r["attempts"] for r in entry["results"]) >= 2  # the first try timed out and was retried


def test_a_permanent_rejection_is_shown_and_not_retried(tmp_path, nodes, pacs_list):
    orthanc = Orthanc(tmp_path / "pacs", "CXR_TRIAGE", 104, DicomCheckCalledAet=True)
    pacs_list.append(orthanc)
    node = Node(f"WRONG_AET@127.0.0.1:{orthanc.dicom_port}", tmp_path / "store")
    nodes.append(node)
    data = chest_dicom("Normal-2279.jpg")
    assert node.send(data)[0] == SUCCESS
    entry = node.wait_status(study_of(data), "failed")
    assert "Rejected Permanent" in entry["results_reason"] and "called AE title" in entry["results_reason"]
    time.sleep(1.5)  # several back-off periods
    entry = node.entry(study_of(data))
    assert [r["attempts"] for r in entry["results"]] == [1, 1] and entry["retry_at"] is None
    assert orthanc.study_id(study_of(data)) is None


def test_one_sop_instance_uid_in_two_studies_is_kept_apart(tmp_path, nodes, pacs_list):
    orthanc = Orthanc(tmp_path / "pacs", "CXR_TRIAGE", 104)
    pacs_list.append(orthanc)
    node = Node(orthanc.send_to, tmp_path / "store")
    nodes.append(node)
    uid = pydicom.uid.generate_uid()
    first = chest_dicom("COVID-1803.jpg", SOPInstanceUID=uid)
    second = chest_dicom("Normal-2279.jpg", SOPInstanceUID=uid)
    for data in (first, second):
        assert node.send(data)[0] == SUCCESS
    entries = [node.wait_status(study_of(d), "sent") for d in (first, second)]
    assert [e["sop_instance_uid"] for e in entries] == [uid, uid] and entries[0]["label"] != entries[1]["label"]
    results = []
    for data in (first, second):
        found = orthanc.wait_for_study(study_of(data), {"SR", "OT"})
        sr = pydicom.dcmread(io.BytesIO(orthanc.file(found["SR"][0])))
        results.append((str(sr.SOPInstanceUID), sr_summary(sr)["label"]))
    assert results[0][0] != results[1][0]  # two SRs, neither overwriting the other in the PACS
    assert [label for _, label in results] == [e["label"] for e in entries]
