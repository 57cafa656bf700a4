"""The DICOM node over the network (pynetdicom on both sides): C-ECHO, results sent back to a stand-in PACS,
refusals, the error SR, no loops, no identifiers in logs. The real-PACS test is test_dicom_orthanc.py."""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)

pynetdicom = pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")

from cxr_triage.dicom import node as dicom_node  # noqa: E402
from cxr_triage.dicom.send import Delivery, parse_peer  # noqa: E402
from cxr_triage.dicom.triage import SOP_CLASS_NOT_SUPPORTED, SUCCESS  # noqa: E402
from cxr_triage.runtime.predictor import Predictor  # noqa: E402
from cxr_triage.runtime.worklist import read_worklist  # noqa: E402
from tests.dicom_peers import StandInPACS, scu, store  # noqa: E402
from tests.dicom_samples import FILED_STRINGS, PRIVATE_STRINGS, chest_dicom, sr_summary  # noqa: E402
from tests.ports import free_port  # noqa: E402


@pytest.fixture(scope="module")
def node(pacs: StandInPACS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    store = tmp_path_factory.mktemp("node_store")
    port = free_port()
    server = dicom_node.start("CXR_TRIAGE", port, f"PACS@127.0.0.1:{pacs.port}", store=store)
    yield port, store
    server.shutdown()


def test_parse_peer():
    assert str(parse_peer("ORTHANC@127.0.0.1:4242")) == "ORTHANC@127.0.0.1:4242"
    assert parse_peer("PACS@[::1]:104").host == "::1"
    for bad in ("ORTHANC127.0.0.1:4242", "ORTHANC@host", "@host:1", "A@h:70000", "TOOLONGAETITLE1234@h:1"):
        with pytest.raises(ValueError, match="AET@HOST:PORT"):
            parse_peer(bad)


def test_c_echo(node):
    assoc = scu(pynetdicom.sop_class.Verification).associate("127.0.0.1", node[0], ae_title="CXR_TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_dx_instance_gets_an_sr_and_a_picture_in_its_study(node, pacs, caplog):
    caplog.set_level(logging.DEBUG)
    pacs.take()
    data = chest_dicom("COVID-1803.jpg")
    source = pydicom.dcmread(io.BytesIO(data))
    assert store(node[0], data) == SUCCESS
    results = {ds.Modality: ds for ds in pacs.wait(2)}
    assert set(results) == {"SR", "OT"}
    expected = Predictor().predict(data, "x.dcm", "x.dcm")
    got = sr_summary(results["SR"])
    assert got["label"] == expected.label and got["decision"] == expected.decision
    assert got["model_sha256"] == Predictor().info["sha256"] and got["source"] == source.SOPInstanceUID
    for ds in results.values():
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert str(ds.PatientName) == str(source.PatientName) and ds.AccessionNumber == source.AccessionNumber
    assert results["OT"].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    entry = wait_sent(node[1], source.SOPInstanceUID)
    assert entry["label"] == expected.label and entry["results_sent"] is True
    logs = caplog.text
    assert "instance " in logs and expected.decision in logs  # the node did log this instance ...
    for secret in [*FILED_STRINGS, *PRIVATE_STRINGS, str(source.SOPInstanceUID), str(source.StudyInstanceUID)]:
        assert secret not in logs, f"{secret!r} reached the logs"  # ... without any identifier


@pytest.mark.parametrize("sop_class", [ComputedRadiographyImageStorage, SecondaryCaptureImageStorage])
def test_cr_and_secondary_capture_are_triaged(node, pacs, sop_class):
    pacs.take()
    assert store(node[0], chest_dicom("Normal-1655.jpg", sop_class=sop_class)) == SUCCESS
    assert sorted(ds.Modality for ds in pacs.wait(2)) == ["OT", "SR"]


def test_other_sop_classes_are_refused_at_association(node):
    assoc = scu(CTImageStorage, DigitalXRayImageStorageForPresentation).associate(
        "127.0.0.1", node[0], ae_title="CXR_TRIAGE"
    )
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [DigitalXRayImageStorageForPresentation]
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CTImageStorage]
    finally:
        assoc.release()


def test_undecodable_instance_gets_an_error_sr(node, pacs):
    pacs.take()
    data = chest_dicom(truncate_pixels=True)
    assert store(node[0], data) == SUCCESS  # answered, and the node still serves
    (sr,) = pacs.wait(1)
    got = sr_summary(sr)
    assert sr.Modality == "SR" and got["decision"] == "error" and got["label"] == ""
    assert "truncated" in got["error"] and got["source"] == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    assert store(node[0], chest_dicom()) == SUCCESS
    assert len(pacs.wait(2)) == 2


def test_own_results_are_not_triaged_again(node, pacs):
    pacs.take()
    assert store(node[0], chest_dicom("Viral_Pneumonia-40.jpg")) == SUCCESS
    picture = next(ds for ds in pacs.wait(2) if ds.Modality == "OT")
    buf = io.BytesIO()
    picture.save_as(buf, enforce_file_format=True)
    assert store(node[0], buf.getvalue()) == SUCCESS  # a PACS routing everything back gets no loop
    time.sleep(0.2)
    assert pacs.take() == []


def wait_sent(store_dir: Path, sop_uid: str, timeout: float = 30) -> dict:
    """The worklist entry of ``sop_uid`` once its results are sent (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while True:
        entry = next(e for e in read_worklist(store_dir) if e["sop_instance_uid"] == sop_uid)
        if entry["results_status"] == "sent" or time.monotonic() > deadline:
            return entry
        time.sleep(0.05)


def test_unreachable_pacs_still_answers_success_with_results_queued(tmp_path):
    triage = dicom_node.make_triage(f"PACS@127.0.0.1:{free_port()}", "CXR_TRIAGE", tmp_path, None)
    data = chest_dicom()
    outcome = triage.handle(data)
    assert outcome.status == SUCCESS and outcome.queued  # safely stored and queued: the modality is done
    assert triage.outbox.deliver_due() == 2
    (entry,) = read_worklist(tmp_path)
    assert entry["results_sent"] is False and entry["decision"] == outcome.decision
    assert entry["results_status"] == "queued" and entry["retry_at"] > time.time() + 5
    assert [(r["kind"], r["attempts"]) for r in entry["results"]] == [("SR", 1), ("SC", 1)]
    assert "could not associate" in entry["results_reason"]
    assert triage.handle(b"\0" * 300).status != SUCCESS
    ct = chest_dicom(sop_class=CTImageStorage)
    assert triage.handle(ct).status == SOP_CLASS_NOT_SUPPORTED


def test_cli_refuses_a_bad_peer_and_a_busy_port(pacs, monkeypatch):
    from typer.testing import CliRunner

    from cxr_triage.cli import app

    for mode in ("reading_validation_mode", "writing_validation_mode"):  # the node's process changes them
        monkeypatch.setattr(pydicom.config.settings, mode, getattr(pydicom.config.settings, mode))
    runner = CliRunner()
    bad = runner.invoke(app, ["dicom-node", "--send-to", "ORTHANC-127.0.0.1-4242"])
    assert bad.exit_code == 2 and "AET@HOST:PORT" in bad.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = runner.invoke(app, ["dicom-node", "--port", str(port), "--send-to", f"PACS@127.0.0.1:{pacs.port}"])
    assert out.exit_code == 2 and "cannot listen" in out.output


def test_a_failing_decoder_still_ends_in_an_error_sr(monkeypatch):
    from cxr_triage.dicom import triage as dicom_triage

    class Collect:
        sent: list[Dataset] = []

        def send(self, datasets: list[Dataset]) -> list[Delivery]:
            self.sent += datasets
            return [Delivery(True)] * len(datasets)

    def broken(*args, **kwargs):
        raise RuntimeError("decoder crashed")

    sender = Collect()
    triage = dicom_triage.NodeTriage(Predictor(), sender)
    monkeypatch.setattr(triage.predictor, "predict", broken)
    outcome = triage.handle(chest_dicom())
    assert outcome.status == SUCCESS and outcome.decision == "error"
    assert triage.outbox.deliver_due() == 1
    (sr,) = sender.sent
    assert sr_summary(sr)["error"] == "the image could not be processed (RuntimeError)"
