"""The web service: every route and every error, over the tiny test bundle, with FastAPI's TestClient."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the [dev] extra)")

from fastapi.testclient import TestClient  # noqa: E402

from cxr_triage.core.classes import CLASS_IDS  # noqa: E402
from cxr_triage.runtime.advice import NOTICE  # noqa: E402
from cxr_triage.serve import app as service  # noqa: E402
from cxr_triage.serve.app import create_app, is_loopback, safe_name  # noqa: E402

HANGUL = re.compile(r"[\uac00-\ud7a3]")
PHI_STRINGS = ["Doe^Jane", "PID-8675309"]

LOCAL = "http://127.0.0.1"  # the service answers loopback host names only (TrustedHostMiddleware)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_bundle), base_url=LOCAL) as c:
        yield c


@pytest.fixture
def grey(class_image: Callable[..., np.ndarray]) -> np.ndarray:
    """A 200x180 grey test image spanning 0..255 (so 8- and 16-bit encodings decode to the same pixels)."""
    img = class_image("covid", 200, 180, np.random.default_rng(3))
    img[0, 0], img[-1, -1] = 0, 255
    return img


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def dicom16(grey: np.ndarray) -> bytes:
    """A MONOCHROME2 16-bit DICOM of an 8-bit grey image (values x257), with made-up patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PHI_STRINGS[0], PHI_STRINGS[1], "DX"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (grey.astype(np.uint16) * 257).astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def post(client: TestClient, data: bytes, name: str, **params: str) -> tuple[int, dict]:
    files = {"file": (name, data, "application/octet-stream")}
    r = client.post("/api/v1/predict", params=params, files=files)
    return r.status_code, r.json()


def check_row(row: dict, name: str) -> None:
    probs = np.array([row[f"p_{c}"] for c in CLASS_IDS])
    assert row["path"] == name
    assert abs(probs.sum() - 1) < 1e-4
    if row["decision"] == "rejected":  # rejected answers carry no label and no confidence
        assert row["label"] is None and row["confidence"] is None and row["reasons"]
    else:
        assert row["label"] == CLASS_IDS[int(probs.argmax())]
        assert row["confidence"] == pytest.approx(probs.max(), abs=1e-6)
    assert row["decision"] in ("accept", "uncertain", "rejected") and row["error"] is None
    assert NOTICE["en"] in row["advice"]
    assert set(row["model"]) == {"name", "version", "sha256"} and len(row["model"]["sha256"]) == 64


def test_page_has_notice_file_input_and_assets(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needle in (NOTICE["en"], 'id="file-input"', 'id="heatmap-toggle"', 'id="lang-ko"', "viewport"):
        assert needle in r.text
    assert "{{" not in r.text and "https://" not in r.text  # placeholders filled, nothing from a CDN
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        a = client.get(f"/static/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
    assert "@media" in client.get("/static/style.css").text


def test_health_and_model(client: TestClient, tiny_bundle: Path) -> None:
    meta = json.loads((tiny_bundle / "model.json").read_text())
    health = client.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["max_upload_mb"] == 20
    assert health["model"] == {
        "name": meta["name"],
        "version": meta["version"],
        "sha256": meta["onnx_sha256"],
    }
    assert client.get("/api/v1/model").json() == meta


def test_openapi_documents_response_models(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"Prediction", "Health", "ModelInfo", "ErrorBody"} <= set(schemas)
    predict = spec["paths"]["/api/v1/predict"]["post"]
    assert {"200", "413", "415", "422"} <= set(predict["responses"])
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("fmt,name", [("PNG", "chest.png"), ("JPEG", "chest.jpg")])
def test_predict_png_and_jpeg(client: TestClient, grey: np.ndarray, fmt: str, name: str) -> None:
    status, row = post(client, encode(grey, fmt), name)
    assert status == 200
    check_row(row, name)
    assert row["heatmap"] is None and row["image"] is None


def test_heatmap_and_image_are_pngs_of_the_input_size(client: TestClient, grey: np.ndarray) -> None:
    status, row = post(client, encode(grey, "PNG"), "chest.png", heatmap="true", image="true")
    assert status == 200 and row["decision"] != "rejected"
    heat = Image.open(io.BytesIO(base64.b64decode(row["heatmap"])))
    image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
    assert heat.format == image.format == "PNG"
    assert heat.size == image.size == (grey.shape[1], grey.shape[0]) and heat.mode == "RGB"
    assert np.array_equal(np.asarray(image), grey)


def test_large_image_is_shown_downscaled(client: TestClient, class_image: Callable[..., np.ndarray]) -> None:
    big = class_image("normal", 1200, 900, np.random.default_rng(1))
    status, row = post(client, encode(big, "PNG"), "big.png", heatmap="true", image="true")
    image = Image.open(io.BytesIO(base64.b64decode(row["image"])))
    assert status == 200 and image.size == (384, 512)
    if row["decision"] != "rejected":  # a rejected image has no heatmap
        assert Image.open(io.BytesIO(base64.b64decode(row["heatmap"]))).size == image.size


def test_korean_advice(client: TestClient, grey: np.ndarray) -> None:
    status, row = post(client, encode(grey, "PNG"), "chest.png", lang="ko")
    assert status == 200 and HANGUL.search(row["advice"]) and NOTICE["ko"] in row["advice"]


def test_dicom_matches_png(client: TestClient, grey: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, png = post(client, encode(grey, "PNG"), "chest.png")
    r = client.post(
        "/api/v1/predict",
        params={"image": "true"},
        files={"file": ("study.dcm", dicom16(grey), "application/dicom")},
    )
    dcm = r.json()
    assert r.status_code == 200 and dcm["path"] == "study.dcm" and dcm["label"] == png["label"]
    for c in CLASS_IDS:
        assert dcm[f"p_{c}"] == pytest.approx(png[f"p_{c}"], abs=1e-3)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(dcm["image"])))), grey)
    for secret in PHI_STRINGS:
        assert secret not in r.text and secret not in caplog.text


