"""The DICOM node: a pynetdicom Storage SCP for CR, DX and Secondary Capture images (and C-ECHO), a thin shell over
``runtime.dicom_triage``, which predicts, sends the SR and the heatmap picture back, and keeps the worklist.

Other SOP classes are refused at association (their presentation contexts are rejected).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from cxr_triage.runtime.dicom_triage import SUPPORTED_SOP_CLASSES, StorageSCU, Triage, parse_peer
from cxr_triage.runtime.engine import Engine
from cxr_triage.runtime.worklist import Worklist

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """pynetdicom and highdicom log UIDs at INFO/DEBUG: keep them to warnings."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_triage(send_to: str, aet: str, store: Path | None, model: Path | None, lang: str = "en") -> Triage:
    """The engine, the Storage SCU towards ``send_to`` (AET@HOST:PORT) and the worklist under ``store``."""
    worklist = Worklist(store) if store is not None else None
    triage = Triage(Engine(model), StorageSCU(parse_peer(send_to), aet), worklist, lang)
    triage.warm_up()
    return triage


def make_ae(aet: str) -> AE:
    """An AE that accepts C-ECHO and CR, DX and Secondary Capture storage in any transfer syntax."""
    ae = AE(ae_title=aet)
    ae.add_supported_context(Verification)
    for sop_class in SUPPORTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


def start(
    aet: str,
    port: int,
    send_to: str,
    store: Path | None = None,
    model: Path | None = None,
    host: str = "127.0.0.1",
    block: bool = False,
) -> Any:
    """Start the node; returns the running server (``.shutdown()`` stops it), or blocks when ``block``."""
    quiet_libraries()
    triage = make_triage(send_to, aet, store, model)

    def on_store(event: evt.Event) -> int:
        return triage.handle(event.encoded_dataset()).status

    ae = make_ae(aet)
    handlers = [(evt.EVT_C_STORE, on_store)]
    log.info("DICOM node %s listening on %s:%d; results go to %s", aet, host, port, send_to)
    return ae.start_server((host, port), block=block, evt_handlers=handlers)


def run(aet: str, port: int, send_to: str, store: Path | None, model: Path | None, host: str) -> None:
    """The node as its own process (the CLI): serve until stopped. pydicom's value validation would quote an
    invalid header value (a name, a date) in a warning, so this process takes received values as they are."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    start(aet, port, send_to, store=store, model=model, host=host, block=True)
