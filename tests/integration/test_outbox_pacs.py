"""The Storage SCU's verdicts against a stand-in PACS (pynetdicom on loopback): C-STORE statuses and association
refusals told apart, permanent from transient (the outbox's retry logic: tests/unit/test_outbox.py)."""

from __future__ import annotations

import io
import time

import pydicom
import pytest
from pydicom.dataset import Dataset

pynetdicom = pytest.importorskip("pynetdicom", reason="the [dicom] extra is not installed")

from cxr_triage.dicom.send import Peer, StorageSCU, from_status  # noqa: E402
from tests.dicom_peers import StandInPACS  # noqa: E402
from tests.dicom_samples import sr_bytes  # noqa: E402


def sr_dataset() -> Dataset:
    return pydicom.dcmread(io.BytesIO(sr_bytes()))


@pytest.mark.parametrize(
    ("status", "ok", "permanent"),
    [
        (0x0000, True, False),
        (0xB000, True, False),
        (0xA700, False, False),
        (0xA900, False, True),
        (0xC000, False, True),
    ],
)
def test_c_store_status_is_told_apart(status, ok, permanent):
    pacs = StandInPACS(status=status)
    try:
        (d,) = StorageSCU(Peer("PACS", "127.0.0.1", pacs.port), "CXR_TRIAGE", 5).send([sr_dataset()])
    finally:
        pacs.server.shutdown()
    assert (d.ok, d.permanent) == (ok, permanent)
    if not ok:
        assert f"0x{status:04X}" in d.reason


def test_association_refusals_are_told_apart():
    pacs = StandInPACS(max_associations=1)
    try:
        wrong_aet = StorageSCU(Peer("NOT_PACS", "127.0.0.1", pacs.port), "CXR_TRIAGE", 5).send([sr_dataset()])
        assert wrong_aet[0].permanent and "Rejected Permanent: called AE title not recognised" in wrong_aet[0].reason
        deadline = time.monotonic() + 5
        while pacs.ae.active_associations and time.monotonic() < deadline:  # the rejected one is winding down
            time.sleep(0.02)
        hold = pynetdicom.AE("OTHER")
        hold.add_requested_context(pydicom.uid.ComprehensiveSRStorage)
        busy = hold.associate("127.0.0.1", pacs.port, ae_title="PACS")  # takes the PACS's only association
        assert busy.is_established
        full = StorageSCU(Peer("PACS", "127.0.0.1", pacs.port), "CXR_TRIAGE", 5).send([sr_dataset()])
        busy.release()
        assert not full[0].ok and not full[0].permanent and "Rejected Transient" in full[0].reason
    finally:
        pacs.server.shutdown()
    down = StorageSCU(Peer("PACS", "127.0.0.1", pacs.port), "CXR_TRIAGE", 2).send([sr_dataset(), sr_dataset()])
    assert [(d.ok, d.permanent) for d in down] == [(False, False)] * 2
    assert from_status(Dataset()).reason.startswith("no answer")