def test_upload_name_is_sanitised(client: TestClient, grey: np.ndarray) -> None:
    status, row = post(client, encode(grey, "PNG"), "../../etc/<script>x.png")
    assert status == 200 and row["path"] == "_script_x.png"
    assert safe_name("C:\\Users\\kim\\흉부.png") == "흉부.png" and safe_name("..") == "upload"


@pytest.mark.parametrize("side", [400, 250])  # 160 kB: refused by Content-Length; 63 kB: by the read size
def test_too_large_is_413(tiny_bundle: Path, grey: np.ndarray, side: int) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    with TestClient(create_app(tiny_bundle, max_upload_mb=0.05), base_url=LOCAL) as small:
        status, body = post(small, encode(noise, "PNG"), "big.png")
        assert status == 413 and body == {"error": "The upload is too large; the limit is 0.05 MB."}
        assert post(small, encode(grey, "PNG"), "ok.png")[0] == 200  # small files still pass


def test_too_large_without_content_length_is_413(tiny_bundle: Path) -> None:
    """A streamed (chunked) body is counted while it is read, so a missing or lying header cannot help."""
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    chunks = [head, b"\x89PNG\r\n\x1a\n", *[b"\0" * 65536] * 4, f"\r\n--{boundary}--\r\n".encode()]
    with TestClient(create_app(tiny_bundle, max_upload_mb=0.05), base_url=LOCAL) as small:
        r = small.post(
            "/api/v1/predict",
            content=iter(chunks),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert r.status_code == 413 and "too large" in r.json()["error"]


@pytest.mark.parametrize(
    "name,data",
    [
        ("notes.txt", b"just some text, not an image\n" * 10),
        ("notes.png", b"just some text, not an image\n" * 10),
        ("paper.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 5),
        ("archive.dcm", b"PK\x03\x04" + b"\0" * 300),
    ],
)
def test_not_an_image_is_415(client: TestClient, name: str, data: bytes) -> None:
    status, body = post(client, data, name)
    assert status == 415 and "not an image" in body["error"]


def test_truncated_png_is_422(client: TestClient, grey: np.ndarray) -> None:
    data = encode(grey, "PNG")
    status, body = post(client, data[: len(data) // 2], "broken.png")
    assert status == 422 and "could not be read" in body["error"] and "Traceback" not in body["error"]


def test_missing_file_field_is_422(client: TestClient) -> None:
    r = client.post("/api/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "'file'" in r.json()["error"]
    assert set(r.json()) == {"error"}


def test_unknown_lang_is_422(client: TestClient, grey: np.ndarray) -> None:
    status, body = post(client, encode(grey, "PNG"), "chest.png", lang="fr")
    assert status == 422 and "'lang'" in body["error"] and set(body) == {"error"}


def test_404_and_405_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "/nope" in r.json()["error"]
    assert client.get("/static/nope.js").json().keys() == {"error"}
    r = client.get("/api/v1/predict")
    assert r.status_code == 405 and "GET" in r.json()["error"]


def test_unexpected_error_is_500_without_details(
    tiny_bundle: Path, grey: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service.Predictor, "predict", boom)
    with TestClient(create_app(tiny_bundle), base_url=LOCAL, raise_server_exceptions=False) as c:
        r = c.post("/api/v1/predict", files={"file": ("a.png", encode(grey, "PNG"), "image/png")})
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and r.json() == {"error": f"internal error (request {rid})"}
    assert "secret internals" in caplog.text  # logged server-side, not sent
    assert sum(rid in rec.getMessage() for rec in caplog.records) == 1  # one log line, with the request id


def test_parallel_requests_all_succeed(client: TestClient, class_image: Callable[..., np.ndarray]) -> None:
    rng = np.random.default_rng(7)
    images = [encode(class_image(CLASS_IDS[i % 4], 160, 150, rng), "PNG") for i in range(8)]
    expected = [post(client, data, f"{i}.png")[1]["label"] for i, data in enumerate(images)]
    with ThreadPool(8) as pool:
        results = pool.starmap(lambda i, d: post(client, d, f"{i}.png", heatmap="true"), enumerate(images))
    assert [s for s, _ in results] == [200] * 8
    assert [row["label"] for _, row in results] == expected


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_run_warns_when_not_loopback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tiny_bundle: Path
) -> None:
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    logger = logging.getLogger("cxr_triage.service")  # other tests' logging set-ups (uvicorn, Ray) may have
    monkeypatch.setattr(logger, "disabled", False)  # disabled or detached it; this test reads its warnings
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)  # a global logging.disable() too
    caplog.set_level(logging.WARNING, logger="cxr_triage.service")
    service.run(host="0.0.0.0", port=8123, bundle_dir=tiny_bundle, no_auth=True)  # beyond loopback: said so
    assert "binding to 0.0.0.0 exposes the service to the network" in caplog.text
    assert "--no-auth: anyone who can reach this address may use the API" in caplog.text
    assert [(c["host"], c["port"]) for c in calls] == [("0.0.0.0", 8123)]
    assert calls[0]["timeout_keep_alive"] == 5 and calls[0]["http"].header_timeout == 10.0
    caplog.clear()
    service.run(bundle_dir=tiny_bundle)
    assert "exposes" not in caplog.text and (calls[-1]["host"], calls[-1]["port"]) == ("127.0.0.1", 8000)


def test_favicon_samples_and_offline_docs(client: TestClient) -> None:
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(icon.content)).format == "ICO"
    samples = client.get("/api/v1/samples").json()
    assert len(samples) == 16 and {s["label"] for s in samples} == set(CLASS_IDS)
    first = client.get(samples[0]["url"])
    assert first.status_code == 200 and Image.open(io.BytesIO(first.content)).size[0] >= 32
    for bad in ("labels.csv", "..%2Fmodel%2Fmodel.json", "nope.jpg"):
        r = client.get(f"/samples/{bad}")
        assert r.status_code == 404 and set(r.json()) == {"error"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert "https://" not in docs.text and "<script>" not in docs.text  # no CDN, no inline script
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', docs.text):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/redoc").status_code == 404


def test_page_strings_and_formats_come_from_python(client: TestClient) -> None:
    from cxr_triage.core.preprocess import IMAGE_SUFFIXES
    from cxr_triage.runtime.i18n import CLASS_NAMES, page_strings

    page = client.get("/").text
    accept = re.search(r'accept="([^"]+)"', page).group(1).split(",")
    assert IMAGE_SUFFIXES <= set(accept) and {"image/bmp", "image/tiff", "image/webp"} <= set(accept)
    island = re.search(r'<script id="strings" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(island) == page_strings()
    script = client.get("/static/app.js").text
    for lang in CLASS_NAMES:  # the page has no class names of its own, so it cannot disagree with the CLI
        assert not any(f'"{name}"' in script for name in CLASS_NAMES[lang].values()), lang
    assert 'rel="icon"' in page and 'href="/docs"' in page


def test_old_uvicorn_factory_string_still_works() -> None:
    """Deployments started with ``uvicorn --factory cxr_triage.service:create_app`` get the same app factory."""
    from uvicorn.importer import import_from_string

    assert import_from_string("cxr_triage.service:create_app") is create_app
    assert import_from_string("cxr_triage.serve.app:create_app") is create_app
