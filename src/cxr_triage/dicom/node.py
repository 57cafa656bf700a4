"""The DICOM node: a pynetdicom Storage SCP for CR, DX and Secondary Capture images (and C-ECHO), a thin shell over
``dicom.triage``, which predicts and keeps the worklist, and ``dicom.outbox``, whose thread sends the SR
and the heatmap picture to the PACS, retrying until it has them.

Other SOP classes are refused at association (their presentation contexts are rejected). Who may connect is
``dicom.access`` (allow-list, called AE title, TLS); how much work a peer can cause is ``dicom.server``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import ssl
import threading
from pathlib import Path
from typing import Any

import pydicom.config
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from cxr_triage.dicom.access import Access
from cxr_triage.dicom.outbox import RetryPolicy
from cxr_triage.dicom.send import StorageSCU, parse_peer
from cxr_triage.dicom.server import InstanceCap, NodeLimits, answered, bind, keep_alive, refuse_unwelcome
from cxr_triage.dicom.triage import SUPPORTED_SOP_CLASSES, NodeTriage, Outcome
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.runtime.worklist import Worklist

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """pynetdicom and highdicom log UIDs at INFO/DEBUG: keep them to warnings."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_triage(
    send_to: str,
    aet: str,
    store: Path | None,
    model: Path | None,
    lang: str = "en",
    max_instance_bytes: int = NodeLimits().max_instance_bytes,
    retry: RetryPolicy | None = None,
) -> NodeTriage:
    """The predictor, the Storage SCU towards ``send_to`` (AET@HOST:PORT) and the worklist and outbox under ``store``
    (None: in memory). Its outbox is not started."""
    retry = retry or RetryPolicy()
    sender = StorageSCU(parse_peer(send_to), aet, retry.timeout)
    triage = NodeTriage(Predictor(model), sender, Worklist(store), lang, max_instance_bytes, retry)
    triage.warm_up()
    return triage


def make_ae(aet: str, limits: NodeLimits | None = None) -> AE:
    """An AE that accepts C-ECHO and CR, DX and Secondary Capture storage in any transfer syntax, with the limits'
    association count and timeouts."""
    limits = limits or NodeLimits()
    ae = AE(ae_title=aet)
    ae.add_supported_context(Verification)
    for sop_class in SUPPORTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = limits.max_associations
    ae.acse_timeout = limits.acse_timeout
    ae.dimse_timeout = ae.network_timeout = limits.idle_timeout
    return ae


def status(outcome: Outcome) -> int | Dataset:
    """The C-STORE response status, with its Error Comment when the outcome has one."""
    if not outcome.comment:
        return outcome.status
    ds = Dataset()
    ds.Status, ds.ErrorComment = outcome.status, outcome.comment[:64]
    return ds


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def start(
    aet: str,
    port: int,
    send_to: str,
    store: Path | None = None,
    model: Path | None = None,
    host: str = "127.0.0.1",
    block: bool = False,
    access: Access | None = None,
    limits: NodeLimits | None = None,
    tls: ssl.SSLContext | None = None,
    retry: RetryPolicy | None = None,
) -> Any:
    """Start the node and its outbox; returns the running server (``.shutdown()`` stops both), or blocks when
    ``block``. ``access``: who may connect (default: any peer that calls this node's AE title); ``tls``: DICOM TLS;
    ``retry``: how results are retried."""
    quiet_libraries()
    access, limits = access or Access(aet), limits or NodeLimits()
    triage = make_triage(send_to, aet, store, model, max_instance_bytes=limits.max_instance_bytes, retry=retry)
    cap = InstanceCap(limits.max_instance_bytes)

    def on_store(event: evt.Event) -> int | Dataset:
        try:
            if cap.refused(event.dataset_path):
                return status(triage.too_large())
            return status(triage.handle(Path(event.dataset_path)))
        finally:
            keep_alive(event.assoc)

    handlers = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_REQUESTED, refuse_unwelcome(access)),
        (evt.EVT_DATA_RECV, cap.on_data),
        (evt.EVT_CONN_CLOSE, cap.on_close),
        (evt.EVT_PDU_SENT, answered),
    ]
    server = bind(make_ae(aet, limits), (host, port), access, limits, tls, handlers)
    server.on_shutdown.append(triage.outbox.stop)
    triage.outbox.start()
    log.info(
        "DICOM node %s listening on %s:%d%s; results go to %s",
        aet,
        host,
        port,
        " (TLS)" if tls else "",
        send_to,
    )
    if access.is_open and not is_loopback(host):
        log.warning(
            "the DICOM node on %s has no allow-list: any AE on any machine that reaches port %d may send it images; "
            "give --allow AET@HOST or --allow-file",
            host,
            port,
        )
    if not block:
        threading.Thread(target=server.serve_forever, name="cxr-dicom-node", daemon=True).start()
        return server
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()
    return server


def return_freed_memory() -> None:
    """Buffers of 1 MB and more are mapped and unmapped directly (glibc ``mallopt(M_MMAP_THRESHOLD)``), so an
    instance's memory goes back to the system when it is done, whichever association thread held it (glibc would
    otherwise raise the threshold and keep the buffers in per-thread arenas). No effect off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run(
    aet: str,
    port: int,
    send_to: str,
    store: Path | None,
    model: Path | None,
    host: str,
    access: Access | None = None,
    limits: NodeLimits | None = None,
    tls: ssl.SSLContext | None = None,
    retry: RetryPolicy | None = None,
) -> None:
    """The node as its own process (the CLI): serve until stopped. pydicom's value validation would quote an
    invalid header value (a name, a date) in a warning, so this process takes received values as they are."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    return_freed_memory()
    start(
        aet,
        port,
        send_to,
        store=store,
        model=model,
        host=host,
        block=True,
        access=access,
        limits=limits,
        tls=tls,
        retry=retry,
    )
