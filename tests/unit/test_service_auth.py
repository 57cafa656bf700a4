"""Who may use the web service (issue 24, item 5): bearer tokens from `cxr-triage token new` on every /api route but
health, a same-origin check without tokens, log lines that cannot be forged, HSTS over HTTPS, and `serve` refusing
to open the API to the network unasked, with FastAPI's TestClient in process. Runs on the shipped bundle (no training
needed). HTTPS end to end on a live server is tests/integration/test_service_https.py."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest
import uvicorn
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxr_triage.cli import app as cli
from cxr_triage.serve import app as service
from cxr_triage.serve.app import create_app
from cxr_triage.serve.auth import (
    HSTS,
    Access,
    add_token,
    read_token_hashes,
    same_origin,
    token_hash,
)
from tests.hostile_corpus import encode, xray

LOCAL = "http://127.0.0.1"
PNG = encode(xray(), "PNG")
TOKEN = "s3cret-token-for-tests-only-0123456789abcdef"
OTHER = "another-token-for-tests-only-0123456789abcde"


pytestmark = pytest.mark.usefixtures("one_predictor")  # every app here shares one loaded predictor


def client(access: Access | None = None, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(access=access), base_url=base_url, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def guarded() -> Iterator[TestClient]:
    with client(Access(frozenset({token_hash(TOKEN), token_hash(OTHER)}))) as c:
        yield c


@pytest.fixture(scope="module")
def open_client() -> Iterator[TestClient]:
    with client() as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(c: TestClient, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    if method == "POST":
        return c.post(path, files={"file": ("a.png", PNG, "image/png")}, headers=headers)
    return c.request(method, path, headers=headers)


def said(result: Any) -> str:
    """A CLI result's output on one line (Rich wraps long messages)."""
    return " ".join(result.output.split())


