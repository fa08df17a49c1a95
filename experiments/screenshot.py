"""The README's screenshot of the Race tab: a short race on the running app, then the race view as a small PNG.

Starts ``python app.py`` (the embedded model and the shipped CLLM, CPU) unless ``--url`` names a running app, drives
Debian's headless Chromium through Playwright, runs one race and saves the view from the verdict down to the charts:

    python -m experiments.screenshot --out docs/images/race.png
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from experiments.serve import free_port, start_app

PROMPT = "Count from 1 to 10, separated by commas."  # short, and the CLLM fast-forwards much of it
# the same flags the browser tests give Debian's Chromium (no sandbox in containers, nothing fetched)
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# a race is done when the board echoes its prompt, every lane is done, and the replay area names it too
DONE_JS = ("(p) => { const e = document.querySelector('#jl-board .jl-prompt-echo');"
           " const l = document.querySelectorAll('#jl-board .jl-lane');"
           " const r = document.querySelector('#jl-replay');"
           " return e !== null && e.textContent.includes(p) && l.length > 0"
           " && [...l].every(x => x.dataset.status === 'done')"
           " && r !== null && r.textContent.includes(p.slice(0, 30)); }")


def set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def page_y(page, selector: str, edge: str) -> float:
    """The top or bottom of an element in page coordinates (a bounding box is in the scrolled viewport's)."""
    return page.evaluate(f"(s) => document.querySelector(s).getBoundingClientRect().{edge} + window.scrollY", selector)


def capture(url: str, args) -> bytes:
    """Run one race in the page at ``url`` and return a PNG of the race view: the verdict, the lanes, the replay and the
    first charts."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#jl-race", timeout=120_000)
        page.locator("#jl-prompt textarea").fill(args.prompt)
        set_slider(page, "jl-max-new", args.max_new_tokens)
        set_slider(page, "jl-rounds", args.rounds)
        page.locator("#jl-race").click()
        page.wait_for_function(DONE_JS, arg=args.prompt, timeout=600_000)
        for chart in ("jl-time", "jl-speed"):
            page.wait_for_selector(f"#{chart} .js-plotly-plot", timeout=60_000)
        page.wait_for_timeout(1500)  # let the charts finish drawing
        top = page_y(page, "#jl-status", "top") - 12
        bottom = max(page_y(page, f"#{c}", "bottom") for c in ("jl-time", "jl-speed")) + 12
        shot = page.screenshot(full_page=True, clip={"x": 0, "y": top, "width": args.width, "height": bottom - top})
        browser.close()
    return shot


def shrink(png: bytes, max_height: int) -> bytes:
    """Scale to at most ``max_height`` pixels high and keep 256 colours: a small file that reads the same."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.height > max_height:
        img = img.resize((round(img.width * max_height / img.height), max_height), Image.LANCZOS)
    out = io.BytesIO()
    img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running app (default: start python app.py on a free port)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1, help="timed runs per lane")
    ap.add_argument("--width", type=int, default=1280, help="page width in CSS pixels")
    ap.add_argument("--max-height", type=int, default=800, help="the image is scaled down to at most this height")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--out", default="docs/images/race.png")
    args = ap.parse_args(argv)
    port = None if args.url else free_port()
    proc = None if args.url else start_app(port)
    try:
        url = args.url or f"http://127.0.0.1:{port}/"
        png = shrink(capture(url, args), args.max_height)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(png)
    print(f"wrote {args.out} ({len(png) // 1024} KB)")


if __name__ == "__main__":
    main()
