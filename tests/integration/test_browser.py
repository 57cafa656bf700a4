"""The page in headless Chromium (Playwright): upload, result, heatmap, toggle, Korean (drawn, not boxes), phone
width, uncertain and rejected answers, the bundled samples and the offline API docs.

Without Chromium or Playwright these tests skip (and the run ends with a loud banner, see conftest.py);
with CI=true they fail instead, so CI cannot pass without them.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cxr_triage.core.classes import DISPLAY_NAMES
from cxr_triage.runtime.i18n import CLASS_NAMES, DECISION_NAMES
from cxr_triage.runtime.prediction import ModelInfo, Prediction
from cxr_triage.runtime.reasons import Finding
from cxr_triage.serve.app import create_app
from cxr_triage.serve.samples import list_samples
from tests import chromium
from tests.live_server import in_thread

sync_api = chromium.sync_api()
expect = sync_api.expect

pytestmark = pytest.mark.browser

HANGUL = re.compile(r"[\uac00-\ud7a3]")


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1 in a background thread; yields its base URL.

    The smoke bundle is asked for here, not as a parameter: session fixtures are set up before module ones, so a
    parameter would train the smoke model even when ``browser`` then skips (no Chromium)."""
    with in_thread(create_app(request.getfixturevalue("smoke_bundle"))) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium.launched() as b:
        yield b


@pytest.fixture
def sample(tmp_path: Path, class_image: Callable[..., np.ndarray]) -> Path:
    """A generated grey PNG with the covid pattern."""
    path = tmp_path / "sample.png"
    Image.fromarray(class_image("covid", 320, 288, np.random.default_rng(11))).save(path)
    return path


def upload_and_wait(page: object, base: str, sample: Path) -> None:
    page.goto(base + "/")
    page.set_input_files("#file-input", str(sample))
    page.wait_for_selector("#result:not([hidden])", timeout=chromium.TIMEOUT_MS)


def test_upload_heatmap_toggle_korean(browser: object, server: str, sample: Path, tmp_path: Path) -> None:
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
    if expected["decision"] == "accept":
        assert label.inner_text().strip() == DISPLAY_NAMES[expected["label"]]
    else:  # uncertain: said first, the two likeliest classes side by side
        assert label.inner_text().strip() == DECISION_NAMES["en"]["uncertain"]
        assert page.locator("#candidates").is_visible()
    assert page.locator("#result-decision").get_attribute("data-decision") == expected["decision"]
    assert page.locator("#prob-bars li").count() == 4
    assert "not a diagnosis" in page.locator("#notice").inner_text()
    assert page.locator("#advice-text").inner_text().strip() == expected["advice"]
    for img in ("#heatmap-img", "#input-img"):  # the page's CSP forbids eval: wait with expect()
        expect(page.locator(img)).to_have_js_property("complete", True, timeout=chromium.TIMEOUT_MS)
        assert page.eval_on_selector(img, "el => el.naturalWidth") == 288
    expect(page.locator("#heatmap-img")).to_have_css("opacity", "1")
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)

    page.locator("#heatmap-toggle").uncheck()
    expect(page.locator("#heatmap-img")).to_have_css("opacity", "0", timeout=chromium.TIMEOUT_MS)
    page.locator("#heatmap-toggle").check()
    expect(page.locator("#heatmap-img")).to_have_css("opacity", "1", timeout=chromium.TIMEOUT_MS)

    page.click("#lang-ko")
    expect(page.locator("#advice-text")).to_have_text(HANGUL, timeout=chromium.TIMEOUT_MS)
    assert HANGUL.search(page.locator("#advice-text").inner_text())
    assert HANGUL.search(page.locator("#notice").inner_text())
    assert page.locator("#lang-ko").get_attribute("aria-pressed") == "true"
    page.screenshot(path=str(tmp_path / "desktop_ko.png"), full_page=True)
    assert errors == []
    page.close()


