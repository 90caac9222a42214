"""Drive the demo in headless Chromium: the screenshot in assets/ and the browser test (tests/test_browser.py).

    python demo/screenshot.py --out assets/demo_screenshot.png [PIPELINE_DIR]

starts the app in-process on 127.0.0.1, opens it in Debian's Chromium (apt-get install chromium) through
Playwright for Python (no `playwright install`: the system browser is used), picks eight images, the
hallucination filter and the teacher comparison, clicks Generate, waits for the images and saves a PNG of the page.
Every request the page makes to anything but the local server is blocked and reported.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from contextlib import contextmanager
from urllib.parse import urlparse

import app as demo_app

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def serve(pipeline_dir=None, **create_kwargs):
    """The app on a free local port, in this process; yields (url, Demo)."""
    demo = demo_app.Demo(pipeline_dir)
    blocks = demo_app.create_demo(demo, **create_kwargs)
    _, url, _ = demo_app.launch(blocks, port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield url, demo
    finally:
        blocks.close()


@contextmanager
def open_page(chromium: str, viewport=(1280, 900)):
    """A page in a fresh Chromium profile; yields (page, blocked): the non-local URLs the page tried to reach."""
    from playwright.sync_api import sync_playwright

    blocked = []

    def only_local(route):
        if urlparse(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]})
        context.route("**/*", only_local)
        try:
            yield context.pages[0] if context.pages else context.new_page(), blocked
        finally:
            context.close()


def generate(page, url: str, class_label: str | None = None, num_images: int = 8, steps: int = 1,
             hal_filter: bool = False, compare_teacher: bool = False, timeout_ms: int = 60_000) -> str:
    """Load the app, set the controls as a user would, click Generate; return the latency line once the student
    gallery shows `num_images` images (and the teacher's, if asked)."""
    page.goto(url, timeout=timeout_ms)
    page.locator("#generate").wait_for(timeout=timeout_ms)
    if class_label is not None:
        page.locator("#class-label input").click()
        page.get_by_role("option", name=class_label, exact=True).click()
    _set_number(page, "#num-images", num_images)
    _set_number(page, "#steps", steps)
    if hal_filter:
        page.locator("#hal-filter input[type=checkbox]").check()
    if compare_teacher:
        page.locator("#compare-teacher input[type=checkbox]").check()
    page.locator("#generate").click()
    galleries = ["#student-gallery"] + (["#teacher-gallery"] if compare_teacher else [])
    for gallery in galleries:
        page.wait_for_function(f"document.querySelectorAll('{gallery} .grid-wrap img').length === {num_images}",
                               timeout=timeout_ms)
    page.wait_for_function("document.querySelector('#latency').innerText.includes('ms per image')",
                           timeout=timeout_ms)
    return page.locator("#latency").inner_text()


def _set_number(page, elem_id: str, value: int):
    box = page.locator(f"{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def image_sizes(page, gallery: str = "#student-gallery") -> list[tuple[int, int]]:
    """Natural (width, height) of the images the gallery shows, once they have loaded."""
    page.wait_for_function(f"[...document.querySelectorAll('{gallery} .grid-wrap img')].every(i => i.complete)")
    return [tuple(size) for size in page.eval_on_selector_all(
        f"{gallery} .grid-wrap img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Save a screenshot of the onestep demo (headless Chromium).")
    parser.add_argument("pipeline", nargs="?", help="exported pipeline folder (default: the demo's default)")
    parser.add_argument("--out", default="assets/demo_screenshot.png")
    parser.add_argument("--class-label", help="pick one class (default: all classes in turn)")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        sys.exit("no Chromium found: apt-get install -y chromium")
    with serve(args.pipeline) as (url, demo), open_page(chromium) as (page, blocked):
        label = args.class_label if demo.caps.num_classes else None
        latency = generate(page, url, label, num_images=8, hal_filter=True, compare_teacher=demo.caps.teacher)
        page.screenshot(path=args.out, full_page=True)
    print(f"wrote {args.out} ({latency}); outside requests blocked: {len(blocked)}")


if __name__ == "__main__":
    main()
