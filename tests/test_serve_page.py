"""The service's page in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

Submits the form (a merge, a dry run, a bad recipe), watches the job list update itself, opens the finished job.
Screenshots go to the test's tmp folder; with `HF_MUDSC_SCREENSHOTS=docs/images` they are also copied there
(how docs/images/serve_jobs.png and serve_job.png were made). Chromium is a system package: `.ci/run` installs it.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_service import Service, files_containing
from test_cli import save_parents_and_data

SECRET = "hf_pageSecretTokenThatMustNeverLeak77"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,900")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("page_inputs"))


@pytest.fixture()
def browser(tmp_path):
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver: webdriver.Chrome, folder: Path, name: str) -> Path:
    """A full-page PNG (DevTools' captureBeyondViewport), copied to $HF_MUDSC_SCREENSHOTS if set."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    data = base64.b64decode(shot["data"])
    path = folder / name
    path.write_bytes(data)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{name} is not a real screenshot"
    if os.environ.get("HF_MUDSC_SCREENSHOTS"):
        target = Path(os.environ["HF_MUDSC_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def status_of(driver: webdriver.Chrome, job_id: str) -> str | None:
    """Read in one script: the list's rows are replaced every 2 s, so an element found earlier goes stale."""
    return driver.execute_script(
        "const row = document.getElementById(arguments[0]); return row ? row.dataset.status : null", f"job-{job_id}")


def row_of(driver: webdriver.Chrome, job_id: str) -> tuple[str, dict[str, str]]:
    """A row's text and its links (text -> href), read atomically."""
    return tuple(driver.execute_script(
        "const row = document.getElementById(arguments[0]);"
        "const links = {}; for (const a of row.querySelectorAll('a')) links[a.textContent.trim()] = a.href;"
        "return [row.innerText, links];", f"job-{job_id}"))


def submit(driver: webdriver.Chrome, recipe: str, *, dry_run: bool = False) -> str:
    """Type `recipe` into the form, press Merge (or Dry run) and return the page's message."""
    area = driver.find_element(By.ID, "recipe")
    area.clear()
    area.send_keys(recipe)
    driver.execute_script("document.getElementById('message').textContent = ''")
    driver.find_element(By.ID, "dry-run-button" if dry_run else "merge-button").click()
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.ID, "message").text.strip())
    return driver.find_element(By.ID, "message").text


def test_the_page_submits_a_merge_and_shows_the_finished_job(hub_emulator, inputs, browser, tmp_path):
    a, b, _ = inputs
    hub_emulator.upload_folder("user/vit-digits-a", a, "parent A")
    hub_emulator.upload_folder("user/vit-digits-b", b, "parent B")
    with Service(hub_emulator, tmp_path / "state", tmp_path / "server.log") as service:
        browser.get(service.url + "/")
        assert "No jobs yet" in browser.find_element(By.ID, "jobs").text

        message = submit(browser, "models: [user/vit-digits-a, user/vit-digits-b]\nalpah: 0.3\noutput: x\n")
        assert "unknown key(s) ['alpah']" in message  # the 400's error, shown next to the buttons

        browser.find_element(By.ID, "token").send_keys(SECRET)
        message = submit(browser, "models:\n  - user/vit-digits-a\n  - user/vit-digits-b\nmethod: weight_matching\n"
                                  "push_to_hub: user/merged-digits\noutput: merged-digits\n")
        assert message.startswith("Job ") and message.endswith(" queued."), message
        merge_id = message.split()[1]
        message = submit(browser, "models: [user/vit-digits-a, user/vit-digits-b]\nmethod: average\n", dry_run=True)
        assert message.startswith("Dry run ") and message.endswith(" queued."), message
        dry_id = message.split()[2]

        # The list refreshes itself (no reload): both rows reach `succeeded`.
        WebDriverWait(browser, 240, poll_frequency=0.5).until(
            lambda d: status_of(d, merge_id) == "succeeded" and status_of(d, dry_id) == "succeeded")
        text, links = row_of(browser, merge_id)
        assert links["repo"] == f"{hub_emulator.endpoint}/user/merged-digits"
        assert links["card"] == f"{service.url}/jobs/{merge_id}/files/README.md"
        assert "100%" in text and "user/merged-digits" in text
        assert "dry run" in row_of(browser, dry_id)[0]
        screenshot(browser, tmp_path, "serve_jobs.png")

        assert links[merge_id] == f"{service.url}/jobs/{merge_id}"
        browser.get(links[merge_id])  # the job's own page (following the row's link)
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "log"))
        text = browser.find_element(By.TAG_NAME, "main").text
        assert "user/merged-digits" in text and hub_emulator.head("user/merged-digits")[:12] in text
        assert "README.md" in text and "method: weight_matching" in text and "pushed" in text
        screenshot(browser, tmp_path, "serve_job.png")
        assert SECRET not in browser.page_source

        browser.get(links["card"])
        assert "user/merged-digits" in browser.find_element(By.TAG_NAME, "body").text
    assert not files_containing(tmp_path / "state", SECRET) and SECRET not in service.log.read_text()
