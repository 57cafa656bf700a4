"""The bounded service (issue 13) on a live server: uvicorn with short protocol limits closes idle and slow-header
connections and answers a slow body with 408 (the limits answered in process: tests/unit/test_service_guard.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from cxr_triage.serve.app import create_app
from cxr_triage.serve.guard import ServiceLimits
from tests.hostile_corpus import encode, xray
from tests.live_server import in_thread

PNG = encode(xray(), "PNG")


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        chunks.append(b"<timeout>")
    return b"".join(chunks)


@pytest.fixture(scope="module")
def fast_timeouts() -> Iterator[str]:
    limits = ServiceLimits(header_timeout_s=1.0, body_idle_s=1.0, body_total_s=3.0, keep_alive_s=1)
    with in_thread(create_app(limits=limits), limits) as base:
        yield base


def test_idle_and_slow_header_connections_are_closed(fast_timeouts: str):
    port = int(fast_timeouts.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port))
    drip = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    drip.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for _ in range(3):
        time.sleep(0.4)
        try:
            drip.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
    assert _recv_all(idle, 5) == b"" and _recv_all(drip, 5) == b""  # closed by the server, no answer
    assert time.monotonic() - t0 < 4
    idle.close()
    drip.close()


def test_slow_body_gets_408(fast_timeouts: str):
    port = int(fast_timeouts.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
        "Content-Length: 100000\r\n\r\n--xx\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    )
    sock.sendall(head.encode() + PNG[:100])  # then nothing more
    t0 = time.monotonic()
    answer = _recv_all(sock, 10)
    assert answer.startswith(b"HTTP/1.1 408") and b"too slow" in answer, answer[:300]
    assert time.monotonic() - t0 < 5
    sock.close()
