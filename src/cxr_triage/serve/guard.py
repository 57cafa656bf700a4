"""What keeps the web service up: bounded work, timeouts, trusted hosts, security headers, one log line per error.

- ``WorkGate``: at most ``workers`` uploads are decoded and scored at once; up to ``queue`` more wait at most
  ``wait_s`` seconds, then get 503 with ``Retry-After`` (so are requests beyond the queue, at once).
- ``Guard`` (ASGI middleware, outermost): a request id (``X-Request-ID``), security headers on every response,
  a time limit for reading the request body (``body_idle_s`` between chunks, ``body_total_s`` in all: 408), one log
  line for every 4xx/5xx answer (with the request id and the error sentence) and a JSON 500 for anything unexpected.
  Every service log line is one line: control characters from a request (``%0a`` in a path) are escaped.
- ``UploadLimit``: 413 for bodies over the upload limit, by Content-Length first, then by counting bytes.
- ``HeaderTimeoutH11``: uvicorn's h11 protocol with a deadline for a request's headers (uvicorn has only a keep-alive
  timeout, so a client that connects and sends nothing, or a header a byte at a time, would be held for ever).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from cxr_triage.core.safe_text import printable


class OneLine(logging.Filter):
    """Escapes control characters in a record's message: a value from a request cannot forge another log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if printable(message) != message:
            record.msg, record.args = printable(message), None
        return True


log = logging.getLogger("cxr_triage.service")
log.addFilter(OneLine())
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}
FRAME_CSP = "frame-ancestors 'none'"
MULTIPART_SLACK = 64 * 1024  # form headers and boundaries around the file


def _env_hosts() -> tuple[str, ...]:
    """CXR_TRIAGE_ALLOWED_HOSTS (comma-separated), for `uvicorn --factory` deployments; loopback names by default."""
    raw = os.environ.get("CXR_TRIAGE_ALLOWED_HOSTS", "")
    hosts = tuple(h.strip() for h in raw.split(",") if h.strip())
    return hosts or LOOPBACK_HOSTS


@dataclass(frozen=True)
class ServiceLimits:
    """Every limit of the service (the decode limits are ``cxr_triage.core.limits``, the same as the CLI's)."""

    max_upload_mb: float = 20.0
    workers: int = 2  # uploads decoded and scored at once
    queue: int = 32  # uploads waiting for a worker
    wait_s: float = 10.0  # longest wait for a worker, then 503
    retry_after_s: int = 5
    header_timeout_s: float = 10.0  # connection open -> request headers complete
    body_idle_s: float = 15.0  # longest pause while the body arrives
    body_total_s: float = 60.0  # whole body
    keep_alive_s: int = 5
    max_connections: int = 256  # uvicorn's limit_concurrency: beyond it, 503 at once
    allowed_hosts: tuple[str, ...] = field(default_factory=_env_hosts)

    def __post_init__(self) -> None:
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {self.max_upload_mb}")
        if self.workers < 1 or self.queue < 0:
            raise ValueError("workers must be >= 1 and queue >= 0")


class Busy(HTTPException):
    """503: every worker is busy; ``Retry-After`` says when to try again."""

    def __init__(self, limits: ServiceLimits) -> None:
        super().__init__(
            503,
            f"The server is busy (all {limits.workers} workers are reading images); retry in {limits.retry_after_s} s.",
            headers={"Retry-After": str(limits.retry_after_s)},
        )


class WorkGate:
    """A bounded semaphore with a bounded, time-limited queue in front of it."""

    def __init__(self, limits: ServiceLimits) -> None:
        self.limits, self.waiting = limits, 0
        self._slots = asyncio.Semaphore(limits.workers)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a worker for the body of the ``async with``; ``Busy`` when none frees up in time."""
        if self._slots.locked() and self.waiting >= self.limits.queue:
            raise Busy(self.limits)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.limits.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise Busy(self.limits) from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))[:300]
    except (ValueError, AttributeError):
        return body[:120].decode("utf-8", "replace")


class Guard:
    """Outermost ASGI middleware: request id, security headers (and ``headers``), body deadlines, error logging,
    JSON 500."""

    def __init__(self, app: ASGIApp, limits: ServiceLimits, headers: dict[str, str] | None = None) -> None:
        self.app, self.limits = app, limits
        self.extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        state: dict[str, Any] = {"status": 0, "body": b"", "started": False}

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message["headers"] = _with_security_headers(list(message.get("headers", [])), rid) + self.extra
            elif message["type"] == "http.response.body" and state["status"] >= 400 and len(state["body"]) < 4096:
                state["body"] += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, _deadline_receive(receive, self.limits), send_guarded)
        except Exception as exc:  # logged once here, with the request id; the client gets a JSON sentence
            log.error("%s %s %s -> 500: %s", rid, scope["method"], scope["path"], type(exc).__name__, exc_info=exc)
            if not state["started"]:
                body = json.dumps({"error": f"internal error (request {rid})"}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send_guarded({"type": "http.response.start", "status": 500, "headers": headers})
                await send_guarded({"type": "http.response.body", "body": body})
            return
        if state["status"] >= 400:
            level = logging.ERROR if state["status"] >= 500 else logging.WARNING
            text = _error_text(state["body"])
            log.log(level, "%s %s %s -> %d: %s", rid, scope["method"], scope["path"], state["status"], text)


def _request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is short and plain, else a new one."""
    for key, value in scope.get("headers") or []:
        if key == b"x-request-id" and re.fullmatch(rb"[A-Za-z0-9._-]{1,64}", value):
            return value.decode()
    return uuid.uuid4().hex[:12]


def _with_security_headers(headers: list[tuple[bytes, bytes]], rid: str) -> list[tuple[bytes, bytes]]:
    present = {k.lower() for k, _ in headers}
    extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
    if b"content-security-policy" not in present:
        extra.append((b"content-security-policy", FRAME_CSP.encode()))
    return headers + extra + [(b"x-request-id", rid.encode())]


def _deadline_receive(receive: Receive, limits: ServiceLimits) -> Receive:
    """``receive`` with a pause limit and a total limit while the body arrives (408 past either)."""
    loop = asyncio.get_running_loop()
    deadline, body_done = loop.time() + limits.body_total_s, False

    async def timed() -> Message:
        nonlocal body_done
        if body_done:  # later calls wait for the client to disconnect: no limit there
            return await receive()
        wait = min(limits.body_idle_s, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.001)):
                message = await receive()
        except TimeoutError:  # FastAPI re-raises HTTPExceptions met while reading the body
            raise HTTPException(408, "The upload was too slow; send the whole file in time.") from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return timed


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive within ``header_timeout``."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._expire)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._header_timer is not None:  # a request's headers are complete
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _expire(self) -> None:
        self._header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


class UploadLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length first, then by counting bytes."""

    def __init__(self, app: ASGIApp, max_upload: int, slack: int = MULTIPART_SLACK) -> None:
        self.app, self.max_bytes, self.message = app, max_upload + slack, too_large(max_upload)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"error": self.message}, status_code=413)(scope, receive, send)
            return
        total = 0

        async def counted() -> Any:
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:  # FastAPI re-raises HTTPExceptions met while reading the body
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)


def too_large(max_bytes: int) -> str:
    return f"The upload is too large; the limit is {round(max_bytes / 2**20, 2):g} MB."


def uvicorn_options(limits: ServiceLimits) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that apply ``limits``."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": limits.header_timeout_s})
    return {
        "http": protocol,
        "timeout_keep_alive": limits.keep_alive_s,
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": 16 * 1024,
        "timeout_graceful_shutdown": 10,
    }
