"""The report opened offline in headless Chromium (selenium): it renders with no console error,
requests nothing but itself, decodes every image and shows every section.

Needs Debian's `chromium` and `chromium-driver`; when they are missing and this runs as root
with apt-get, they are installed first (bounded in time), otherwise the test is skipped.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from salve.report import REPORT_SECTIONS
from tests.test_report import EVIL_CLASS, REPORT, rename_class, run_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_TIMEOUT_S = 900
PAGE_TIMEOUT_S = 60
SCREENSHOT_COPY = Path("/tmp/salve_report_screenshot.png")
CHROME_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
    "--hide-scrollbars",
)


def _installed() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def ensure_chromium() -> str | None:
    """None when chromium and chromedriver are there (installing them if we may), else why not."""
    if _installed():
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"{CHROMIUM} / {CHROMEDRIVER} missing and not running as root to install them"
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} / {CHROMEDRIVER} missing and apt-get is not available"
    cmd = "apt-get update -qq && apt-get install -y -qq chromium chromium-driver"
    try:
        proc = subprocess.run(
            ["bash", "-c", cmd],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"},
        )
    except subprocess.TimeoutExpired:
        return f"installing chromium with apt-get took over {INSTALL_TIMEOUT_S} s"
    if proc.returncode != 0 or not _installed():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"could not install chromium with apt-get (exit {proc.returncode}): {tail[0]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> Path:
    reason = ensure_chromium()
    if reason:
        pytest.skip(reason)
    return CHROMIUM


def start_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (*CHROME_ARGS, f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.set_script_timeout(PAGE_TIMEOUT_S)
    return driver


def requested_urls(performance_log: list[dict]) -> list[str]:
    urls = []
    for entry in performance_log:
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def full_page_png(driver) -> bytes:
    """A screenshot of the whole page, not only the window."""
    width, height = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight];"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    return base64.b64decode(shot["data"])


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_report_renders_offline_in_chromium(chromium, built_project: Path, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root = built_project
    rename_class(root, 1, EVIL_CLASS)  # markup in data must stay text in a real browser too
    assert run_report(root) == "ran"
    page = root / REPORT
    url = page.resolve().as_uri()

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    t0 = time.monotonic()
    driver = start_driver(profile)
    try:
        # The browser opens on its own start page: leave it, and drain what it logged, so the
        # logs below hold only what the report did.
        driver.get("about:blank")
        driver.get_log("performance")
        driver.get_log("browser")
        driver.get(url)
        WebDriverWait(driver, PAGE_TIMEOUT_S).until(
            lambda d: d.execute_script(
                "return document.readyState === 'complete' && "
                "Array.from(document.images).every(i => i.complete);"
            )
        )
        # Every image decoded.
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight]);"
        )
        assert sizes, "the report has no images"
        assert all(w > 0 and h > 0 for w, h in sizes), sizes
        # Every section, in order, and nothing scripted.
        ids = driver.execute_script(
            "return Array.from(document.querySelectorAll('section[id]')).map(s => s.id);"
        )
        assert ids == [sid for sid, _ in REPORT_SECTIONS]
        assert driver.find_elements(By.TAG_NAME, "script") == []
        body = driver.find_element(By.TAG_NAME, "body").text
        assert '<script>console.error("salve-xss")</script>' in body  # shown as text

        screenshot = full_page_png(driver)
        (tmp_path / "report_screenshot.png").write_bytes(screenshot)
        SCREENSHOT_COPY.write_bytes(screenshot)

        # No console errors; no request but the page itself (data: URIs are not fetched).
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        urls = requested_urls(driver.get_log("performance"))
        assert unquote(url) in map(unquote, urls), urls  # the log did record the page
        external = [u for u in urls if not u.startswith("data:") and unquote(u) != unquote(url)]
        assert not external, external
    finally:
        driver.quit()
    assert time.monotonic() - t0 < 240
