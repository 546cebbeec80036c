"""The web console in a real browser: Debian's Chromium driven by Playwright (no browser download),
against the shared server with the tiny models. Each test saves a screenshot when it fails."""

from __future__ import annotations

import os
import shutil
import sys
import time

import httpx
import pytest
from conftest import ADMIN_KEY

from sdserve.testing import scaled

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No network of its own, no first-run work: the browser talks to the test server only.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]


def _required() -> bool:
    return os.environ.get("SDSERVE_REQUIRE_CHROMIUM") == "1"


@pytest.fixture(scope="module")
def browser():
    """Chromium; `.ci/run` installs it (and sets SDSERVE_REQUIRE_CHROMIUM), so CI never skips."""
    try:
        import axe_playwright_python  # noqa: F401 - the accessibility checker, used in the tests
        from playwright.sync_api import sync_playwright
    except ImportError:
        if _required():
            pytest.fail("playwright and axe-playwright-python (the dev extra) are not installed")
        pytest.skip("playwright and axe-playwright-python (the dev extra) are not installed")
    if not os.path.exists(CHROMIUM):
        if _required():
            pytest.fail("chromium is required (SDSERVE_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request, tmp_path_factory, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(scaled(30) * 1000)
    errors: list[str] = []
    fetched: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: fetched.append(req.url))
    page.on("dialog", lambda dialog: dialog.accept())  # the console confirms deletions
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        folder = tmp_path_factory.getbasetemp() / "screenshots"
        folder.mkdir(exist_ok=True)
        path = folder / f"{request.node.name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failure: {path}", file=sys.stderr)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    # Offline: everything the console loads comes from the server itself (no CDN, no fonts).
    elsewhere = [url for url in fetched if not url.startswith((server.url, "data:", "blob:"))]
    assert not elsewhere, elsewhere


def admin_api(server, method: str, path: str, **kwargs) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs).json()


def sign_in(page, server, key: str) -> None:
    """By keyboard: the key field has the focus, Enter submits."""
    page.goto(server.url + "/")
    page.wait_for_selector("#sign-in-key:focus")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#sign-out:visible")


def unlabelled_controls(page) -> list[str]:
    """Form controls and buttons on the page with no accessible name (a label, aria-label or
    text): what a screen reader could not announce."""
    return page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, canvas[tabindex]')]
            .filter((e) => e.offsetParent !== null && e.type !== 'hidden')
            .filter((e) => !((e.labels && e.labels.length) || e.getAttribute('aria-label')
                              || e.getAttribute('aria-labelledby') || e.textContent.trim()))
            .map((e) => e.outerHTML.slice(0, 120))"""
    )


def small(page, steps: int = 2) -> None:
    page.fill("#f-width", "64")
    page.fill("#f-height", "64")
    page.fill("#f-num_inference_steps", str(steps))


def axe_violations(page) -> list[str]:
    """axe-core's accessibility rules (WCAG 2 A and AA, and its best practices), run in the page:
    the wheel `axe-playwright-python` ships the checker, nothing is fetched."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [
        f"{v['id']} ({v['impact']}): {[node['html'][:80] for node in v['nodes'][:3]]}"
        for v in results.response["violations"]
    ]


def generate(page) -> None:
    page.click("#generate")


def progress_until_done(page, card: str) -> list[int]:
    """The progress bar's values, read as often as the browser answers, until the card is done."""
    values = []
    deadline = time.time() + scaled(120)
    bar = page.locator(f"{card} [role=progressbar]")
    while time.time() < deadline:
        value = bar.get_attribute("aria-valuenow")
        if value is not None and (not values or values[-1] != int(value)):
            values.append(int(value))
        if page.locator(f"{card} .pill.success, {card} .pill.failed").count():
            value = int(bar.get_attribute("aria-valuenow") or 0)  # the pill may show first
            if values[-1:] != [value]:
                values.append(value)
            break
        time.sleep(0.03)
    return values


