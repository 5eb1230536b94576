"""The search page and the curation browser in a real browser (headless system Chromium through Selenium).

A real ``uvicorn api.main:app`` on a free 127.0.0.1 port serves a curated version built from the bundled sample
with tiny-random, carrying a removals.parquet (duplicates and misaligned rows). The test types a query and sees
the result images decode, filters by category, searches with an image (file input and a dropped file), opens a
record, closes it with Escape, asks for "more like this", and browses the curation removals; any browser console
error fails it. Screenshots (1280 px and 360 px wide) go to a temp dir, or with UPDATE_SCREENSHOTS=1 to
docs/screenshots/ (the ones README shows). Skipped, with the reason, when Chromium cannot start.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from .dagster_ui import BrowserUnavailable, screenshot, set_viewport, start_chromium, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "api"))  # the API tests' artifact builders (api_helpers, test_pages)
from api_helpers import build_sample_artifact, running_uvicorn  # noqa: E402
from test_pages import add_removals  # noqa: E402

QUERY = "lampe torche étanche camping"
TOP_K = 12


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), 1280, 900, console_log=True)
    except BrowserUnavailable as exc:
        pytest.skip(f"browser e2e test skipped: {exc}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: README's docs/screenshots/ only on explicit opt-in (UPDATE_SCREENSHOTS=1)."""
    if os.environ.get("UPDATE_SCREENSHOTS", "").strip() == "1":
        return REPO / "docs" / "screenshots"
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, browser):
    """A curated version of 200 sample rows (tiny-random) with a removals table; the browser fixture comes first
    so that a missing Chromium skips before any of this is built."""
    from curation_dagster.core.encoder import ClipEncoder
    from curation_dagster.core.settings import TINY_RANDOM

    d = tmp_path_factory.mktemp("search-page")
    build_sample_artifact(d, ClipEncoder.load(TINY_RANDOM, "cpu"), rows=200)
    removals = add_removals(d, duplicates=4, misaligned=3)
    return d, removals


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    d, _ = artifacts
    env = {"CURATION_CLIP_MODEL": "tiny-random", "CURATION_DEVICE": "cpu", "CURATION_API_RELOAD_INTERVAL_S": "0",
           "CURATION_API_TORCH_THREADS": "1", "CURATION_API_ENCODE_WORKERS": "1"}
    with running_uvicorn(d, env, tmp_path_factory.mktemp("uvicorn") / "log.txt") as (_, base):
        yield base


# ----------------------------------------------------------------------------------------------------- helpers


def console_errors(driver, expected: tuple[str, ...] = ()) -> list[str]:
    """SEVERE browser console entries since the last call, less those containing one of ``expected``."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(x in e["message"] for x in expected)]


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, selector: str) -> str:
    found = css(driver, selector)
    return found[0].text if found else ""


def wait_status(driver, contains: str, timeout: float = 30) -> str:
    return wait_until(lambda: contains in (t := text_of(driver, "#status")) and "status-loading" not in
                      css(driver, "#status")[0].get_attribute("class") and t, timeout, interval=0.2,
                      what=f"the status line to say {contains!r}")


def hit_ids(driver) -> list[int]:
    return [int(b.get_attribute("data-record")) for b in css(driver, "#results .hit")]


def images_decoded(driver, selector: str) -> list[int]:
    """naturalWidth of every matching <img> (0: not loaded or broken)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(i => i.complete ? i.naturalWidth : 0)",
        selector)


def wait_images(driver, selector: str, timeout: float = 30) -> list[int]:
    return wait_until(lambda: (w := images_decoded(driver, selector)) and all(x > 0 for x in w) and w, timeout,
                      interval=0.2, what=f"the images {selector} to load")


