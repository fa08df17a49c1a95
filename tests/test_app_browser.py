"""A real browser: Debian's headless Chromium driven by Playwright (no browser download) against the running app.

Screenshots go to screenshots/ (git-ignored) for a person to look at.
"""
import os
import shutil
from pathlib import Path

import pytest

from app_fixtures import shared_app

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
XSS = "<img src=x onerror=alert(1)>"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

if not shutil.which(CHROMIUM) and os.environ.get("CI") != "true":
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; CI installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.dialogs = []
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        page.goto(shared_app().url, wait_until="domcontentloaded")
        page.wait_for_selector("#jl-race", timeout=60_000)
        yield page
        browser.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def race(page, prompt: str, max_new: int, example: str | None = None, wait: bool = True) -> None:
    """Start a race (typing the prompt, or clicking the example that holds it) and wait until its lanes are done."""
    if example:
        page.get_by_text(example, exact=True).click()
        expect(page.locator("#jl-prompt textarea")).to_have_value(prompt)
    else:
        page.locator("#jl-prompt textarea").fill(prompt)
    set_slider(page, "jl-max-new", max_new)
    page.locator("#jl-race").click()
    if wait:  # this race's board, not the last one's: it echoes this prompt
        page.wait_for_function(
            "(p) => { const e = document.querySelector('#jl-board .jl-prompt-echo');"
            " const l = document.querySelectorAll('#jl-board .jl-lane');"
            " return e !== null && e.textContent.includes(p) && l.length > 0 && [...l].every(x => x.dataset.status === 'done'); }",
            arg=prompt, timeout=240_000)


def test_example_race_shows_lanes_charts_and_steps(page):
    race(page, "Count from 1 to 10, separated by commas.", 40, example="Maths · count to ten")
    lanes = page.locator("#jl-board .jl-lane")
    assert lanes.count() == 3
    texts = {lanes.nth(i).get_attribute("data-lane"): lanes.nth(i).locator(".jl-text").inner_text() for i in range(3)}
    assert texts["base_ar"].strip() and texts["base_jacobi"] == texts["base_ar"]
    assert "same text as base_ar" in lanes.nth(1).inner_text()
    assert page.locator("#jl-board .jl-tok").count() > 5
    for chart in ("jl-time", "jl-speed", "jl-accept", "jl-conv"):
        page.wait_for_selector(f"#{chart} .js-plotly-plot", timeout=60_000)
    page.wait_for_selector("#jl-step table.jl-window", timeout=60_000)
    page.locator("#jl-replay-btn").click()
    page.wait_for_selector("#jl-replay .jl-lane .jl-rp", timeout=30_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=SHOTS / "race.png", full_page=True)
    page.locator("#jl-board").screenshot(path=SHOTS / "lanes.png")
    page.locator("#jl-conv").screenshot(path=SHOTS / "convergence.png")
    page.locator("#jl-step").screenshot(path=SHOTS / "step.png")


def test_branches_slider_keeps_the_text(page):
    """The Branches slider (in the closed "Decoding extras" accordion) reaches the decoders: the Jacobi lanes still write
    the AR lane's text."""
    assert not page.locator("#jl-branches").is_visible()  # the page opens with plain Jacobi and the extras folded away
    page.locator("#jl-extras").get_by_text("Decoding extras").first.click()
    expect(page.locator("#jl-branches")).to_be_visible()
    set_slider(page, "jl-branches", 2)
    try:
        race(page, "Write a haiku about the sea.", 32)
        lanes = page.locator("#jl-board .jl-lane")
        texts = {lanes.nth(i).get_attribute("data-lane"): lanes.nth(i).locator(".jl-text").inner_text()
                 for i in range(lanes.count())}
        assert texts["base_ar"].strip() and texts["base_jacobi"] == texts["base_ar"]
        assert "same text as base_ar" in lanes.nth(1).inner_text()
        page.locator("#jl-extras").screenshot(path=SHOTS / "extras.png")
    finally:
        set_slider(page, "jl-branches", 0)


def test_html_in_a_prompt_shows_as_text(page):
    race(page, XSS, 8)
    echo = page.locator("#jl-board .jl-prompt-echo")
    assert XSS in echo.inner_text()
    assert page.locator("#jl-board img").count() == 0 and page.locator("#jl-replay img").count() == 0
    assert page.dialogs == []


