"""The DICOM node's listening side with bounded work (pynetdicom's association server, tightened):

- a connection from a host on no allow-list entry is closed before anything is read, and never takes a slot;
- a TLS handshake runs in the connection's own thread within ``acse_timeout`` (pynetdicom's server does it in the
  accept loop, where one silent client would stop every other);
- one PDU is at most ``MAX_PDU_READ`` bytes and is read within ``idle_timeout`` (pynetdicom would hold any announced
  length in memory, and wait forever for a PDU that stops half way);
- when every association slot is taken, a new connection first closes the oldest one that has not yet sent its
  association request, so bare TCP connects cannot lock peers out; idle associations end after ``idle_timeout``;
- an instance is received into a temporary file (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), and past
  ``max_instance_bytes`` the rest of it is read and dropped, so the C-STORE can be refused with a status.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cxr_triage.core.safe_text import printable
from cxr_triage.dicom.access import Access, peer_name

log = logging.getLogger(__name__)
MAX_PDU_READ = 1 << 20  # any PDU (an association request with many contexts included); P-DATA is 16 KB by default
FILE_META_ALLOWANCE = 1 << 16  # the preamble and File Meta group pynetdicom writes before the data set


@dataclass(frozen=True)
class NodeLimits:
    """What one node takes on at once, and how long it waits for a peer."""

    max_associations: int = 10
    acse_timeout: float = 5.0  # seconds from connect to the association request (and for the TLS handshake)
    idle_timeout: float = 10.0  # seconds of silence before an association is aborted (network and DIMSE timeout)
    max_instance_mb: int = 96  # one data set as received, and as inflated when deflated

    def __post_init__(self) -> None:
        if not 1 <= self.max_associations <= 1000:
            raise ValueError(f"--max-associations {self.max_associations} is out of range; give 1 to 1000")
        for name in ("acse_timeout", "idle_timeout"):
            if not 0.1 <= getattr(self, name) <= 3600:
                raise ValueError(f"{name} {getattr(self, name)} s is out of range; give 0.1 to 3600 seconds")
        if not 1 <= self.max_instance_mb <= 4096:
            raise ValueError(f"--max-instance-mb {self.max_instance_mb} is out of range; give 1 to 4096")

    @property
    def max_instance_bytes(self) -> int:
        return self.max_instance_mb * 2**20


class BoundedSocket(AssociationSocket):
    """pynetdicom's socket with a bound on each PDU read: its size (``MAX_PDU_READ``) and its time."""

    read_timeout: float = 10.0

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_READ:
            raise OSError(f"the peer announced a {nr_bytes}-byte PDU, over {MAX_PDU_READ}")
        raw = self.socket
        if raw is None:
            raise OSError("the connection is closed")
        deadline, out = time.monotonic() + self.read_timeout, bytearray()
        try:
            while len(out) < nr_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the peer sent a PDU too slowly")
                raw.settimeout(left)
                chunk = raw.recv(min(nr_bytes - len(out), 1 << 16))
                if not chunk:
                    break
                out += chunk
        finally:
            raw.settimeout(self.read_timeout)  # also the bound on sending to a peer that does not read
        return out


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, with the bounded socket and the connection's opening time recorded."""

    server: GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        sock.__class__ = BoundedSocket  # only recv() differs
        sock.read_timeout = self.server.limits.idle_timeout
        if sock.socket is not None:
            sock.socket.settimeout(self.server.limits.idle_timeout)
        self.server.opened[assoc] = time.monotonic()
        negotiate = assoc.acse._negotiate_as_acceptor

        def negotiate_with_room() -> None:  # the slot count is checked again when the request arrives
            self.server.make_room(at_request=True)
            negotiate()

        assoc.acse._negotiate_as_acceptor = negotiate_with_room  # type: ignore[method-assign]
        start = assoc.start

        def start_counted() -> None:  # from "accepted" to "a running thread" in one step of the slot count
            with self.server.room_lock:
                start()
                self.server.started()

        assoc.start = start_counted  # type: ignore[method-assign]
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """The association server with the host check, slot recovery and TLS handshakes off the accept loop."""

    def __init__(self, *args: Any, access: Access, limits: NodeLimits, tls: ssl.SSLContext | None, **kw: Any):
        self.access, self.limits, self.tls = access, limits, tls
        self.opened: weakref.WeakKeyDictionary[Association, float] = weakref.WeakKeyDictionary()
        self.on_shutdown: list[Callable[[], None]] = []  # e.g. stop the outbox
        self.room_lock = threading.Lock()
        self.starting = 0  # connections accepted whose association thread has not started yet (not yet counted)
        self.request_thread = threading.local()  # .waiting: this request thread's connection is in ``starting``
        super().__init__(*args, request_handler=GuardedHandler, **kw)

    def shutdown(self) -> None:
        super().shutdown()
        for stop in self.on_shutdown:
            stop()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if not self.access.host_allowed(host):
            log.warning("connection from %s refused: the host is on no allow-list entry", printable(host))
            return False
        with self.room_lock:
            self.starting += 1  # counted from now on, before its thread exists
        self.make_room(at_request=False)
        return True

    def make_room(self, at_request: bool) -> None:
        """All slots taken: close the oldest connection that has sent no association request (if any).
        Runs when a connection is accepted and again when an association request arrives: pynetdicom refuses the
        request if more than the limit are alive at that moment, and a bare connection accepted a moment earlier
        must not cost an allowed peer its slot. Accepted connections whose association thread has not started yet
        count too (pynetdicom counts threads; one that starts between this check and pynetdicom's would tip it)."""
        with self.room_lock:
            self._make_room()

    def _make_room(self) -> None:
        while True:
            active = [a for a in self.active_associations if a.is_acceptor]
            if len(active) + self.starting <= self.limits.max_associations:
                return
            pending = [a for a in active if a.requestor.primitive is None]
            if not pending:
                return
            oldest = min(pending, key=lambda a: self.opened.get(a, 0.0))
            log.warning(
                "all %d association slots taken: closing a connection from %s that sent no association request",
                self.limits.max_associations,
                printable(str(oldest.requestor.address)),
            )
            raw = getattr(oldest.dul.socket, "socket", None)
            if raw is not None:
                try:
                    raw.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            oldest.dul.to_user_queue.put(None)  # what the acceptor gets when its wait times out: it ends at once
            oldest.join(timeout=1.0)
            if oldest.is_alive():
                return  # it did not end in time; pynetdicom's own count decides

    def started(self) -> None:
        """This request thread's connection now has a running association thread (call under ``room_lock``)."""
        if getattr(self.request_thread, "waiting", False):
            self.request_thread.waiting = False
            self.starting -= 1

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self.request_thread.waiting = True
        try:
            if self.tls is not None:
                try:
                    request.settimeout(self.limits.acse_timeout)
                    request = self.tls.wrap_socket(request, server_side=True)
                except (OSError, ValueError) as exc:
                    host = printable(str(client_address[0]))
                    log.warning("connection from %s refused: TLS handshake failed (%s)", host, type(exc).__name__)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self.room_lock:
                self.started()  # no association thread after all (a failed handshake): not waited for any more