def test_phone_width_layout(browser: object, server: str, sample: Path, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    upload_and_wait(page, server, sample)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "the page scrolls sideways at phone width"
    viewer, findings = (page.locator(s).bounding_box() for s in (".viewer", ".findings"))
    assert findings["y"] >= viewer["y"] + viewer["height"] - 1  # one column: the bars sit below the image
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert Image.open(io.BytesIO((tmp_path / "phone.png").read_bytes())).size[0] == 390 * 2
    page.close()


# --- uncertain and rejected answers, rendered from a Prediction served in place of the model's ---

MODEL = ModelInfo(name="fake", version="0", sha256="0" * 64)
FAKES = {
    "uncertain": ([0.438, 0.499, 0.048, 0.015], [Finding("low_confidence", 0.499, 0.98)]),
    "rejected": ([0.68, 0.12, 0.18, 0.02], [Finding("colour", 0.31, 0.08), Finding("unfamiliar_layout", 0.9, 0.5)]),
}


def serve_fake(page: object, decision: str) -> None:
    """Answer /api/v1/predict with a made-up Prediction of the given decision, in the language asked for."""
    probs, found = FAKES[decision]
    grey = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    heat = np.stack([grey] * 3, axis=2) if decision != "rejected" else None
    pred = Prediction.answer("fake.png", np.array(probs), decision, found, 10.0, MODEL, "en", image=grey, heatmap=heat)

    def fulfil(route: object) -> None:
        lang = "ko" if "lang=ko" in route.request.url else "en"
        body = pred.in_lang(lang).model_dump_json()
        route.fulfill(status=200, content_type="application/json", body=body)

    page.route("**/api/v1/predict?*", fulfil)


def test_uncertain_is_shown_as_uncertain_first(browser: object, server: str, sample: Path, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    serve_fake(page, "uncertain")
    upload_and_wait(page, server, sample)
    assert page.locator("#result-label").inner_text().strip() == DECISION_NAMES["en"]["uncertain"]
    assert not page.locator("#result-confidence").is_visible()
    first, second = page.locator("[data-testid=candidate-1]"), page.locator("[data-testid=candidate-2]")
    assert first.inner_text().split() == ["Lung", "Opacity", "49.9%"]
    assert second.inner_text().split() == ["COVID-19", "43.8%"]
    a, b, bars = first.bounding_box(), second.bounding_box(), page.locator("#prob-bars").bounding_box()
    assert abs(a["y"] - b["y"]) < 2 and b["x"] > a["x"] + a["width"]  # side by side
    assert bars["y"] > a["y"] + a["height"]  # the bars come after
    assert page.locator("#reasons li").inner_text() == "confidence 0.50 is below the 0.98 cut-off"
    page.click("#lang-ko")
    expect(page.locator("#reasons li")).to_have_text(HANGUL, timeout=chromium.TIMEOUT_MS)
    assert first.inner_text().split()[:2] == CLASS_NAMES["ko"]["lung_opacity"].split()
    assert page.locator("#result-label").inner_text().strip() == DECISION_NAMES["ko"]["uncertain"]
    page.screenshot(path=str(tmp_path / "uncertain_ko.png"), full_page=True)
    page.close()


def test_rejected_shows_no_bars_and_says_why(browser: object, server: str, sample: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    serve_fake(page, "rejected")
    upload_and_wait(page, server, sample)
    assert page.locator("#result-label").inner_text().strip() == DECISION_NAMES["en"]["rejected"]
    for hidden in ("#probabilities", "#candidates", "#result-confidence", "#heatmap-img"):
        assert not page.locator(hidden).is_visible(), hidden
    reasons = page.locator("#reasons li").all_inner_texts()
    assert len(reasons) == 2 and all(r.startswith("looks unlike a chest X-ray") for r in reasons)
    assert "it is in colour" in reasons[0]
    page.close()


# --- bundled samples, offline API docs, Korean glyphs ---


def test_clicking_a_sample_analyses_it(browser: object, server: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server + "/")
    buttons = page.locator("[data-testid=sample]")
    expect(buttons).to_have_count(len(list_samples()), timeout=chromium.TIMEOUT_MS)
    name = buttons.nth(2).get_attribute("data-name")
    expect(buttons.nth(2).locator("img")).to_have_js_property("complete", True, timeout=chromium.TIMEOUT_MS)
    assert buttons.nth(2).locator("img").evaluate("el => el.naturalWidth") > 0
    buttons.nth(2).click()
    page.wait_for_selector("#result:not([hidden])", timeout=chromium.TIMEOUT_MS)
    assert page.locator("#file-name").inner_text() == name
    accept = page.locator("#file-input").get_attribute("accept")
    assert {".bmp", ".tif", ".tiff", ".webp", ".dcm"} <= set(accept.split(","))
    page.close()


def test_api_docs_render_offline(browser: object, server: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def local_only(route: object) -> None:
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", local_only)
    page.goto(server + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("cxr-triage", timeout=chromium.TIMEOUT_MS)
    expect(page.locator(".opblock").first).to_be_visible(timeout=chromium.TIMEOUT_MS)
    assert page.locator(".opblock").count() >= 4 and outside == []
    page.close()


def glyph(page: object, text: str) -> np.ndarray:
    """``text`` drawn at 48 px in the page's own font stack, as a grey pixel array."""
    page.evaluate(
        """text => {
            const s = document.createElement("span");
            s.id = "glyph-probe";
            s.textContent = text;
            Object.assign(s.style, {position: "absolute", left: "0", top: "0", zIndex: "9", fontSize: "48px",
                                    padding: "4px", background: "#fff", color: "#000", lineHeight: "1.2",
                                    whiteSpace: "nowrap"});
            document.body.append(s);
        }""",
        text,
    )
    shot = page.locator("#glyph-probe").screenshot()
    page.evaluate("() => document.getElementById('glyph-probe').remove()")
    return np.asarray(Image.open(io.BytesIO(shot)).convert("L"), np.float32)


def differ(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference of two glyph images (cropped to the common size)."""
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return float(np.abs(a[:h, :w] - b[:h, :w]).mean())


def test_korean_glyphs_are_drawn(browser: object, server: str, sample: Path, tmp_path: Path) -> None:
    """Hangul is drawn with a real font: two different syllables give different pixels, whereas characters the
    fonts lack all come out as the same missing-glyph box (checked on private-use code points)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    upload_and_wait(page, server, sample)
    page.click("#lang-ko")
    expect(page.locator("#advice-text")).to_have_text(HANGUL, timeout=chromium.TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "korean.png"), full_page=True)
    box_a, box_b = glyph(page, "\ue000"), glyph(page, "\ue001")
    assert differ(box_a, box_b) < 1.0  # missing glyphs all look alike: the check below can see a missing font
    ga, gb, gc = glyph(page, "가"), glyph(page, "힣"), glyph(page, "한국어")
    assert (ga < 128).sum() > 40, "no ink where 가 should be"
    assert differ(ga, gb) > 5.0, "가 and 힣 look alike: Hangul is drawn as missing-glyph boxes (install fonts-noto-cjk)"
    assert differ(ga, box_a) > 5.0
    assert gc.shape[1] > 2 * ga.shape[1]  # three syllables are wider than one
    title = page.locator(".drop-title")
    assert HANGUL.search(title.inner_text()) and title.bounding_box()["width"] > 100
    page.close()


def test_glyph_check_sees_a_missing_cjk_font(browser: object, tmp_path: Path) -> None:
    """The control for the test above: a Chromium whose fontconfig knows only DejaVu (no Hangul) draws 가 and 힣 as
    the same box, and the check says so."""
    conf = tmp_path / "fonts.conf"
    conf.write_text(
        '<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>'
        f"<dir>/usr/share/fonts/truetype/dejavu</dir><cachedir>{tmp_path / 'cache'}</cachedir></fontconfig>"
    )
    if not Path("/usr/share/fonts/truetype/dejavu").is_dir():
        pytest.skip("Debian's DejaVu fonts are not installed")
    env = {**os.environ, "FONTCONFIG_FILE": str(conf)}
    latin_only = browser.browser_type.launch(
        executable_path=chromium.chromium_path(), args=chromium.CHROMIUM_ARGS, env=env
    )
    try:
        page = latin_only.new_page()
        page.set_content("<!doctype html><body></body>")
        assert differ(glyph(page, "가"), glyph(page, "힣")) < 1.0  # both the missing-glyph box
        assert differ(glyph(page, "A"), glyph(page, "W")) > 5.0  # Latin is still drawn
    finally:
        latin_only.close()
