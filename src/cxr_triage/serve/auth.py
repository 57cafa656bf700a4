"""Who may use the web service: bearer tokens, a same-origin check, HTTPS.

- ``cxr-triage token new --out FILE`` makes a random token, prints it once and appends only its sha256 to FILE;
  ``serve --token-file FILE`` then answers every ``/api/*`` route but ``/api/v1/health`` only with
  ``Authorization: Bearer TOKEN`` (401 otherwise). The presented token is hashed and compared with every stored hash
  by ``hmac.compare_digest``. Tokens carry 256 random bits, so a plain sha256 is enough (no password hashing).
- The check runs before the request body is read (ASGI middleware, not a route dependency, which FastAPI solves only
  after parsing an upload): a client without a token cannot make the server parse 20 MB.
- CSRF: the token travels in a header, never a cookie, so a form on another site cannot send it. Without tokens,
  a request whose ``Origin`` is not the host it was sent to is refused (403).
- With ``--ssl-certfile`` the service speaks HTTPS and every response says ``Strict-Transport-Security``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("cxr_triage.service")
OPEN_API_PATHS = frozenset({"/api/v1/health"})  # /api/* routes anyone may call
HSTS = "max-age=31536000"
_HASH_LINE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def new_token() -> str:
    """A new random token: 32 bytes (256 bits), URL-safe base64, 43 characters."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The hex sha256 of a token, as the token file stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_token(path: Path) -> str:
    """Append the hash of a new token to ``path`` (created owner-only, 0600) and return the token itself."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a file for the token hashes, e.g. {path / 'tokens.txt'}")
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="ascii") as f:
        f.write(f"sha256:{token_hash(token)}\n")
    return token


def read_token_hashes(path: Path) -> frozenset[str]:
    """The token hashes in a token file: one ``sha256:<64 hex>`` a line; blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token file {path} ({exc})") from None
    hashes = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = _HASH_LINE.match(text.lower())
        if m is None:
            raise ValueError(
                f"{path}, line {number}: not a token hash (expected sha256:<64 hex digits>, as `cxr-triage token new` "
                "writes; a token itself never belongs in this file)"
            )
        hashes.add(m[1])
    if not hashes:
        raise ValueError(f"{path} holds no token hashes; add one with `cxr-triage token new --out {path}`")
    return frozenset(hashes)


@dataclass(frozen=True)
class Access:
    """Who may call the API: holders of a token whose sha256 is in ``token_hashes`` (empty: anyone on an address
    the service answers, same-origin requests only); ``https``: the service speaks TLS, so responses send HSTS."""

    token_hashes: frozenset[str] = frozenset()
    https: bool = False

    @property
    def tokens_required(self) -> bool:
        return bool(self.token_hashes)

    def allows(self, authorization: str | None) -> bool:
        """True when the ``Authorization`` header holds a known token (``Bearer TOKEN``); constant time per hash."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = token_hash(token.strip()).encode()
        found = False
        for known in self.token_hashes:  # every hash is compared: the time does not say which one matched
            found |= hmac.compare_digest(presented, known.encode())
        return found

    def headers(self) -> dict[str, str]:
        """Headers for every response: HSTS when the service speaks HTTPS."""
        return {"strict-transport-security": HSTS} if self.https else {}


def access_for(loopback: bool, token_file: Path | None, no_auth: bool, https: bool = False) -> Access:
    """The ``Access`` of ``serve``'s options; ValueError when they would open the API to the network unasked."""
    if token_file is not None and no_auth:
        raise ValueError("--token-file and --no-auth contradict each other; give one of them")
    if token_file is not None:
        return Access(read_token_hashes(token_file), https)
    if not loopback and not no_auth:
        raise ValueError(
            "binding beyond this machine without a token file would let anyone on the network use the API; create a "
            "token with `cxr-triage token new --out tokens.txt` and add --token-file tokens.txt (or say --no-auth)"
        )
    if not loopback:
        log.warning("--no-auth: anyone who can reach this address may use the API and read the worklist")
    return Access(frozenset(), https)


def tls_options(certfile: Path | None, keyfile: Path | None) -> dict[str, str]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for HTTPS (none without a certificate); ValueError if unreadable."""
    if certfile is None:
        if keyfile is not None:
            raise ValueError("--ssl-keyfile needs --ssl-certfile (the server's certificate chain, PEM)")
        return {}
    options = {"ssl_certfile": str(certfile)}
    if keyfile is not None:
        options["ssl_keyfile"] = str(keyfile)
    for name, path in options.items():
        if not Path(path).is_file():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
    return options


def same_origin(origin: str, host: str) -> bool:
    """True when an ``Origin`` header names the host (and port) the request was sent to (the ``Host`` header)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False  # "null" (sandboxed frames, file:) and anything odd

    def norm(netloc: str) -> str:
        netloc = netloc.lower()
        return netloc.removesuffix(":" + _DEFAULT_PORTS[parts.scheme])

    return norm(parts.netloc) == norm(host.strip())


class AccessGate:
    """ASGI middleware: 401 for ``/api/*`` (but health) without a known token; without tokens, 403 for a request
    from another origin. Runs before anything reads the body."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        guarded = scope["path"].startswith("/api/") and scope["path"] not in OPEN_API_PATHS
        if self.access.tokens_required:
            if guarded and not self.access.allows(headers.get("authorization")):
                body = {"error": "This service needs an access token: send the header 'Authorization: Bearer TOKEN'."}
                answer = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="cxr-triage"'})
                await answer(scope, receive, send)
                return
        elif "origin" in headers and not same_origin(headers["origin"], headers.get("host", "")):
            body = {"error": "Requests from another web site are refused; open the page of this service instead."}
            await JSONResponse(body, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def env_access() -> Access:
    """``Access`` from CXR_TRIAGE_TOKEN_FILE, for `uvicorn --factory` deployments; open (same-origin) without it."""
    path = os.environ.get("CXR_TRIAGE_TOKEN_FILE", "").strip()
    return Access(read_token_hashes(Path(path))) if path else Access()


def document_tokens(app: FastAPI) -> None:
    """Mark the guarded routes in the OpenAPI schema as needing the bearer token (/docs then offers "Authorize")."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"token": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/api/") and path not in OPEN_API_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"token": []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
