"""The DICOM peers the node's tests talk to and through: a stand-in PACS (a Storage SCP that keeps the node's
results), and a modality's C-STORE and C-ECHO. Needs the [dicom] extra: import it after
``pytest.importorskip("pynetdicom")``."""

from __future__ import annotations

import io
import threading
import time

import pydicom
import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom.sop_class import Verification

from cxr_triage.dicom.send import RESULT_SOP_CLASSES
from tests.ports import free_port

NODE = "CXR_TRIAGE"


class StandInPACS:
    """A Storage SCP that keeps what it receives (the node's results) and answers ``status`` to each C-STORE."""

    def __init__(self, status: int = 0x0000, max_associations: int = 10) -> None:
        self.received: list[Dataset] = []
        self.port, self.status = free_port(), status
        self.ae = pynetdicom.AE(ae_title="PACS")
        self.ae.require_called_aet = True
        self.ae.maximum_associations = max_associations
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_supported_context(sop_class)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self.on_store)]
        )
        self.lock = threading.Lock()

    def on_store(self, event: pynetdicom.events.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return self.status

    def take(self) -> list[Dataset]:
        with self.lock:
            out, self.received = self.received, []
        return out

    def wait(self, n: int, timeout: float = 30) -> list[Dataset]:
        """The results received once ``n`` have arrived (the node's outbox sends them after answering)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.take()


def scu(*sop_classes: str) -> pynetdicom.AE:
    ae = pynetdicom.AE(ae_title="MODALITY")
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    return ae


def store(port: int, data: bytes) -> int:
    """C-STORE one Part-10 file to the node; its status."""
    ds = pydicom.dcmread(io.BytesIO(data))
    assoc = scu(ds.SOPClassUID).associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def echo(port: int, calling: str = "MODALITY", called: str = NODE, tls: tuple | None = None):
    """An association that asks for C-ECHO; the association (established or not)."""
    ae = pynetdicom.AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
