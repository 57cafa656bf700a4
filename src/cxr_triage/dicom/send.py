"""Sending results to the PACS (pynetdicom Storage SCU), with each object's fate told apart: sent, failed for now
(PACS down, timeout, "Rejected Transient", out of resources: try again later) or failed for good ("Rejected
Permanent", a C-STORE status that will not change). The outbox (``dicom.outbox``) retries the first kind only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage

log = logging.getLogger(__name__)

RESULT_SOP_CLASSES = (pydicom.uid.ComprehensiveSRStorage, SecondaryCaptureImageStorage)
STORED = (0x0000, 0xB000, 0xB006, 0xB007)  # success, or stored with a warning (coercion, elements discarded)
_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
_REJECT_REASONS = {  # (result source, diagnostic) -> why, PS3.8 table 9-21
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``AET@HOST:PORT`` -> Peer; ValueError saying the expected form."""
    m = _PEER.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536 or not m["aet"].strip():
        raise ValueError(f"{text!r} is not AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242; an AE title has 1-16 chars)")
    return Peer(m["aet"].strip(), m["host"].strip("[]"), int(m["port"]))


@dataclass(frozen=True)
class Delivery:
    """What became of one object sent: stored, or not and why; ``permanent`` when sending again cannot help."""

    ok: bool
    permanent: bool = False
    reason: str = ""


STORED_OK = Delivery(True)


def is_transient_status(code: int) -> bool:
    """C-STORE failures that may pass: out of resources (A7xx), resource limitation (0213), cancelled (FE00)."""
    return 0xA700 <= code <= 0xA7FF or code in (0x0213, 0xFE00, 0x0210)


def from_status(status: Dataset | None) -> Delivery:
    """The Delivery for a C-STORE response (an empty one: no answer, the association timed out or ended)."""
    code = getattr(status, "Status", None)
    if code is None:
        return Delivery(False, reason="no answer to the C-STORE (timed out or the connection dropped)")
    if code in STORED:
        return STORED_OK
    comment = str(getattr(status, "ErrorComment", "") or "")[:64]
    reason = f"the PACS answered C-STORE with status 0x{code:04X}" + (f" ({comment})" if comment else "")
    return Delivery(False, not is_transient_status(code), reason)


def refusal(assoc: Any, peer: Peer) -> Delivery:
    """Why an association was not made: "Rejected Permanent" is for good; refused, aborted or unreachable is not."""
    if not assoc.is_rejected or assoc.acceptor.primitive is None:
        return Delivery(False, reason=f"could not associate with {peer} (down, unreachable or aborted)")
    rsp = assoc.acceptor.primitive
    why = _REJECT_REASONS.get((rsp.result_source, rsp.diagnostic), f"diagnostic {rsp.diagnostic}")
    permanent = rsp.result == 0x01
    kind = "Rejected Permanent" if permanent else "Rejected Transient"
    return Delivery(False, permanent, f"{peer} answered {kind}: {why}")


class Sender(Protocol):
    def send(self, datasets: list[Dataset]) -> list[Delivery]: ...


class StorageSCU:
    """Sends datasets to a peer in one association (pynetdicom Storage SCU): one Delivery per dataset."""

    def __init__(self, peer: Peer, aet: str, timeout: float = 30) -> None:
        from pynetdicom import AE

        self.peer = peer
        self.ae = AE(ae_title=aet)
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout

    def send(self, datasets: list[Dataset]) -> list[Delivery]:
        assoc = self.ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.aet)
        if not assoc.is_established:
            return [refusal(assoc, self.peer)] * len(datasets)
        out: list[Delivery] = []
        try:
            for ds in datasets:
                if not assoc.is_established:  # aborted by a timeout or the peer: the rest waits for the next try
                    out.append(Delivery(False, reason="not sent: the association ended before this object"))
                    continue
                try:
                    out.append(from_status(assoc.send_c_store(ds)))
                except ValueError:  # the peer accepted no presentation context for this SOP class
                    out.append(Delivery(False, True, f"{self.peer} does not accept this SOP class"))
                except RuntimeError as exc:
                    out.append(Delivery(False, reason=f"sending failed ({type(exc).__name__})"))
        finally:
            if assoc.is_established:
                assoc.release()
        return out
