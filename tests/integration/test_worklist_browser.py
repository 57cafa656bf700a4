"""The worklist view on the page (headless Chromium): most urgent first, accession numbers, both languages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cxr_triage.runtime.worklist import Worklist
from cxr_triage.serve.app import create_app
from tests import chromium
from tests.live_server import in_thread
from tests.predictions import prediction

sync_api = chromium.sync_api()
expect = sync_api.expect

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium.launched() as b:
        yield b


@pytest.fixture(scope="module")
def page_with_worklist(browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    store = tmp_path_factory.mktemp("worklist_store")
    wl = Worklist(store)
    wl.record("1.1", "9.1", prediction("normal"), accession_number="ACC-NORMAL")
    wl.record("1.2", "9.2", prediction("viral_pneumonia", p=0.8), accession_number="ACC-VIRAL")
    wl.record("1.3", "9.3", prediction("covid", p=0.97), accession_number="ACC-COVID")
    wl.close()
    with in_thread(create_app(store=store)) as url:
        page = browser.new_page()
        page.set_default_timeout(chromium.TIMEOUT_MS)
        page.goto(url)
        yield page
        page.close()


def test_worklist_lists_most_urgent_first(page_with_worklist):
    page = page_with_worklist
    rows = page.get_by_test_id("worklist-rows").locator("tr")
    expect(page.get_by_test_id("worklist")).to_be_visible()
    expect(rows).to_have_count(3)
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(3)] == ["ACC-COVID", "ACC-VIRAL", "ACC-NORMAL"]
    first = rows.nth(0).locator("td")
    assert first.nth(0).inner_text() == "Urgent" and first.nth(2).inner_text() == "COVID-19 97%"
    assert rows.nth(2).locator("td").nth(0).inner_text() == "Routine"


def test_worklist_follows_the_language(page_with_worklist):
    page = page_with_worklist
    page.get_by_test_id("lang-ko").click()
    expect(page.locator("#worklist-title")).to_contain_text("판독 목록")
    expect(page.get_by_test_id("worklist-rows").locator("tr").nth(0).locator("td").nth(0)).to_have_text("긴급")
    page.get_by_test_id("lang-en").click()
    expect(page.locator("#worklist-title")).to_contain_text("Worklist")


def test_no_worklist_no_section(browser):
    with in_thread(create_app(store=None)) as url:
        page = browser.new_page()
        try:
            page.goto(url)
            page.wait_for_load_state("networkidle")
            expect(page.get_by_test_id("worklist")).to_be_hidden()
            expect(page.get_by_test_id("drop-zone")).to_be_visible()
        finally:
            page.close()