class InstanceCap:
    """Refuse instances over ``max_bytes`` while receiving them: bound to ``evt.EVT_DATA_RECV``, which comes
    before each PDU is decoded. Past the cap, the message's temporary file is emptied and the rest is dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.over: set[str] = set()
        self.lock = threading.Lock()
        _config.STORE_RECV_CHUNKED_DATASET = True  # received data sets go to a file, not to memory

    def on_data(self, event: evt.Event) -> None:
        message = getattr(event.assoc.dimse, "message", None)
        file = getattr(message, "_data_set_file", None)
        if file is None or isinstance(file, _Dropped):
            return
        if file.tell() + len(event.data) > self.max_bytes + FILE_META_ALLOWANCE:
            message._data_set_file = _Dropped(file)  # type: ignore[union-attr]
            with self.lock:
                self.over.add(file.name)

    def refused(self, path: object) -> bool:
        """Was the instance received at ``path`` over the cap? (asked once, by the C-STORE handler)"""
        with self.lock:
            if str(path) in self.over:
                self.over.discard(str(path))
                return True
        return False

    def on_close(self, event: evt.Event) -> None:
        """A connection that ends half way through an instance leaves no temporary file behind."""
        message = getattr(event.assoc.dimse, "message", None)
        file = getattr(message, "_data_set_file", None)
        path = getattr(message, "_data_set_path", None)
        if file is not None and path is not None:
            file.close()
            path.unlink(missing_ok=True)
            with self.lock:
                self.over.discard(str(path))


class _Dropped:
    """Stands in for the temporary file of an instance over the cap: writes nothing; closing closes the file."""

    def __init__(self, real: Any) -> None:
        real.seek(0)
        real.truncate()
        self.real, self.name, self.file = real, real.name, self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        self.real.close()


def refuse_unwelcome(access: Access):
    """An ``evt.EVT_REQUESTED`` handler: refuse (A-ASSOCIATE-RJ, permanent) and log an association the access
    rules do not allow."""

    def on_requested(event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        host = str(assoc.requestor.address)
        refusal = access.refusal(str(rq.calling_ae_title), str(rq.called_ae_title), host)
        if refusal is None:
            return
        diagnostic, reason = refusal
        log.warning("association from %s refused: %s", peer_name(str(rq.calling_ae_title), host), reason)
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    return on_requested


def keep_alive(assoc: Association) -> None:
    """Restart the idle clock after this node's own work and whenever it has sent a PDU. pynetdicom restarts it only
    on what it receives, so a C-STORE that took longer than ``idle_timeout`` to answer would be taken for the peer's
    silence; that silence starts when the peer has had the answer (the answer is sent by another thread, a moment
    after the work: hence both)."""
    timer = getattr(assoc.dul, "_idle_timer", None)
    if timer is not None:
        timer.restart()


def answered(event: evt.Event) -> None:
    """EVT_PDU_SENT: :func:`keep_alive`."""
    keep_alive(event.assoc)


def bind(
    ae: Any,
    address: tuple[str, int],
    access: Access,
    limits: NodeLimits,
    tls: ssl.SSLContext | None,
    handlers: list[Any],
) -> GuardedServer:
    """The bound, not yet serving, server (``serve_forever()``, then ``shutdown()``)."""
    server = ae.make_server(
        address, evt_handlers=handlers, server_class=GuardedServer, access=access, limits=limits, tls=tls
    )
    ae._servers.append(server)  # pynetdicom's shutdown() removes it from there
    return server
