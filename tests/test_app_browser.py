"""A real browser: Debian's headless Chromium driven by Playwright (no browser download) against the running app.

Screenshots go to screenshots/ (git-ignored) for a person to look at.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from app_fixtures import XSS, shared_app

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
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


def race(page, prompt: str, max_new: int, example: str | None = None, wait: bool = True, rounds: int = 1) -> None:
    """Start a race (typing the prompt, or clicking the example that holds it) and wait until its lanes are done
    and every view shows it (the replay area names its prompt once the views are drawn)."""
    if example:
        page.get_by_text(example, exact=True).click()
        expect(page.locator("#jl-prompt textarea")).to_have_value(prompt)
    else:
        page.locator("#jl-prompt textarea").fill(prompt)
    set_slider(page, "jl-max-new", max_new)
    set_slider(page, "jl-rounds", rounds)
    page.locator("#jl-race").click()
    if wait:  # this race's board, not the last one's: it echoes this prompt
        page.wait_for_function(
            "(p) => { const e = document.querySelector('#jl-board .jl-prompt-echo');"
            " const l = document.querySelectorAll('#jl-board .jl-lane');"
            " const r = document.querySelector('#jl-replay');"
            " return e !== null && e.textContent.includes(p) && l.length > 0 && [...l].every(x => x.dataset.status === 'done')"
            " && r !== null && r.textContent.includes(p.slice(0, 30)); }",
            arg=prompt, timeout=240_000)


def visible_text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_the_page_opens_on_the_recorded_race(page):
    """Before any model runs: the recorded example race, labelled with its device, in every view."""
    board = page.locator("#jl-board")
    expect(board.locator(".jl-recorded")).to_contain_text("Recorded example, not run now")
    assert board.locator(".jl-lane").count() == 4
    expect(page.locator("#jl-status")).to_contain_text("Recorded example race")
    for chart in ("jl-time", "jl-speed", "jl-accept", "jl-conv"):
        page.wait_for_selector(f"#{chart} .js-plotly-plot", timeout=60_000)
    page.wait_for_selector("#jl-step table.jl-window", timeout=60_000)
    assert page.locator("#jl-download-json").is_enabled() and page.locator("#jl-share a").count() == 1


def test_example_race_shows_lanes_charts_and_steps(page):
    race(page, "Count from 1 to 10, separated by commas.", 40, example="Maths · count to ten")
    lanes = page.locator("#jl-board .jl-lane")
    assert lanes.count() == 4
    texts = {lanes.nth(i).get_attribute("data-lane"): lanes.nth(i).locator(".jl-text").inner_text() for i in range(4)}
    assert texts["base_ar"].strip() and texts["base_jacobi"] == texts["base_ar"] and texts["cllm_jacobi"] == texts["cllm_ar"]
    # each Jacobi lane is measured against its own model's AR, named as the page names it, never by a key
    assert "Same text as AR · base model" in lanes.nth(1).inner_text()
    assert "Same text as AR · CLLM" in lanes.nth(3).inner_text()
    shown = visible_text(page, "#jl-board") + visible_text(page, "#jl-status")
    assert not any(key in shown for key in ("base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi"))
    # special tokens are not text: the answer ends at the model's end token, which is not printed
    assert "im_end" not in visible_text(page, "#jl-board")
    assert "the model ended its answer" in lanes.nth(0).text_content()  # (in its folded numbers)
    assert page.locator("#jl-board .jl-tok").count() > 5
    for chart in ("jl-time", "jl-speed", "jl-accept", "jl-conv"):
        page.wait_for_selector(f"#{chart} .js-plotly-plot", timeout=60_000)
    page.wait_for_selector("#jl-step table.jl-window", timeout=60_000)
    page.locator("#jl-replay-btn").click()
    page.wait_for_selector("#jl-replay .jl-lane .jl-rp", timeout=30_000)
    page.wait_for_timeout(1500)
    assert "im_end" not in visible_text(page, "#jl-replay")
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
        assert "Same text as AR · base model" in lanes.nth(1).inner_text()
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
    assert page.locator("#jl-board .jl-lane[data-status=done]").count() == 4


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
            " return e !== null && e.textContent.includes('Say hi.') && l.length === 4"
            " && [...l].every(x => x.dataset.status === 'waiting'); }", timeout=30_000)
        expect(other.locator("#jl-status")).to_contain_text("Stopped")
        race(other, "Say hello.", 8)
        race(page, "Say hi.", 8)
        assert other.locator("#jl-board .jl-lane[data-status=done]").count() == 4
    finally:
        other.close()


VIEWS_EMPTY = """() => {
  const text = (s) => (document.querySelector(s) || {}).textContent || '';
  return {board: text('#jl-board'), replay: text('#jl-replay'), step: text('#jl-step'), pick: text('#jl-lane-pick'),
          charts: ['#jl-time', '#jl-speed', '#jl-accept', '#jl-conv'].map(text)};
}"""


def test_every_view_shows_the_latest_race(page):
    """Two races, then a refused one: after each, the board, replay, charts, map, step view and lane picker show that
    race (or say they are empty), never the one before."""
    race(page, "Write a haiku about the sea.", 12, rounds=2)
    race(page, "Name a colour.", 10)
    page.locator("#jl-lanes").get_by_text("Jacobi · base model").click()  # untick it: the second race's lanes differ
    try:
        race(page, "Say hello in French.", 8)
        views = page.evaluate(VIEWS_EMPTY)
        assert "Say hello in French." in views["replay"] and "Name a colour" not in views["board"]
        assert page.locator("#jl-board .jl-lane").count() == 3
        assert "Jacobi · CLLM" in views["charts"][3] and "Jacobi · base model" not in views["charts"][3]
        assert "Jacobi · base model" not in views["charts"][0] and "Pass 1 of" in views["step"]
        page.locator("#jl-replay-btn").click()
        page.wait_for_selector("#jl-replay .jl-lane .jl-rp", timeout=30_000)
        assert page.locator("#jl-replay .jl-lane").count() == 3
    finally:
        page.locator("#jl-lanes").get_by_text("Jacobi · base model").click()
    page.locator("#jl-prompt textarea").fill("")
    page.locator("#jl-race").click()
    page.wait_for_function("() => document.querySelector('#jl-board').textContent.includes('No race')", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#jl-replay').textContent.includes('Finish a race first')",
                           timeout=60_000)
    views = page.evaluate(VIEWS_EMPTY)
    assert "the prompt is empty" in views["board"] and "Run a race with a Jacobi lane" in views["step"]
    assert all("Run a race" in c for c in views["charts"])
    assert not page.locator("#jl-download-json").is_enabled()


OVERFLOW = """() => {
  const vw = document.documentElement.clientWidth, bad = [];
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();
    if (!r.width || !r.height || e.closest('#js-plotly-tester') || (r.right <= vw + 1 && r.left >= -1)) continue;
    let a = e.parentElement;  // inside a box that scrolls sideways (a wide table), and that box fits: fine
    for (; a; a = a.parentElement) {
      const s = getComputedStyle(a), ar = a.getBoundingClientRect();
      if (['auto', 'scroll', 'hidden', 'clip'].includes(s.overflowX) && ar.right <= vw + 1 && ar.left >= -1) break;
    }
    if (!a) bad.push(`${e.tagName}#${e.id}.${e.getAttribute('class')} ${Math.round(r.left)}..${Math.round(r.right)}`);
  }
  return {scroll: document.documentElement.scrollWidth, width: vw, bad: bad.slice(0, 20)};
}"""
CHART_PARTS = """(id) => {
  const root = document.querySelector(id), box = (s) => { const e = root.querySelector(s); return e && e.getBoundingClientRect(); };
  const svg = root.querySelector('.main-svg').getBoundingClientRect();
  return {svg: [svg.left, svg.top, svg.right, svg.bottom], title: box('.gtitle'), legend: box('.legend'),
          x: box('.xtitle'), y: box('.ytitle')};
}"""


def overlap(a, b) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def test_a_phone_sized_page_is_usable(page):
    """At 420 px: nothing wider than the screen, no legend over a chart title, axis titles inside their chart, the step
    table scrolling sideways rather than clipped; the About tab too. Screenshots go to screenshots/."""
    race(page, "Write a haiku about the sea.", 16)  # every view drawn, the step table too
    page.set_viewport_size({"width": 420, "height": 900})
    try:
        page.wait_for_timeout(1500)  # the charts redraw at the new width
        found = page.evaluate(OVERFLOW)
        assert found["scroll"] <= found["width"] and found["bad"] == [], found
        for chart in ("#jl-time", "#jl-speed", "#jl-accept", "#jl-conv"):
            parts = page.evaluate(CHART_PARTS, chart)
            left, top, right, bottom = parts["svg"]
            if parts["legend"] and parts["title"]:
                assert not overlap(parts["legend"], parts["title"]), chart
            for axis in ("x", "y"):
                if parts[axis] and parts[axis]["width"]:
                    assert left - 1 <= parts[axis]["left"] and parts[axis]["right"] <= right + 1, (chart, axis)
                    assert top - 1 <= parts[axis]["top"] and parts[axis]["bottom"] <= bottom + 1, (chart, axis)
        table = page.locator("#jl-step table.jl-window")
        assert table.evaluate("t => t.scrollWidth <= t.clientWidth || getComputedStyle(t).overflowX === 'auto'")
        page.screenshot(path=SHOTS / "phone.png", full_page=True)
        page.get_by_role("tab", name="About").click()
        page.wait_for_timeout(1000)
        found = page.evaluate(OVERFLOW)
        assert found["scroll"] <= found["width"] and found["bad"] == [], found
        page.screenshot(path=SHOTS / "phone-about.png", full_page=True)
    finally:
        page.get_by_role("tab", name="Race").click()
        page.set_viewport_size({"width": 1400, "height": 1000})


def test_download_and_shared_link(page, tmp_path):
    """The race downloads as JSON (its traces and numbers) and its charts as one offline HTML page; the shared link
    opens a page with the race's prompt and settings."""
    race(page, "Name a fruit.", 8)
    with page.expect_download() as got:
        page.locator("#jl-download-json").click()
    data = json.loads(Path(got.value.path()).read_text(encoding="utf-8"))
    assert data["prompt"] == "Name a fruit." and data["lanes"]["cllm_jacobi"]["reference"] == "cllm_ar"
    assert data["lanes"]["base_jacobi"]["trace"]["iterations"]
    with page.expect_download() as got:
        page.locator("#jl-download-html").click()
    html = Path(got.value.path()).read_text(encoding="utf-8")
    assert "Name a fruit." in html and "<script src" not in html and html.count("Plotly.newPlot") >= 4
    href = page.locator("#jl-share a").get_attribute("href")
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        other.goto(shared_app().url + href, wait_until="domcontentloaded")
        expect(other.locator("#jl-prompt textarea")).to_have_value("Name a fruit.", timeout=60_000)
        expect(other.locator("#jl-max-new input[type=number]")).to_have_value("8")
        expect(other.locator("#jl-rounds input[type=number]")).to_have_value("1")
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
