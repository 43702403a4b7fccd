"""The web UI in real headless Chromium (Debian's chromium, driven by Playwright through its
executable path): what a person sees for a query, safe mode, click-to-search, infinite scroll,
the query in the page's URL, the export, and a console without errors."""
from __future__ import annotations

import shutil
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    assert shutil.which(CHROMIUM), "Debian's chromium is needed (make install puts it there)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(90_000)  # the shared 2-core machine can be slow; nothing here is timed
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    yield page
    context.close()


def shown_ids(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#results figure", "els => els.map(e => e.dataset.id)")]


def wait_for_results(page, at_least: int = 1):
    page.wait_for_function(f"document.querySelectorAll('#results figure').length >= {at_least}")
    page.wait_for_function("!document.getElementById('status').textContent.startsWith('searching')")


def test_query_in_url_shows_its_class_first(page, live, tmp_path):
    page.goto(live.url + "/?query=" + quote("a green circle"))
    wait_for_results(page)
    safe = [g for g, t in live.known.items() if (t["true_color"], t["true_shape"]) == ("green", "circle")
            and not t["unsafe"] and t["duplicate_of"] is None]
    first = shown_ids(page)[:len(safe)]
    assert len(set(first) & set(safe)) >= len(safe) - 1
    assert page.input_value("#query") == "a green circle"
    page.wait_for_function("[...document.querySelectorAll('#results img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "search-ui.png"), full_page=False)
    captions = page.eval_on_selector_all("#results figcaption", "els => els.length")
    assert captions > 0
    page.uncheck("#display-captions")
    assert page.eval_on_selector_all("#results figcaption", "els => els.length") == 0
    page.check("#display-similarities")
    assert page.eval_on_selector_all("#results .similarity", "els => els.length") > 0
    assert not page.problems, page.problems


def test_safe_mode_hides_the_unsafe_stand_ins(page, live):
    unsafe = [g for g, t in live.known.items() if t["unsafe"] and t["duplicate_of"] is None]
    probe = live.known[unsafe[0]]["url"]
    page.goto(live.url + "/?imageUrl=" + quote(probe, safe=""))
    wait_for_results(page)
    assert not set(shown_ids(page)) & set(unsafe), "safe mode is on by default"
    page.uncheck("#safe-mode")
    page.wait_for_function(f"document.querySelector('#results figure') && "
                           f"document.querySelector('#results figure').dataset.id === '{unsafe[0]}'")
    assert len(set(shown_ids(page)) & set(unsafe)) >= 3
    page.check("#safe-mode")
    page.wait_for_function(f"![...document.querySelectorAll('#results figure')].some(f => f.dataset.id === '{unsafe[0]}')")
    assert not set(shown_ids(page)) & set(unsafe)
    assert not page.problems, page.problems


def test_click_scroll_and_export(page, live, tmp_path):
    page.goto(live.url + "/")
    page.fill("#query", "a blue star")
    page.click("#text-search")
    wait_for_results(page)
    assert "query=a+blue+star" in page.url
    assert len(shown_ids(page)) <= 40, "the first page carries metadata for 40"
    page.uncheck("#hide-duplicate-urls")
    for _ in range(10):  # infinite scroll pages through the rest with /metadata
        page.mouse.wheel(0, 20_000)
        page.wait_for_timeout(300)
    page.wait_for_function("document.querySelectorAll('#results figure').length > 100")
    total = len(shown_ids(page))
    with page.expect_download() as info:
        page.click("#export")
    path = tmp_path / "export.parquet"
    info.value.save_as(path)
    table = pq.read_table(path)
    assert table.column_names[:3] == ["url", "caption", "similarity"]
    assert table.num_rows >= total
    assert all(live.known[i]["url"] == u for i, u in zip(table["id"].to_pylist(), table["url"].to_pylist()))
    # Clicking a picture searches for pictures like it: it comes first, its URL is the query.
    target = shown_ids(page)[5]
    page.click(f"#results figure[data-id='{target}'] img")
    page.wait_for_function(f"document.querySelector('#results figure').dataset.id === '{target}'")
    assert f"similar={target}" in page.url
    assert not page.problems, page.problems


def test_image_upload(page, live, world):
    copied = {t["duplicate_of"] for t in live.known.values()}
    gid = next(g for g, t in live.known.items() if not t["unsafe"] and t["duplicate_of"] is None and g not in copied)
    file = world / "web" / "img" / live.known[gid]["url"].rsplit("/", 1)[1]
    # The index list is held back until the results show: a file picked while the page still
    # loads is searched (the listener was once added after that fetch, and a loaded machine
    # lost the upload).
    held = []
    page.route("**/indices-list", lambda route: held.append(route))
    page.goto(live.url + "/")
    page.set_input_files("#image-file", str(file))
    page.wait_for_function(f"document.querySelector('#results figure') && "
                           f"document.querySelector('#results figure').dataset.id === '{gid}'")
    assert len(held) == 1
    held[0].continue_()
    page.wait_for_function("document.querySelectorAll('#index option').length > 0")
    assert page.eval_on_selector_all("#query-image img", "els => els.length") == 1
    assert not page.problems, page.problems