def api_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves under /api/, from the app itself: a new route cannot be missed."""
    app = create_app()
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)  # newer FastAPI keeps included routers whole
    routes = list(flatten(app.routes)) if flatten else app.routes
    return sorted(
        (method, r.path)
        for r in routes
        if isinstance(getattr(r, "original_route", r), APIRoute) and r.path.startswith("/api/")
        for method in r.methods - {"HEAD"}
    )


def test_api_routes_finds_the_routers_routes():
    assert {("GET", "/api/v1/health"), ("POST", "/api/v1/predict"), ("GET", "/api/v1/samples")} <= set(api_routes())


# --- tokens ---


def test_token_new_prints_the_token_alone_and_keeps_only_its_hash(tmp_path: Path):
    path = tmp_path / "tokens.txt"
    first = CliRunner().invoke(cli, ["token", "new", "--out", str(path)])
    second = CliRunner().invoke(cli, ["token", "new", "--out", str(path)])
    assert first.exit_code == second.exit_code == 0, first.output
    tokens = [r.stdout.strip() for r in (first, second)]
    assert [r.stdout for r in (first, second)] == [t + "\n" for t in tokens]  # alone on stdout
    assert tokens[0] != tokens[1] and all(re.fullmatch(r"[A-Za-z0-9_-]{43}", t) for t in tokens)
    text = path.read_text()
    assert text == "".join(f"sha256:{hashlib.sha256(t.encode()).hexdigest()}\n" for t in tokens)  # appended
    assert not any(t in text for t in tokens)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_token_hashes(path) == {token_hash(t) for t in tokens}
    assert "not shown again" in first.stderr


def test_token_files_that_cannot_be_used_are_refused(tmp_path: Path):
    path = tmp_path / "tokens.txt"
    path.write_text("# ward 7 workstation\n\n")
    with pytest.raises(ValueError, match="holds no token hashes; add one with `cxr-triage token new"):
        read_token_hashes(path)
    path.write_text(f"sha256:{token_hash(TOKEN)}\n{TOKEN}\n")  # someone pasted a token itself
    with pytest.raises(ValueError, match="line 2: not a token hash"):
        read_token_hashes(path)
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token_hashes(tmp_path / "missing.txt")
    result = CliRunner().invoke(cli, ["token", "new", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in said(result) and result.stdout == ""


@pytest.mark.parametrize(("method", "path"), api_routes())
def test_every_api_route_but_health_needs_a_known_token(guarded: TestClient, method: str, path: str):
    if path == "/api/v1/health":
        assert call(guarded, method, path).status_code == 200
        return
    for headers in (None, bearer("wrong"), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "}):
        r = call(guarded, method, path, headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"].startswith("Bearer") and "Authorization: Bearer" in r.json()["error"]
        assert r.headers["x-content-type-options"] == "nosniff"  # still behind the guard
    for token in (TOKEN, OTHER):
        assert call(guarded, method, path, bearer(token)).status_code == 200, path


def test_the_page_and_its_files_need_no_token(guarded: TestClient):
    for path in ("/", "/static/auth.js", "/static/app.js", "/favicon.ico", "/docs", "/openapi.json"):
        assert guarded.get(path).status_code == 200, path


def test_a_request_without_a_token_is_refused_before_its_body_is_read(guarded: TestClient):
    r = guarded.post("/api/v1/predict", content=b"x" * 100, headers={"Content-Length": str(10**9)})
    assert r.status_code == 401  # not 413: the body was never looked at


def test_the_schema_says_which_routes_need_the_token(guarded: TestClient, open_client: TestClient):
    schema = guarded.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["token"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/api/v1/predict"]["post"]["security"] == [{"token": []}]
    assert "security" not in schema["paths"]["/api/v1/health"]["get"]
    assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


def test_token_file_from_the_environment_for_uvicorn_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "tokens.txt"
    token = add_token(path)
    monkeypatch.setenv("CXR_TRIAGE_TOKEN_FILE", str(path))
    with client() as c:
        assert c.get("/api/v1/model").status_code == 401
        assert c.get("/api/v1/model", headers=bearer(token)).status_code == 200


# --- CSRF: same origin without tokens ---


def test_same_origin():
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("http://CXR.example", "cxr.example:80") and same_origin("https://cxr.example", "cxr.example")
    assert same_origin("https://cxr.example:443", "cxr.example")
    assert not same_origin("http://127.0.0.1:8001", "127.0.0.1:8000")
    assert not same_origin("http://evil.example", "127.0.0.1")
    assert not same_origin("null", "127.0.0.1") and not same_origin("", "127.0.0.1")


def test_without_tokens_other_origins_are_refused(open_client: TestClient):
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        r = call(open_client, "POST", "/api/v1/predict", {"Origin": origin})
        assert r.status_code == 403 and "another web site" in r.json()["error"], origin
        assert call(open_client, "GET", "/api/v1/worklist", {"Origin": origin}).status_code == 403
    assert call(open_client, "POST", "/api/v1/predict", {"Origin": LOCAL}).status_code == 200
    assert call(open_client, "POST", "/api/v1/predict").status_code == 200  # curl sends no Origin


def test_with_tokens_the_token_is_what_counts(guarded: TestClient):
    evil = {"Origin": "http://evil.example"}
    assert call(guarded, "POST", "/api/v1/predict", evil).status_code == 401  # a cross-site form has no token
    assert call(guarded, "POST", "/api/v1/predict", {**evil, **bearer(TOKEN)}).status_code == 200


# --- logs ---


def test_a_request_cannot_forge_a_log_line(open_client: TestClient, caplog: pytest.LogCaptureFixture):
    forged = "/api/v1/nope%0aCRITICAL%20cxr_triage.service:%20forged%0d%1b[2J"
    with caplog.at_level(logging.INFO, logger="cxr_triage"):
        r = open_client.get(forged, headers={"X-Request-ID": "forge-1"})
    assert r.status_code == 404
    records = [rec for rec in caplog.records if rec.name.startswith("cxr_triage")]
    assert [rec.levelno for rec in records if "forge-1" in rec.getMessage()] == [logging.WARNING]
    for rec in records:
        assert not re.search(r"[\x00-\x1f\x7f]", rec.getMessage()), rec.getMessage()
    assert any("nope\\nCRITICAL cxr_triage.service: forged\\r\\x1b[2J" in rec.getMessage() for rec in records)


# --- HTTPS ---


def test_hsts_only_over_https():
    with client(Access(https=True), base_url="https://127.0.0.1") as c:
        for path in ("/", "/api/v1/health", "/nope"):
            assert c.get(path).headers["strict-transport-security"] == HSTS
    with client() as c:
        assert "strict-transport-security" not in c.get("/").headers


# --- serve's options ---


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `service.run` would start: the app's access and uvicorn's options (nothing is started)."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(service, "create_app", lambda *a, **kw: seen.setdefault("access", kw["access"]))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("uvicorn", kw))
    return seen


def test_serve_beyond_loopback_needs_a_token_file_or_no_auth(tmp_path: Path, started: dict[str, Any]):
    with pytest.raises(ValueError, match="cxr-triage token new --out tokens.txt"):
        service.run(host="0.0.0.0")
    assert started == {}  # refused before anything was loaded or bound
    service.run(host="0.0.0.0", no_auth=True)
    assert not started.pop("access").tokens_required and started.pop("uvicorn")["host"] == "0.0.0.0"
    tokens = tmp_path / "tokens.txt"
    add_token(tokens)
    service.run(host="10.1.2.3", token_file=tokens)
    assert started.pop("access").token_hashes == read_token_hashes(tokens)
    with pytest.raises(ValueError, match="contradict"):
        service.run(host="0.0.0.0", token_file=tokens, no_auth=True)
    service.run()  # loopback: open, as before
    assert not started.pop("access").tokens_required


def test_serve_https_options(tmp_path: Path, started: dict[str, Any]):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    service.run(ssl_certfile=cert, ssl_keyfile=key)
    assert started["access"].https and started["uvicorn"]["ssl_certfile"] == str(cert)
    assert started["uvicorn"]["ssl_keyfile"] == str(key)
    with pytest.raises(ValueError, match="--ssl-keyfile needs --ssl-certfile"):
        service.run(ssl_keyfile=key)
    with pytest.raises(ValueError, match="--ssl-certfile .*: no such file"):
        service.run(ssl_certfile=tmp_path / "missing.pem")


def test_cli_serve_refuses_to_open_the_api_unasked(tmp_path: Path):
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token-file" in said(result) and "--no-auth" in said(result)
    (tmp_path / "tokens.txt").write_text("not a hash\n")
    result = CliRunner().invoke(cli, ["serve", "--token-file", str(tmp_path / "tokens.txt")])
    assert result.exit_code == 2 and "not a token hash" in said(result)


# --- the page ---


def test_page_asks_for_the_token_and_sends_it_as_a_header(open_client: TestClient):
    page = open_client.get("/").text
    assert 'id="token-form"' in page and 'type="password"' in page
    assert page.index("/static/auth.js") < page.index("/static/app.js") < page.index("/static/worklist.js")
    auth = open_client.get("/static/auth.js").text
    assert "sessionStorage" in auth and "Authorization" in auth and "cookie" not in auth.replace("never a cookie", "")
    for script in ("app.js", "worklist.js"):
        text = open_client.get(f"/static/{script}").text
        assert not re.search(r"[^.]fetch\(\s*[`\"']/api", text), script  # every API call goes through cxrFetch
