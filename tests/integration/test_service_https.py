"""HTTPS end to end (issue 24, item 5): the service under uvicorn with a self-signed certificate made for the test,
a token required on /api, HSTS on the answer, no answer to plain HTTP (the access rules in process:
tests/unit/test_service_auth.py)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from cxr_triage.serve.app import create_app
from cxr_triage.serve.auth import HSTS, access_for, add_token, tls_options
from cxr_triage.serve.guard import ServiceLimits, uvicorn_options
from tests.ports import free_port


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), made for the test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_https_end_to_end_with_a_token(certificate: tuple[Path, Path], tmp_path: Path):
    cert, key = certificate
    tokens = tmp_path / "tokens.txt"
    token = add_token(tokens)
    tls = tls_options(cert, key)
    access = access_for(loopback=True, token_file=tokens, no_auth=False, https=bool(tls))
    limits, port = ServiceLimits(), free_port()
    app = create_app(limits=limits, access=access)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(limits), **tls)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as h:
            assert h.get(f"{base}/api/v1/worklist").status_code == 401
            r = h.get(f"{base}/api/v1/worklist", headers=bearer(token))
            assert r.status_code == 200 and r.headers["strict-transport-security"] == HSTS
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=5)
    finally:
        server.should_exit = True
        thread.join(15)