def load_all_lazy_images(driver, selector: str) -> list[int]:
    """Scroll through the page (lazy images load near the viewport), then wait until every image decoded."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    for y in range(0, height + 600, 600):
        driver.execute_script("window.scrollTo(0, arguments[0])", y)
        time.sleep(0.05)
    widths = wait_images(driver, selector)
    driver.execute_script("window.scrollTo(0, 0)")
    return widths


def no_horizontal_scroll(driver) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def text_search(driver, query: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = css(driver, "input[name=q]")[0]
    box.clear()
    box.send_keys(query, Keys.ENTER)


def select(driver, selector: str, value: str) -> str:
    from selenium.webdriver.support.ui import Select

    s = Select(css(driver, selector)[0])
    s.select_by_value(value)
    return s.first_selected_option.text


def open_page(driver, url: str, width: int, height: int = 900) -> None:
    set_viewport(driver, width, height)
    driver.get(url)
    wait_until(lambda: "tiny-random" in text_of(driver, "#served"), 30, interval=0.2, what="the header")


# ------------------------------------------------------------------------------------------------------- tests


def test_search_page_desktop(browser, server, artifacts, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d, _ = artifacts
    stats = httpx.get(f"{server}/stats").json()
    open_page(browser, server + "/", 1280)
    header = text_of(browser, "#served")
    assert stats["version"] in header and f"{stats['num_records']} records" in header
    banner = css(browser, "#banner")[0]
    assert banner.is_displayed() and "scores are meaningless" in banner.text
    options = [o.get_attribute("value") for o in css(browser, "#category option")]
    assert set(options) == {""} | set(stats["categories"])  # no unlabelled product in this version
    assert browser.switch_to.active_element.get_attribute("name") == "q"  # focus starts in the search box

    # Text query (Enter): a grid of results whose images decode, sized before they load.
    top_k = css(browser, "#top-k")[0]
    top_k.clear()
    top_k.send_keys(str(TOP_K))
    text_search(browser, QUERY)
    wait_status(browser, f"{TOP_K} results for “{QUERY}”")
    assert len(hit_ids(browser)) == TOP_K
    imgs = css(browser, "#results img")
    assert all(i.get_attribute("loading") == "lazy" and i.get_attribute("width") and i.get_attribute("height")
               for i in imgs)
    assert len(load_all_lazy_images(browser, "#results img")) == TOP_K
    first = css(browser, "#results .hit")[0].text
    assert "score" in first and "alignment" in first
    screenshot(browser, shots / "search_desktop.png")

    # Category filter: every hit is from the chosen category.
    code = max(stats["label_distribution"], key=lambda c: stats["label_distribution"][c] if c != "unlabelled" else -1)
    label = select(browser, "#category", code)
    wait_status(browser, f"in {label}")
    cats = [e.text for e in css(browser, "#results .hit .category")]
    assert cats and all(c == f"{stats['categories'][code]} ({code})" for c in cats)
    select(browser, "#category", "")

    # Image query through the file input: the served record with that very image comes first.
    rec_file = httpx.get(f"{server}/record/{hit_ids(browser)[0]}").json()["image_file"]
    css(browser, "#image-file")[0].send_keys(str(d / "images" / rec_file))
    wait_status(browser, f"like image {rec_file}")
    assert len(hit_ids(browser)) == TOP_K
    wait_images(browser, "#query-image img")

    # Image query by dropping a file onto the page (a real DataTransfer carrying a File).
    browser.execute_script("""
        const [url, name] = arguments;
        fetch(url).then(r => r.blob()).then(blob => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], name, {type: 'image/jpeg'}));
          document.body.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt, bubbles: true, cancelable: true}));
          document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        });""", f"/images/{rec_file}", "dropped.jpg")
    wait_status(browser, "like image dropped.jpg")
    assert css(browser, "#drop-overlay")[0].get_attribute("hidden") is not None

    # Open a record with the keyboard, close it with Escape, reopen it, then "more like this".
    text_search(browser, QUERY)
    wait_status(browser, f"results for “{QUERY}”")
    rid = hit_ids(browser)[1]
    button = css(browser, f'#results .hit[data-record="{rid}"]')[0]
    browser.execute_script("arguments[0].focus()", button)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    dialog = css(browser, "#record-view")[0]
    wait_until(lambda: dialog.is_displayed() and "Product id" in dialog.text, 15, interval=0.2, what="the record view")
    record = httpx.get(f"{server}/record/{rid}").json()
    for key in ("record_id", "productid", "imageid", "designation", "image_file", "version"):
        assert str(record[key]) in dialog.text, key
    wait_images(browser, "#record-body img")
    screenshot(browser, shots / "search_record_desktop.png")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_until(lambda: not dialog.is_displayed(), 10, interval=0.2, what="Escape to close the record view")
    assert browser.switch_to.active_element.get_attribute("data-record") == str(rid)  # focus back on the hit
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_until(lambda: dialog.is_displayed() and "Product id" in dialog.text, 15, interval=0.2, what="the record again")
    dialog.find_element(By.ID, "more-like-this").click()
    wait_status(browser, f"like “{record['designation']}”")
    assert not dialog.is_displayed()
    similar = hit_ids(browser)
    assert len(similar) == TOP_K and rid not in similar
    load_all_lazy_images(browser, "#results img")
    assert console_errors(browser) == []

    # Problems are shown, never silent: an input the page refuses, an upload the server refuses (415).
    top_k = css(browser, "#top-k")[0]
    top_k.clear()
    top_k.send_keys("0")
    text_search(browser, QUERY)
    wait_until(lambda: "between 1 and 100" in text_of(browser, "#status"), 10, interval=0.2, what="top-k message")
    top_k.clear()
    top_k.send_keys(str(TOP_K))
    bad = Path(tempfile.mkdtemp()) / "notes.png"
    bad.write_text("not an image")
    css(browser, "#image-file")[0].send_keys(str(bad))
    wait_until(lambda: "Not a usable image" in text_of(browser, "#status"), 15, interval=0.2, what="the 415 message")
    assert "status-error" in css(browser, "#status")[0].get_attribute("class")
    assert console_errors(browser, expected=("/search/image - Failed to load resource",)) == []


def test_search_page_at_360px(browser, server, shots):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server + "/", 360, 780)
    text_search(browser, "armoire chambre enfants")
    wait_status(browser, "results for")
    assert no_horizontal_scroll(browser)
    widths = [e.size["width"] for e in css(browser, "#results .hit")]
    assert widths and all(120 <= w <= 180 for w in widths)  # two columns
    load_all_lazy_images(browser, "#results img")
    screenshot(browser, shots / "search_mobile.png")
    css(browser, "#results .hit")[0].click()
    dialog = css(browser, "#record-view")[0]
    wait_until(lambda: dialog.is_displayed() and "Product id" in dialog.text, 15, interval=0.2, what="the record view")
    assert dialog.size["width"] <= 360
    wait_images(browser, "#record-body img")
    screenshot(browser, shots / "search_record_mobile.png")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_until(lambda: not dialog.is_displayed(), 10, interval=0.2, what="Escape to close the record view")
    assert console_errors(browser) == []


def test_curation_browser(browser, server, artifacts, shots):
    _, removals = artifacts
    open_page(browser, server + "/curation", 1280)
    wait_until(lambda: len(css(browser, "article.removal")) == removals.height, 20, interval=0.2,
               what="the removals")
    titles = [e.text for e in css(browser, ".reason-title")]
    assert titles == ["Duplicates", "Misaligned image–text pairs"]
    dup = css(browser, "article.removal-duplicate")
    mis = css(browser, "article.removal-misaligned")
    assert len(dup) == 4 and len(mis) == 3
    # Duplicate: removed and kept side by side, both images decoded, both designations, the similarity.
    first = removals.filter(removals["reason"] == "duplicate").sort("record_id").row(0, named=True)
    assert first["designation"] in dup[0].text and first["kept_designation"] in dup[0].text
    assert f"similarity {first['similarity']:.4f}" in dup[0].text
    assert len(load_all_lazy_images(browser, "article.removal img")) == removals.height + 4
    # Misaligned: the image, the text, the score against the threshold.
    row = removals.filter(removals["reason"] == "misaligned").sort("record_id").row(0, named=True)
    assert row["designation"] in mis[0].text
    assert f"alignment score {row['alignment_score']:.4f} < threshold {row['threshold']:.4f}" in mis[0].text
    assert "4 duplicates, 3 misaligned" in text_of(browser, "#summary")
    screenshot(browser, shots / "curation_desktop.png")

    select(browser, "#reason", "misaligned")
    wait_until(lambda: len(css(browser, "article.removal")) == 3 and not css(browser, "article.removal-duplicate"),
               15, interval=0.2, what="the reason filter")
    assert "reason=misaligned" in browser.current_url
    select(browser, "#reason", "")
    code = str(removals["prdtypecode"][0])
    n = int((removals["prdtypecode"] == int(code)).sum())
    select(browser, "#category", code)
    wait_until(lambda: len(css(browser, "article.removal")) == n, 15, interval=0.2, what="the category filter")
    select(browser, "#category", "")
    wait_until(lambda: len(css(browser, "article.removal")) == removals.height, 15, interval=0.2, what="all again")

    set_viewport(browser, 360, 780)
    assert no_horizontal_scroll(browser)
    screenshot(browser, shots / "curation_mobile.png")
    assert console_errors(browser) == []
