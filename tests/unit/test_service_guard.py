"""The bounded service (issue 13): worker limit with 503 + Retry-After, trusted hosts, security headers on every
response, one log line per error with a request id, hostile uploads never a 5xx, with FastAPI's TestClient in process.
Runs on the shipped bundle (no training needed). Header and body timeouts on a live server:
tests/integration/test_service_timeouts.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cxr_triage.serve import app as service
from cxr_triage.serve.app import create_app
from cxr_triage.serve.guard import Busy, ServiceLimits, WorkGate
from tests.hostile_corpus import CORPUS, encode, xray

LOCAL = "http://127.0.0.1"
PNG = encode(xray(), "PNG")


pytestmark = pytest.mark.usefixtures("one_predictor")  # every app here shares one loaded predictor


def client(limits: ServiceLimits | None = None, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(limits=limits), base_url=base_url, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def default_client() -> Iterator[TestClient]:
    with client() as c:
        yield c


def post(c: TestClient, data: bytes = PNG, name: str = "a.png"):
    return c.post("/api/v1/predict", files={"file": (name, data, "application/octet-stream")})


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/api/v1/health"), ("GET", "/static/app.js"), ("GET", "/nope"), ("POST", "/api/v1/predict")],
)
def test_security_headers_on_every_response(default_client: TestClient, method: str, path: str):
    r = default_client.request(method, path)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer" and len(r.headers["x-request-id"]) >= 8


def test_page_keeps_its_own_policy(default_client: TestClient):
    csp = default_client.get("/").headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp


def test_only_trusted_hosts_are_answered(monkeypatch: pytest.MonkeyPatch):
    for host in ("http://127.0.0.1:8000", "http://localhost", "http://[::1]:8000"):
        with client(base_url=host) as c:
            assert c.get("/api/v1/health").status_code == 200, host
    with client(base_url="http://attacker.example") as c:  # DNS rebinding: a foreign name pointing at 127.0.0.1
        assert c.get("/api/v1/health").status_code == 400
        assert post(c).status_code == 400
    with client(ServiceLimits(allowed_hosts=("xray.lan",)), base_url="http://xray.lan") as c:
        assert c.get("/api/v1/health").status_code == 200
    monkeypatch.setenv("CXR_TRIAGE_ALLOWED_HOSTS", "scanner.lan, 10.0.0.5")
    with client(base_url="http://scanner.lan") as c:  # for `uvicorn --factory` deployments
        assert c.get("/api/v1/health").status_code == 200


def test_busy_server_answers_503_with_retry_after(monkeypatch: pytest.MonkeyPatch):
    release, entered = threading.Event(), threading.Event()
    real = service.predict_upload

    def slow(*args: object, **kwargs: object) -> dict:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "predict_upload", slow)
    limits = ServiceLimits(workers=1, queue=1, wait_s=0.3, retry_after_s=7)
    with client(limits) as c, ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, c)
        assert entered.wait(30)
        t0 = time.monotonic()
        waited = pool.submit(post, c).result(30)  # queued, then refused after wait_s
        elapsed = time.monotonic() - t0
        assert waited.status_code == 503 and waited.headers["retry-after"] == "7"
        assert "busy" in waited.json()["error"] and 0.25 <= elapsed < 10
        release.set()
        assert first.result(30).status_code == 200
        assert post(c).status_code == 200  # the worker is free again


def test_work_gate_queue_is_bounded():
    async def scenario() -> list[str]:
        gate, events = WorkGate(ServiceLimits(workers=1, queue=0, wait_s=5)), []
        async with gate.slot():
            try:
                async with gate.slot():  # no queue: refused at once, not after 5 s
                    events.append("entered")
            except Busy as exc:
                events.append(f"busy {exc.status_code} {exc.headers['Retry-After']}")
        async with gate.slot():
            events.append("free")
        return events

    t0 = time.monotonic()
    assert asyncio.run(scenario()) == ["busy 503 5", "free"]
    assert time.monotonic() - t0 < 2


def test_every_hostile_upload_is_answered_without_5xx(default_client: TestClient):
    for name, (make, want) in CORPUS.items():
        r = post(default_client, make(), name)
        assert r.status_code < 500 and "Traceback" not in r.text, (name, r.status_code, r.text[:200])
        if want == "ok" and not name.endswith((".gif", ".tif", ".webp", ".bmp")):
            assert r.status_code == 200, (name, r.text[:200])
        elif want == "error":
            assert r.status_code in (413, 415, 422) and r.json()["error"], (name, r.text[:200])


def test_bombs_at_once_leave_the_server_healthy(default_client: TestClient):
    bombs = ["bomb_30000.png", "bomb_8000_16bit.png", "deflate_bomb.dcm", "rle_bomb.dcm"]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda n: post(default_client, CORPUS[n][0](), n).status_code, bombs))
    assert codes == [422] * 4
    assert default_client.get("/api/v1/health").status_code == 200 and post(default_client).status_code == 200


def test_non_finite_probabilities_are_422(monkeypatch: pytest.MonkeyPatch):
    with client() as c:
        engine = c.app.state.predictor.engine
        monkeypatch.setattr(engine, "forward", lambda x: (np.full((len(x), 4), np.nan, np.float32),) + (
            np.ones((len(x), engine.extras["cam_weight"].shape[1], 5, 5), np.float32),
        ))  # fmt: skip
        r = post(c)
    assert r.status_code == 422 and "non-finite" in r.json()["error"] and "label" not in r.json()


def test_one_log_line_per_error_with_the_request_id(default_client: TestClient, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="cxr_triage"):
        r = default_client.post(
            "/api/v1/predict", files={"file": ("t.png", PNG[:300], "image/png")}, headers={"X-Request-ID": "abc-123"}
        )
    assert r.status_code == 422 and r.headers["x-request-id"] == "abc-123"
    lines = [rec for rec in caplog.records if "abc-123" in rec.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "422" in lines[0].getMessage() and "could not be read" in lines[0].getMessage()
    assert not [rec for rec in caplog.records if rec.exc_info]
