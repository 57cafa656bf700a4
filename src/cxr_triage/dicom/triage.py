"""What the DICOM node does with one received instance: predict, build the SR and the heatmap picture, record the
result in the worklist with the SR and picture queued in its outbox for the PACS (``dicom.outbox`` sends them),
and answer with a C-STORE status: success once all of that is on disk, whether or not the PACS is up.

Logs name an instance only by ``ref``, a short hash of its SOP Instance UID: no identifier reaches a log.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr_triage.core.dicom import check_budget, read_header
from cxr_triage.core.preprocess import ImageReadError
from cxr_triage.dicom.outbox import Outbox, RetryPolicy
from cxr_triage.dicom.report import MANUFACTURER, ReportError, build_sc, build_sr, content_of
from cxr_triage.dicom.send import RESULT_SOP_CLASSES, Sender
from cxr_triage.runtime.prediction import Prediction
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.runtime.worklist import Worklist

log = logging.getLogger(__name__)

SUPPORTED_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
SUCCESS, SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = (
    0x0000,
    0x0122,
    0xA700,
    0xA900,
    0xC000,
)
TOO_LARGE = OUT_OF_RESOURCES  # Storage has no status of its own for "over the size limit": Refused, with a comment
MAX_INSTANCE_BYTES = 96 * 2**20  # one received data set, as received and (deflated) inflated


def ref(uid: str) -> str:
    """A short, non-identifying name for an instance in logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def content_key(header: Dataset, pred: Prediction) -> str:
    """What tells instances apart: study, series and SOP Instance UID and the decoded image (another image under a
    UID already seen is another instance; the same image sent again, in any lossless transfer syntax, is not)."""
    image = pred.image
    pixels = hashlib.sha256(b"" if image is None else np.ascontiguousarray(image).tobytes()).hexdigest()[:16]
    uids = (header.get(k, "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    return "|".join([*map(str, uids), pixels])


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass(frozen=True)
class Outcome:
    """The answer to one C-STORE and what happened (for logs, tests and benchmarks)."""

    status: int
    ref: str = ""
    decision: str = ""
    label: str = ""
    queued: bool = False  # its results are in the outbox
    urgency: int | None = None
    comment: str = ""  # the C-STORE response's Error Comment (64 characters at most)


def is_own_result(ds: Dataset) -> bool:
    """An SR or picture this node made (e.g. routed back by the PACS): never triaged again."""
    return ds.get("Manufacturer") == MANUFACTURER and ds.get("SOPClassUID") in RESULT_SOP_CLASSES


def instance_number(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


class NodeTriage:
    """Triage received instances with one predictor; entries go to ``worklist`` (None: one in memory), results to
    its outbox, which ``sender`` empties (``outbox.start()`` for a background thread)."""

    def __init__(
        self,
        predictor: Predictor,
        sender: Sender,
        worklist: Worklist | None = None,
        lang: str = "en",
        max_instance_bytes: int = MAX_INSTANCE_BYTES,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.predictor, self.sender, self.lang = predictor, sender, lang
        self.worklist = worklist if worklist is not None else Worklist(None)
        self.outbox = Outbox(self.worklist, sender, retry)
        self.max_instance_bytes = max_instance_bytes
        self.one_at_a_time = threading.Lock()  # decoding is where memory goes: one instance's worth at a time

    def warm_up(self) -> None:
        """One prediction, SR and picture on a blank image (not sent), so the first real instance is answered fast."""
        header = Dataset()
        header.SOPClassUID = SecondaryCaptureImageStorage
        header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID = (generate_uid() for _ in range(3))
        grey = np.full((64, 64), 128, np.uint8)
        pred = self.predictor.predict(grey, "", lang=self.lang)
        self.results(header, pred.model_copy(update={"image": grey}))

    def predict(self, data: bytes, header: Dataset | None = None) -> Prediction:
        """The prediction for a Part-10 file, with its heatmap and image; an ``error`` prediction (never an
        exception) when it cannot be read. With its ``header``, an image over the pixel budget is refused before its
        pixel data is read."""
        try:
            if header is not None and "Rows" in header:
                check_budget(header, "instance.dcm")
            pred = self.predictor.predict(data, "instance.dcm", "instance.dcm", self.lang, heatmap=True, image=True)
        except ImageReadError as exc:
            pred = self.unreadable(str(exc))
        except Exception as exc:  # a decoder bug must still end in an error SR, not a dead node
            log.warning("prediction failed (%s)", type(exc).__name__)  # no traceback: it may quote header values
            pred = self.unreadable(f"the image could not be processed ({type(exc).__name__})")
        return pred

    def unreadable(self, reason: str) -> Prediction:
        return Prediction.unreadable("instance.dcm", reason, self.predictor.model, self.lang)

    def results(self, header: Dataset, pred: Prediction, key: str = "") -> list[Dataset]:
        """The SR, and the heatmap (or, when rejected, the plain image) as a Secondary Capture; their UIDs derive
        from ``key`` (``content_key``)."""
        content = content_of(pred)
        number = instance_number(header)
        out: list[Dataset] = [build_sr(header, content, number, key)]
        picture = pred.heatmap
        if picture is None and pred.image is not None:
            picture = np.repeat(pred.image[..., None], 3, axis=2)
        if picture is not None:
            out.append(build_sc(header, picture, content, number, key))
        return out

    def too_large(self, tag: str = "") -> Outcome:
        limit = f"{self.max_instance_bytes // 2**20} MB"
        log.warning("instance %s refused: over this node's %s limit", tag or "-", limit)
        return Outcome(TOO_LARGE, tag, comment=f"instance over this node's {limit} limit; send it smaller")

    def prepare(self, source: bytes | Path) -> Outcome | tuple[Dataset, Prediction, list[Dataset], str, str]:
        """Read, check and predict one instance and build its results; the header, prediction, results, log tag and
        ``content_key``, or an Outcome when it ends here."""
        data = source.read_bytes() if isinstance(source, Path) else source
        if len(data) > self.max_instance_bytes + 2**16:  # + the file meta the node writes before the data set
            return self.too_large()
        try:
            header = read_header(data, self.max_instance_bytes)
            sop_class = header.get("SOPClassUID")
        except ImageReadError as exc:
            if exc.kind == "too_large":
                return self.too_large()
            log.warning("received an instance whose header cannot be read (%s)", exc.kind)
            return Outcome(CANNOT_UNDERSTAND)
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
        pred = self.predict(data, header)
        key = content_key(header, pred)  # hashes the decoded image: once per instance
        try:
            return header, pred, self.results(header, pred, key), tag, key
        except ReportError as exc:
            log.warning("instance %s: %s", tag, exc)
        except (ValueError, TypeError) as exc:  # header values DICOM does not allow; the message may quote them
            log.warning("instance %s: its header does not allow building results (%s)", tag, type(exc).__name__)
        return Outcome(DOES_NOT_MATCH, tag, pred.decision, pred.label)

    def handle(self, source: bytes | Path) -> Outcome:
        """One received instance (Part-10 bytes, or the file they were written to) -> recorded, its results queued
        for the PACS; the C-STORE status to answer. Instances are read and decoded one at a time (bounded memory)."""
        start = time.perf_counter()
        with self.one_at_a_time:
            prepared = self.prepare(source)
        if isinstance(prepared, Outcome):
            return prepared
        header, pred, results, tag, key = prepared
        queued = [("SR" if ds.Modality == "SR" else "SC", part10(ds)) for ds in results]
        try:
            level = self.worklist.record(
                str(header.SOPInstanceUID),
                str(header.StudyInstanceUID),
                pred,
                str(header.get("AccessionNumber", "")),
                queued,
                key,
            )
        except sqlite3.Error as exc:  # e.g. the disk is full: the sender keeps the image and tries again
            log.warning("instance %s: its results could not be queued (%s)", tag, exc)
            return Outcome(OUT_OF_RESOURCES, tag, pred.decision, pred.label, comment="results cannot be stored")
        self.outbox.kick()
        log.info(
            "instance %s: %s %s; %d result(s) queued for sending in %.0f ms",
            tag,
            pred.label or "-",
            pred.decision,
            len(results),
            1000 * (time.perf_counter() - start),
        )
        return Outcome(SUCCESS, tag, pred.decision, pred.label, True, level)
