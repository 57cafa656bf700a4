"""Re-take docs/screenshot.png: the page with the shipped model's answer for one bundled sample.

Usage: python docs/screenshot.py [--sample COVID-2114.jpg] [--out docs/screenshot.png]
Needs the [serve,dev] extras (Playwright) and a Chromium binary (Debian's `chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from importlib import resources
from pathlib import Path

import uvicorn
from playwright.sync_api import expect, sync_playwright

from cxr_triage.serve.app import create_app

SAMPLES = Path(str(resources.files("cxr_triage") / "assets" / "samples"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", default="COVID-2114.jpg")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("screenshot.png"))
    a = ap.parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        page.set_input_files("#file-input", str(SAMPLES / a.sample))
        page.wait_for_selector("#result:not([hidden])", timeout=30_000)
        expect(page.locator("#heatmap-img")).to_have_js_property("complete", True, timeout=30_000)
        page.screenshot(path=str(a.out), full_page=True)
        browser.close()
    srv.should_exit = True
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
