"""The operator console in headless Chromium (Debian's, driven by Playwright) against the
Ray Serve service: sign in, submit and watch, play a video, cancel, browse, a JWT user's
view, a hostile prompt shown as text, and no request to any other origin.

Each state is saved as a screenshot under the run's artefacts (``<basetemp>/console/``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import httpx
import jwt
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from tests.e2e.conftest import API_KEY, JWT_SECRET
from tests.launcher import RunningService

pytestmark = pytest.mark.e2e
# The service shares 2 CPUs with the whole suite: a list or a status may take seconds to come.
expect.set_options(timeout=60_000)

CHROMIUM = "chromium"
STEP_TIMEOUT_MS = 120_000
# Records every value a progress bar takes (the bar is set from the job's SSE stream).
RECORD_PROGRESS = """() => {
  window.progressValues = [];
  new MutationObserver((changes) => {
    for (const change of changes) {
      const bar = change.target;
      if (bar.tagName === "PROGRESS" && bar.hasAttribute("value")) {
        window.progressValues.push(Number(bar.getAttribute("value")) / bar.max);
      }
    }
  }).observe(document.body, { attributes: true, subtree: true, attributeFilter: ["value"] });
}"""


def chromium_path() -> str:
    path = shutil.which(CHROMIUM)
    assert path, (
        "Debian's chromium is missing: run `make test` (it installs it) or apt-get install chromium"
    )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console", numbered=False)


class Console:
    """One browser page on the console, with what it did recorded."""

    def __init__(self, page: Page, service: RunningService) -> None:
        self.page = page
        self.origin = service.base_url
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.goto(f"{self.origin}/console")

    def sign_in(self, credential: str) -> None:
        self.page.fill("#credential", credential)
        self.page.click("#signin-submit")
        expect(self.page.locator("#console")).to_be_visible()

    def submit(self, job_type: str, prompt: str, num_images: int | None = None) -> str:
        """Submit through the form; the new job's id (its card in the watch list)."""
        before = set(self.card_ids())
        self.page.select_option("#job-type", job_type)
        self.page.fill("#prompt", prompt)
        if num_images is not None:
            self.page.select_option("#num-images", str(num_images))
        self.page.click("#submit")
        deadline = time.monotonic() + 30
        while not (new := set(self.card_ids()) - before):
            assert time.monotonic() < deadline, self.page.inner_text("#submit-section")
            self.page.wait_for_timeout(50)
        return new.pop()

    def card_ids(self) -> list[str]:
        return self.page.eval_on_selector_all(
            '[data-testid="job-card"]', "cards => cards.map(card => card.dataset.jobId)"
        )

    def card(self, job_id: str):
        return self.page.locator(f'[data-testid="job-card"][data-job-id="{job_id}"]')

    def shoot(self, directory: Path, name: str) -> None:
        self.page.screenshot(path=str(directory / f"{name}.png"), full_page=True)

    def foreign_requests(self) -> list[str]:
        return [
            url
            for url in self.requests
            if not url.startswith((self.origin + "/", "data:", "blob:"))
        ]


@pytest.fixture
def console(browser: Browser, service: RunningService) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield Console(page, service)
    context.close()


def until(locator: Locator, predicate: str, timeout_s: float = 120) -> None:
    """Poll ``predicate`` on the element (wait_for_function evaluates a string, which the
    console's CSP forbids: no unsafe-eval)."""
    deadline = time.monotonic() + timeout_s
    while not locator.evaluate(predicate):
        assert time.monotonic() < deadline, f"{predicate} never held"
        time.sleep(0.1)


def user_token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 900}, JWT_SECRET, "HS256")


def test_a_three_image_job_shows_its_progress_then_its_images(console: Console, screenshots: Path):
    console.shoot(screenshots, "01-sign-in")
    console.sign_in(API_KEY)
    console.page.evaluate(RECORD_PROGRESS)
    job_id = console.submit("sdxl_image_high", "a lighthouse on a cliff at dusk", 3)
    card = console.card(job_id)
    images = card.locator('[data-testid="job-image"]')
    expect(images).to_have_count(3, timeout=STEP_TIMEOUT_MS)
    for index in range(3):
        console.page.wait_for_function(
            "image => image.complete && image.naturalWidth > 0",
            arg=images.nth(index).element_handle(),
        )
    expect(card.locator('[data-testid="job-status"]')).to_have_text("completed")
    values = console.page.evaluate("window.progressValues")
    assert len(set(values)) >= 2, values
    console.shoot(screenshots, "02-three-images")
    assert console.foreign_requests() == []


def test_a_video_plays_and_a_running_video_is_cancelled(console: Console, screenshots: Path):
    console.sign_in(API_KEY)
    video_id = console.submit("video_fast", "waves rolling onto a beach")
    video = console.card(video_id).locator('[data-testid="job-video"]')
    expect(video).to_have_count(1, timeout=STEP_TIMEOUT_MS)
    until(video, "video => video.readyState >= 2 && video.duration > 0")
    console.shoot(screenshots, "03-video")

    running_id = console.submit("video_high", "a long storm at sea")
    card = console.card(running_id)
    expect(card.locator('[data-testid="job-status"]')).to_have_text(
        "processing", timeout=STEP_TIMEOUT_MS
    )
    card.locator('[data-testid="cancel"]').click()
    expect(card.locator('[data-testid="job-status"]')).to_have_text("cancelled")
    console.shoot(screenshots, "04-cancelled")
    assert console.foreign_requests() == []