def test_empty_prompt_shows_a_message(page):
    page.locator("#jl-prompt textarea").fill("")
    page.locator("#jl-race").click()
    page.get_by_text("the prompt is empty").first.wait_for(timeout=30_000)
    page.screenshot(path=SHOTS / "empty-prompt.png")


def test_stop_cancels_and_the_app_is_ready_again(page):
    race(page, "Write a long story about a dragon who learns to cook.", 400, wait=False)
    page.wait_for_selector("#jl-board .jl-lane[data-status=running] .jl-tok", timeout=60_000)
    page.locator("#jl-stop").click()
    page.wait_for_selector("#jl-board .jl-lane[data-status=stopped]", timeout=30_000)
    expect(page.locator("#jl-status")).to_contain_text("Stopped", timeout=10_000)
    race(page, "Say hi.", 8)
    assert page.locator("#jl-board .jl-lane[data-status=done]").count() == 3


def test_stop_while_queued_drops_only_that_tabs_race(page):
    """Two tabs (two sessions): the second tab's race waits behind the first's; its Stop drops it without touching
    the first tab's race, which the first tab then stops; both tabs race again."""
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(shared_app().url, wait_until="domcontentloaded")
    other.wait_for_selector("#jl-race", timeout=60_000)
    try:
        race(page, "Write a long story about a dragon who learns to cook.", 400, wait=False)
        page.wait_for_selector("#jl-board .jl-lane[data-status=running] .jl-tok", timeout=60_000)
        race(other, "Say hi.", 8, wait=False)  # queued: one race at a time
        other.locator("#jl-stop").click()
        expect(other.locator("#jl-status")).to_contain_text("Stopped", timeout=10_000)
        page.wait_for_timeout(1500)
        assert page.locator("#jl-board .jl-lane[data-status=stopped]").count() == 0  # the first tab's race runs on
        page.locator("#jl-stop").click()
        page.wait_for_selector("#jl-board .jl-lane[data-status=stopped]", timeout=30_000)
        # the second tab's race left the queue and ended before its first lane
        other.wait_for_function(
            "() => { const e = document.querySelector('#jl-board .jl-prompt-echo');"
            " const l = document.querySelectorAll('#jl-board .jl-lane');"
            " return e !== null && e.textContent.includes('Say hi.') && l.length === 3"
            " && [...l].every(x => x.dataset.status === 'waiting'); }", timeout=30_000)
        expect(other.locator("#jl-status")).to_contain_text("Stopped")
        race(other, "Say hello.", 8)
        race(page, "Say hi.", 8)
        assert other.locator("#jl-board .jl-lane[data-status=done]").count() == 3
    finally:
        other.close()


def test_about_tab(page):
    """The About tab explains, draws a step and shows one headline row per result the page lists."""
    from app import about

    page.get_by_role("tab", name="About").click()
    page.get_by_text("What you are looking at").wait_for(timeout=10_000)
    assert page.get_by_text("3 tokens gained in this forward").count() == 1
    expect(page.locator("#jl-headline tbody tr")).to_have_count(len(about.HEADLINE))
    assert page.get_by_text(about.RESULTS_INDEX).count() >= 1
    page.screenshot(path=SHOTS / "about.png", full_page=True)


def test_about_tab_fits_a_phone(page):
    """At 420 px no part of the About tab reaches past the screen's edge (tables wrap; long commands fold)."""
    phone = page.context.browser.new_page(viewport={"width": 420, "height": 900})
    try:
        phone.goto(page.url, wait_until="domcontentloaded")
        phone.get_by_role("tab", name="About").click()
        phone.locator("#jl-headline tbody tr").first.wait_for(timeout=30_000)
        shown, wider = phone.evaluate(
            "() => { const shown = [...document.querySelectorAll('[role=tabpanel] *')].filter(e => e.offsetParent !== null);"
            " return [shown.length, shown.filter(e => e.getBoundingClientRect().right > window.innerWidth + 1"
            " && !e.closest('.jl-window')).map(e => e.tagName + '.' + e.className)]; }")
        assert shown > 50 and wider == []  # the step table (.jl-window) scrolls inside its own box
        phone.screenshot(path=SHOTS / "about_phone.png", full_page=True)
    finally:
        phone.close()
