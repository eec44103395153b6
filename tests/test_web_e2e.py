"""The search page in headless Chromium against a real uvicorn server: type, see images, click, upload, share."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from clipsearch.server import serve_in_background

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
INSTALL_HINT = "install it with .ci/install_browser.sh (Debian's chromium; Playwright's own download is not used)"


def chromium_executable() -> str | None:
    configured = os.environ.get("CLIPSEARCH_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


def skip_or_fail(reason: str):
    # CI installs the browser on purpose, so a missing one there is a broken build, not a reason to skip.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true, so this end-to-end test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the playwright python package is not installed")
    executable = chromium_executable()
    if executable is None:
        skip_or_fail(f"Chromium was not found at /usr/bin/chromium or $CLIPSEARCH_CHROMIUM; {INSTALL_HINT}")
    # Playwright's launch() gives every browser a fresh temporary profile, so none is passed here.
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint, colour_images):
    from test_server import build_colour_engine

    _, image_paths = colour_images
    with serve_in_background(build_colour_engine(tiny_checkpoint, image_paths)) as url:
        yield url


@pytest.fixture()
def console_problems():
    """Console errors and uncaught exceptions of the page; a test expecting some clears the list."""
    return []


@pytest.fixture()
def page(browser, console_problems):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(20_000)
    # A CSP violation or a script error shows up here, so the page must stay silent.
    page.on("console", lambda message: message.type == "error" and console_problems.append(message.text))
    page.on("pageerror", lambda error: console_problems.append(str(error)))
    yield page
    context.close()
    assert not console_problems, console_problems


def wait_for_loaded_results(page, count: int) -> list[int]:
    """Wait until `count` result cards show decoded thumbnails; return their collection ids in order."""
    page.wait_for_function(
        """count => {
            const images = [...document.querySelectorAll('#results .card img')];
            return images.length === count && images.every(image => image.complete && image.naturalWidth > 0);
        }""",
        arg=count,
    )
    return [int(card.get_attribute("data-id")) for card in page.locator("#results .card").all()]


def wait_for_first_result(page, item_id: int) -> None:
    # Predicates are functions, not expression strings: the page's CSP forbids the eval those would need.
    page.wait_for_function(
        "id => document.querySelector('#results .card')?.dataset.id === String(id)", arg=item_id
    )


def test_typed_query_shows_loaded_images_in_a_shareable_url(page, base_url):
    page.goto(base_url + "/")
    page.wait_for_function("() => document.getElementById('collection-info').textContent.includes('12 images')")
    page.fill("#query", "a bright red square")
    page.fill("#top-k", "6")
    page.press("#query", "Enter")
    ids = wait_for_loaded_results(page, 6)
    assert len(set(ids)) == 6
    assert re.search(r"\?q=a\+bright\+red\+square&top_k=6$", page.url)
    widths = page.eval_on_selector_all("#results .card img", "images => images.map(image => image.naturalWidth)")
    assert all(width > 0 for width in widths)
    assert page.locator("#results .card .score").first.inner_text()

    # The link alone reproduces the search in a fresh page.
    shared = page.url
    page.goto("about:blank")
    page.goto(shared)
    assert wait_for_loaded_results(page, 6) == ids
    assert page.input_value("#query") == "a bright red square"


def test_clicking_a_result_searches_for_similar_images(page, base_url):
    page.goto(base_url + "/?q=green&top_k=5")
    ids = wait_for_loaded_results(page, 5)
    page.locator("#results .card .thumb").nth(2).click()
    page.wait_for_url(re.compile(rf"similar={ids[2]}&top_k=5$"))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('similar to')")
    # The clicked image is the query, shown in the preview; the results are the others.
    assert ids[2] not in wait_for_loaded_results(page, 5)
    assert page.locator("#query-preview").is_visible()
    page.go_back()
    page.wait_for_url(re.compile(r"q=green"))
    # The similar results stay on screen until the text search answers, and the grid turns over card
    # by card: wait for the whole list (a timeout here is the failure), not only its first card.
    page.wait_for_function(
        """ids => {
            const cards = [...document.querySelectorAll('#results .card')];
            return cards.length === ids.length && cards.every((card, i) => {
                const image = card.querySelector('img');
                return card.dataset.id === String(ids[i]) && image && image.complete && image.naturalWidth > 0;
            });
        }""",
        arg=ids,
    )
    assert wait_for_loaded_results(page, 5) == ids


def test_uploaded_image_finds_itself_first(page, base_url, colour_images):
    _, image_paths = colour_images
    # /api/health is held back, as a busy server may: an image chosen before it answers must still
    # get the URL's top_k, and the page's own first search, made once it answers, must not replace it.
    held_health = []
    page.route("**/api/health", lambda route: held_health.append(route))
    page.goto(base_url + "/?top_k=4")
    page.set_input_files("#image-input", str(image_paths[9]))
    wait_for_first_result(page, 9)
    wait_for_loaded_results(page, 4)
    assert held_health, "the page never asked /api/health"
    for route in held_health:
        route.continue_()
    page.wait_for_function("() => document.getElementById('collection-info').textContent.includes('12 images')")
    assert wait_for_loaded_results(page, 4)[0] == 9
    assert page.input_value("#top-k") == "4"
    assert page.locator("#query-preview").is_visible()


def test_bad_request_shows_the_server_error(page, base_url, console_problems):
    page.goto(base_url + "/?similar=../../etc/passwd")
    page.wait_for_selector("#error:not([hidden])")
    assert "no collection item" in page.inner_text("#error")
    assert page.locator("#results .card").count() == 0
    # The browser logs each 404 it was answered; those are the expected ones, nothing else is.
    assert all("404" in problem for problem in console_problems), console_problems
    console_problems.clear()


def test_filters_refinements_and_more_results(page, base_url, console_problems):
    # The colour engine's images are in folders group0..group2 (field `group`), four each.
    page.goto(base_url + "/?q=green&where=group%3Dgroup1&top_k=2")
    page.wait_for_function("() => document.getElementById('field-list').textContent.includes('group')")
    first = wait_for_loaded_results(page, 2)
    assert set(first) <= {1, 4, 7, 10}
    assert page.input_value("#where") == "group=group1"
    assert page.locator("#results .card .caption").first.inner_text().startswith("colour number")
    # More results: the next page appended below, the same filter.
    page.click("#more")
    ids = wait_for_loaded_results(page, 4)
    assert ids[:2] == first and set(ids) == {1, 4, 7, 10}
    # A result as a refinement: a chip, the URL, the filter kept.
    page.locator("#results .card .less-like").nth(1).click()
    page.wait_for_url(re.compile(rf"sub=id%3A{ids[1]}"))
    page.wait_for_selector("#terms .term.subtracted")
    assert set(wait_for_loaded_results(page, 2)) <= {1, 4, 7, 10}
    # A word as a refinement, then removed again with its chip's ×.
    page.fill("#refine", "blue")
    page.click(".refine-add")
    page.wait_for_url(re.compile(r"add=text%3Ablue"))
    page.wait_for_function("() => document.querySelectorAll('#terms .term').length === 2")
    page.locator("#terms .term").nth(1).locator("button").click()
    page.wait_for_function("() => document.querySelectorAll('#terms .term').length === 1")
    assert "add=" not in page.url
    # A filter the collection cannot apply is the server's message, not an empty grid.
    page.fill("#where", "colour=red")
    page.press("#query", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "no field 'colour'" in page.inner_text("#error")
    assert all("400" in problem for problem in console_problems), console_problems  # the browser logs the answer
    console_problems.clear()