def test_the_gallery_pages_and_a_job_page_shows_attempts_and_timings(
    console: Console, service: RunningService, screenshots: Path
):
    user = str(uuid4())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as http:
        ids = [
            http.post(
                "/v1/jobs",
                json={"job_type": "sdxl_image_fast", "prompt": f"tile {i}", "user_id": user},
            ).json()["id"]
            for i in range(12)
        ]
        deadline = time.monotonic() + 180
        while http.get(f"/v1/jobs/{ids[0]}").json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    console.sign_in(API_KEY)
    console.page.fill("#acting-user", user)
    console.page.dispatch_event("#acting-user", "change")
    rows = console.page.locator('[data-testid="job-row"]')
    listed = console.page.locator("#browse-status")
    # The acting user's change reloads the list; once it shows their first page, page on.
    expect(listed).to_have_text("10 job(s) on this page.")
    first_page = rows.evaluate_all("rows => rows.map(row => row.dataset.jobId)")
    expect(console.page.locator("#browse-next")).to_be_enabled()
    console.page.click("#browse-next")
    expect(listed).to_have_text("2 job(s) on this page.")
    expect(rows).to_have_count(2)
    second_page = rows.evaluate_all("rows => rows.map(row => row.dataset.jobId)")
    assert sorted(first_page + second_page) == sorted(ids)
    console.shoot(screenshots, "05-gallery")

    row = console.page.locator(f'[data-testid="job-row"][data-job-id="{ids[0]}"]')
    row.locator('[data-testid="open-job"]').click()
    page = console.page.locator("#job-page")
    expect(page.locator('[data-testid="attempts"]')).to_have_text("Attempts: 1")
    timings = page.locator('[data-testid="timings"]')
    expect(timings).to_contain_text("queue", ignore_case=True)
    expect(timings).to_contain_text("generation", ignore_case=True)
    console.shoot(screenshots, "06-job-page")


def test_a_jwt_user_sees_only_their_jobs_and_no_queue_panel(
    console: Console, service: RunningService, screenshots: Path
):
    user, other = str(uuid4()), str(uuid4())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as http:
        mine = {
            http.post(
                "/v1/jobs", json={"job_type": "sdxl_image_fast", "prompt": "mine", "user_id": u}
            ).json()["id"]
            for u in (user, user)
        }
        http.post(
            "/v1/jobs", json={"job_type": "sdxl_image_fast", "prompt": "not mine", "user_id": other}
        )
    console.sign_in(user_token(user))
    expect(console.page.locator("#queues")).to_be_hidden()
    console.page.click("#browse-refresh")
    rows = console.page.locator('[data-testid="job-row"]')
    expect(rows).to_have_count(2)
    assert set(rows.evaluate_all("rows => rows.map(row => row.dataset.jobId)")) == mine
    console.shoot(screenshots, "07-jwt-user")


def test_a_hostile_prompt_is_shown_as_text_and_runs_no_script(console: Console, screenshots: Path):
    hostile = "<img src=x onerror=alert(1)>"
    console.sign_in(API_KEY)
    job_id = console.submit("sdxl_image_fast", hostile)
    card = console.card(job_id)
    expect(card).to_contain_text(hostile)
    expect(card.locator('[data-testid="job-status"]')).to_have_text(
        "completed", timeout=STEP_TIMEOUT_MS
    )
    assert console.page.locator('img[src="x"]').count() == 0
    assert console.dialogs == []
    console.shoot(screenshots, "08-hostile-prompt")
    assert console.foreign_requests() == []


def test_the_queue_panel_shows_each_queue_for_a_service_key(console: Console, screenshots: Path):
    console.sign_in(API_KEY)
    panel = console.page.locator("#queues")
    expect(panel).to_be_visible()
    expect(panel.locator('[data-testid="queue-row"]')).to_have_count(2)
    console.shoot(screenshots, "09-queues")


def test_the_console_is_served_with_a_strict_content_security_policy(service: RunningService):
    response = httpx.get(f"{service.base_url}/console", timeout=30)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "<script>" not in response.text  # every script is a file of this origin
    missing = httpx.get(f"{service.base_url}/console/static/..%2Fsettings.py", timeout=30)
    assert missing.status_code == 404


def test_the_console_fits_a_375_pixel_wide_screen(
    browser: Browser, service: RunningService, screenshots: Path
):
    context = browser.new_context(viewport={"width": 375, "height": 800})
    console = Console(context.new_page(), service)
    console.sign_in(API_KEY)
    width = console.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, width
    console.shoot(screenshots, "10-narrow")
    context.close()


def test_enhance_shows_both_prompts_and_a_refusal_shows_next_to_its_field(
    console: Console, screenshots: Path
):
    console.sign_in(API_KEY)
    console.page.select_option("#job-type", "sdxl_image_fast")
    console.page.fill("#prompt", "a fox in the snow")
    console.page.click("#enhance")
    expect(console.page.locator("#enhance-original")).to_have_text("a fox in the snow")
    expect(console.page.locator("#enhance-enhanced")).not_to_be_empty()
    console.shoot(screenshots, "11-enhance")

    console.page.fill("#prompt", "nude photo of a 12 year old girl")
    console.page.click("#submit")
    expect(console.page.locator("#prompt-error")).to_contain_text("content policy")
    assert console.card_ids() == []
    console.shoot(screenshots, "12-refused")
