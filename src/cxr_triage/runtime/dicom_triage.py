"""What the DICOM node does with one received instance: predict, build the SR and the heatmap picture, send them
back to the PACS (Storage SCU), record the result in the worklist, and answer with a C-STORE status.

Logs name an instance only by ``ref``, a short hash of its SOP Instance UID: no identifier reaches a log.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_triage.core.preprocess import ImageReadError
from cxr_triage.runtime.dicom_report import MANUFACTURER, ReportError, build_sc, build_sr, content_from_row
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.predict import predict_arrays, predict_bytes
from cxr_triage.runtime.prediction import ModelInfo, Prediction
from cxr_triage.runtime.worklist import Worklist

log = logging.getLogger(__name__)

SUPPORTED_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
RESULT_SOP_CLASSES = (pydicom.uid.ComprehensiveSRStorage, SecondaryCaptureImageStorage)
SUCCESS, SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = (
    0x0000,
    0x0122,
    0xA700,
    0xA900,
    0xC000,
)
_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


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


def ref(uid: str) -> str:
    """A short, non-identifying name for an instance in logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


class Sender(Protocol):
    def send(self, datasets: list[Dataset]) -> bool: ...


class StorageSCU:
    """Sends datasets to a peer in one association (pynetdicom Storage SCU); True when all were stored."""

    def __init__(self, peer: Peer, aet: str, timeout: float = 30) -> None:
        from pynetdicom import AE

        self.peer = peer
        self.ae = AE(ae_title=aet)
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout

    def send(self, datasets: list[Dataset]) -> bool:
        assoc = self.ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.aet)
        if not assoc.is_established:
            log.warning("could not associate with %s to send results", self.peer)
            return False
        ok = True
        try:
            for ds in datasets:
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError) as exc:  # e.g. the peer refused the SOP class
                    log.warning("could not send a result to %s (%s)", self.peer, type(exc).__name__)
                    ok = False
                    continue
                code = getattr(status, "Status", None)
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success or warning
                    log.warning("%s answered C-STORE with status %s", self.peer, code)
                    ok = False
        finally:
            assoc.release()
        return ok


@dataclass(frozen=True)
class Outcome:
    """The answer to one C-STORE and what happened (for logs, tests and benchmarks)."""

    status: int
    ref: str = ""
    decision: str = ""
    label: str = ""
    sent: bool = False
    urgency: int | None = None


def is_own_result(ds: Dataset) -> bool:
    """An SR or picture this node made (e.g. routed back by the PACS): never triaged again."""
    return ds.get("Manufacturer") == MANUFACTURER and ds.get("SOPClassUID") in RESULT_SOP_CLASSES


def instance_number(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def as_row(pred: Prediction) -> dict[str, Any]:
    """A prediction as the row the SR, the picture and the worklist read: the CSV fields plus the images."""
    return {**pred.csv_row(), "heatmap": pred.heatmap, "image": pred.image}


class Triage:
    """Triage received instances with one engine; results go to ``sender``, entries to ``worklist``."""

    def __init__(self, engine: Engine, sender: Sender, worklist: Worklist | None = None, lang: str = "en") -> None:
        self.engine, self.sender, self.worklist, self.lang = engine, sender, worklist, lang

    def warm_up(self) -> None:
        """One prediction, SR and picture on a blank image (not sent), so the first real instance is answered fast."""
        header = Dataset()
        header.SOPClassUID = SecondaryCaptureImageStorage
        header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID = (generate_uid() for _ in range(3))
        grey = np.full((64, 64), 128, np.uint8)
        row = as_row(predict_arrays(self.engine, [grey], None, self.lang, heatmaps=False)[0])
        self.results(header, {**row, "image": grey})

    def predict(self, data: bytes) -> dict[str, Any]:
        """The predict row for a Part-10 file; an ``error`` row (never an exception) when it cannot be read."""
        try:
            pred = predict_bytes(self.engine, data, name="instance.dcm", lang=self.lang, heatmap=True, image=True)
        except ImageReadError as exc:
            pred = self.unreadable(str(exc))
        except Exception as exc:  # a decoder bug must still end in an error SR, not a dead node
            log.warning("prediction failed (%s)", type(exc).__name__)  # no traceback: it may quote header values
            pred = self.unreadable(f"the image could not be processed ({type(exc).__name__})")
        return as_row(pred)

    def unreadable(self, reason: str) -> Prediction:
        return Prediction.unreadable("instance.dcm", reason, ModelInfo(**self.engine.info), self.lang)

    def results(self, header: Dataset, row: dict[str, Any]) -> list[Dataset]:
        """The SR, and the heatmap (or, when rejected, the plain image) as a Secondary Capture."""
        content = content_from_row(row, self.engine.info)
        number = instance_number(header)
        out: list[Dataset] = [build_sr(header, content, number)]
        picture = row.get("heatmap")
        if picture is None and row.get("image") is not None:
            picture = np.repeat(row["image"][..., None], 3, axis=2)
        if picture is not None:
            out.append(build_sc(header, picture, content, number))
        return out

    def handle(self, data: bytes) -> Outcome:
        """One received instance (Part-10 bytes) -> results sent and recorded; the C-STORE status to answer."""
        start = time.perf_counter()
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            sop_class = header.get("SOPClassUID")
        except Exception as exc:
            log.warning("received an instance whose header cannot be read (%s)", type(exc).__name__)
            return Outcome(CANNOT_UNDERSTAND)
        tag = ref(str(header.get("SOPInstanceUID", "")))
        if is_own_result(header):
            log.info("instance %s is a result of this node: not triaged", tag)
            return Outcome(SUCCESS, tag, decision="skipped")
        if sop_class not in SUPPORTED_SOP_CLASSES:
            log.warning("instance %s: SOP class %s is not a CR, DX or Secondary Capture image", tag, sop_class)
            return Outcome(SOP_CLASS_NOT_SUPPORTED, tag)
        row = self.predict(data)
        try:
            results = self.results(header, row)
        except ReportError as exc:
            log.warning("instance %s: %s", tag, exc)
            return Outcome(DOES_NOT_MATCH, tag, row["decision"], row["label"])
        except (ValueError, TypeError) as exc:  # header values DICOM does not allow; the message may quote them
            log.warning("instance %s: its header does not allow building results (%s)", tag, type(exc).__name__)
            return Outcome(DOES_NOT_MATCH, tag, row["decision"], row["label"])
        sent = self.sender.send(results)
        level = None
        if self.worklist is not None:
            accession = str(header.get("AccessionNumber", ""))
            level = self.worklist.record(str(header.SOPInstanceUID), str(header.StudyInstanceUID), row, accession, sent)
        log.info(
            "instance %s: %s %s; %d result(s) %s in %.0f ms",
            tag,
            row["label"] or "-",
            row["decision"],
            len(results),
            "sent" if sent else "NOT sent",
            1000 * (time.perf_counter() - start),
        )
        return Outcome(SUCCESS if sent else OUT_OF_RESOURCES, tag, row["decision"], row["label"], sent, level)