def test_playground_generates_chains_into_img2img_and_inpaints(page, server):
    key = admin_api(server, "POST", "/api/v1/admin/keys", json={"label": "browser"})["key"]
    sign_in(page, server, key)
    assert page.locator("[data-page=queue]").is_hidden()  # admin pages stay hidden to a key
    page.wait_for_selector("form[aria-label='text2img request']")
    assert unlabelled_controls(page) == []
    assert axe_violations(page) == []

    # text2img: the form comes from the OpenAPI schema; the request is shown as it is filled in
    page.fill("#f-prompt", "a red fox")
    page.fill("#f-width", "64")
    page.fill("#f-height", "64")
    # 50 steps: long enough (about a second) for the event stream's 0.3 s polls to see a step
    page.fill("#f-num_inference_steps", "50")
    assert '"num_inference_steps": 50' in page.inner_text("#request-json")
    assert "curl -X POST" in page.inner_text("#request-curl")
    generate(page)
    page.wait_for_selector(".job-card")
    values = progress_until_done(page, ".job-card")
    assert values[-1] == 100, values
    assert any(0 < v < 100 for v in values), f"the bar never moved between 0 and 100: {values}"
    image = page.locator(".job-card .gallery img")
    image.wait_for()
    page.wait_for_function("document.querySelector('.job-card .gallery img').naturalWidth > 0")
    assert image.evaluate("img => img.naturalWidth") == 64
    first_output = image.get_attribute("src")

    # "Use as input": the output feeds img2img
    page.select_option(".job-card .gallery select", "img2img")
    page.wait_for_selector("form[aria-label='img2img request']")
    assert page.input_value("#f-init_image") == first_output
    page.fill("#f-prompt", "a red fox, painted")
    small(page)
    page.fill("#f-strength", "0.6")
    generate(page)
    page.wait_for_selector(".job-card .pill.success")
    img2img_output = page.get_attribute(".job-card .gallery img", "src")
    assert img2img_output != first_output

    # ...and then inpaint, with a mask drawn on the canvas
    page.select_option(".job-card .gallery select", "inpaint")
    page.wait_for_selector("form[aria-label='inpaint request']")
    assert page.input_value("#f-init_image") == img2img_output
    page.wait_for_function(
        "document.querySelector('#f-mask_image').width"
        " === document.querySelector('.drop img.preview').naturalWidth"
    )
    page.locator("#f-mask_image").scroll_into_view_if_needed()
    box = page.locator("#f-mask_image").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    assert '"mask_image": "data:image/png;base64,' in page.inner_text("#request-json")
    page.fill("#f-prompt", "a fox in the snow")
    small(page)
    generate(page)
    page.wait_for_selector(".job-card .pill.success")
    page.wait_for_selector(".job-card .gallery img")

    # My jobs: the three, newest first; a job's details show where its time went
    page.click("nav >> text=My jobs")
    page.wait_for_selector("#jobs-table tbody tr[data-job]")
    kinds = page.locator("#jobs-table tbody tr td:nth-child(2)").all_inner_texts()
    assert kinds == ["inpaint", "img2img", "text2img"]
    page.select_option("#filter-kind", "img2img")
    page.wait_for_function(
        "document.querySelectorAll('#jobs-table tbody tr[data-job]').length === 1"
    )
    page.click("#jobs-table tbody tr[data-job]")
    page.wait_for_selector("#job-detail h2")
    detail = page.inner_text("#job-detail")
    assert "Timings by stage" in detail and "denoise" in detail and "a red fox, painted" in detail
    assert unlabelled_controls(page) == []
    assert axe_violations(page) == []


def test_text2video_plays_in_the_player(page, server, user_key):
    page.goto(server.url + "/")
    page.wait_for_selector("#sign-in-key:focus")
    assert axe_violations(page) == []  # the sign-in page
    sign_in(page, server, user_key)
    page.click(".tabs >> text=text2video")
    page.wait_for_selector("form[aria-label='text2video request']")
    page.fill("#f-prompt", "waves")
    page.fill("#f-width", "64")
    page.fill("#f-height", "64")
    page.fill("#f-num_inference_steps", "2")
    page.fill("#f-num_frames", "8")
    generate(page)
    page.wait_for_selector(".job-card video", timeout=scaled(120) * 1000)
    duration = page.evaluate(
        """() => new Promise((done) => {
            const video = document.querySelector('.job-card video');
            if (video.readyState >= 1) return done(video.duration);
            video.addEventListener('loadedmetadata', () => done(video.duration));
            video.addEventListener('error', () => done(-1));
        })"""
    )
    assert duration > 0


def test_admin_cancels_a_queued_job_and_revokes_a_key(page, server, user_key):
    sign_in(page, server, ADMIN_KEY)
    page.wait_for_selector("[data-page=queue]:visible")  # the admin pages open to the admin key

    # Administration: a key is created (shown once), then revoked, and loses access.
    page.click("nav >> text=Administration")
    page.fill("#key-label", "to revoke")
    page.click("#admin-keys button[type=submit]")
    new_key = page.inner_text("#new-key")
    me = httpx.get(f"{server.url}/api/v1/me", params={"key": new_key}, timeout=30).json()
    assert me["status"] == "success"
    page.click(f"#keys-table [data-revoke='{new_key[:8]}']")
    page.wait_for_selector(f"#keys-table [data-revoke='{new_key[:8]}']", state="detached")
    lost = httpx.get(f"{server.url}/api/v1/me", params={"key": new_key}, timeout=30).json()
    assert lost["message"] == "Invalid Api Key"
    assert unlabelled_controls(page) == []
    assert axe_violations(page) == []

    # Queue and workers: with the worker drained, a job waits; the admin cancels it.
    page.click("nav >> text=Queue and workers")
    page.wait_for_selector("#workers-table tbody tr")
    page.click("#workers-table >> text=Drain")
    page.wait_for_selector("#workers-table .pill.draining", timeout=scaled(30) * 1000)
    try:
        body = {"key": user_key, "prompt": "a queued fox", "width": 64, "height": 64}
        job = server.post("/api/v6/images/text2img", {**body, "instant_response": True}).json()
        row = page.locator(f"#queue-table tr[data-job='{job['id']}']")
        row.wait_for()
        assert "queued" in row.inner_text()
        row.locator("text=Cancel").click()
        row.wait_for(state="detached")
    finally:
        page.click("#workers-table >> text=Resume")
        page.wait_for_selector("#workers-table .pill.draining", state="detached")
    fetched = server.post(f"/api/v3/fetch/{job['id']}", {"key": user_key}).json()
    assert fetched["status"] == "failed" and "Cancelled" in fetched["message"]
    assert page.locator(".chart polyline").count() == 2  # images/s and queue depth
    assert axe_violations(page) == []


def test_without_the_event_stream_the_console_polls(page, server, user_key):
    """A proxy that does not pass the stream: the console falls back to polling the job."""
    page.route("**/api/v1/jobs/events*", lambda route: route.abort())
    sign_in(page, server, user_key)
    page.wait_for_selector("#generate")
    page.fill("#f-prompt", "a fox, polled")
    small(page)
    generate(page)
    page.wait_for_selector(".job-card .pill.success")
    page.wait_for_selector(".job-card .gallery img")
    assert page.inner_text("#stream-state") == "polling"
