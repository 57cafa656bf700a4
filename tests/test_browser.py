"""The page in headless Chromium (Playwright): upload, result, heatmap, toggle, Korean, phone width."""

from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cxr_triage.core.classes import DISPLAY_NAMES
from cxr_triage.service import create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
expect = sync_api.expect

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HANGUL = re.compile(r"[\uac00-\ud7a3]")
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def server(smoke_bundle: Path) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1, a free port, in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(smoke_bundle), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium binary found (install Debian's `chromium` package)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def sample(tmp_path: Path, class_image: Callable[..., np.ndarray]) -> Path:
    """A generated grey PNG with the covid pattern."""
    path = tmp_path / "sample.png"
    Image.fromarray(class_image("covid", 320, 288, np.random.default_rng(11))).save(path)
    return path


def upload_and_wait(page: object, base: str, sample: Path) -> None:
    page.goto(base + "/")
    page.set_input_files("#file-input", str(sample))
    page.wait_for_selector("#result:not([hidden])", timeout=TIMEOUT_MS)


def test_upload_heatmap_toggle_korean(server: str, browser: object, sample: Path, tmp_path: Path) -> None:
    files = {"file": (sample.name, sample.read_bytes(), "image/png")}
    api = httpx.post(f"{server}/api/v1/predict", files=files)
    assert api.status_code == 200
    expected = api.json()
    assert expected["decision"] != "rejected"

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    upload_and_wait(page, server, sample)

    label = page.locator("#result-label")
    assert label.get_attribute("data-label") == expected["label"]
    assert label.inner_text().strip() == DISPLAY_NAMES[expected["label"]]
    assert page.locator("#result-decision").get_attribute("data-decision") == expected["decision"]
    assert page.locator("#prob-bars li").count() == 4
    assert "not a diagnosis" in page.locator("#notice").inner_text()
    assert page.locator("#advice-text").inner_text().strip() == expected["advice"]
    for img in ("#heatmap-img", "#input-img"):  # the page's CSP forbids eval: wait with expect()
        expect(page.locator(img)).to_have_js_property("complete", True, timeout=TIMEOUT_MS)
        assert page.eval_on_selector(img, "el => el.naturalWidth") == 288
    expect(page.locator("#heatmap-img")).to_have_css("opacity", "1")
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)

    page.locator("#heatmap-toggle").uncheck()
    expect(page.locator("#heatmap-img")).to_have_css("opacity", "0", timeout=TIMEOUT_MS)
    page.locator("#heatmap-toggle").check()
    expect(page.locator("#heatmap-img")).to_have_css("opacity", "1", timeout=TIMEOUT_MS)

    page.click("#lang-ko")
    expect(page.locator("#advice-text")).to_have_text(HANGUL, timeout=TIMEOUT_MS)
    assert HANGUL.search(page.locator("#advice-text").inner_text())
    assert HANGUL.search(page.locator("#notice").inner_text())
    assert page.locator("#lang-ko").get_attribute("aria-pressed") == "true"
    page.screenshot(path=str(tmp_path / "desktop_ko.png"), full_page=True)
    assert errors == []
    page.close()


def test_phone_width_layout(server: str, browser: object, sample: Path, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    upload_and_wait(page, server, sample)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "the page scrolls sideways at phone width"
    viewer, findings = (page.locator(s).bounding_box() for s in (".viewer", ".findings"))
    assert findings["y"] >= viewer["y"] + viewer["height"] - 1  # one column: the bars sit below the image
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert Image.open(io.BytesIO((tmp_path / "phone.png").read_bytes())).size[0] == 390 * 2
    page.close()
