"""The pages opened offline in headless Chromium (selenium): the report renders with no console
error, requests nothing but itself, decodes every image and shows every section; the latent
browser requests nothing but itself and its pictures beside it, and its inline script sorts,
filters and pages every latent (4096 open in under 5 s); the compare page shows the parameter
change and every key metric on its first screen.

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

import numpy as np
import pytest

from salve.present.compare.page import build_compare_page
from salve.present.latent_browser import build_latents_page
from salve.present.report import REPORT_SECTIONS
from tests.test_report import (
    EVIL_CLASS,
    KEYS,
    LATENTS,
    REPORT,
    _rev,
    class_filter_oracle,
    rename_class,
    run_report,
    synthetic_width_diff,
    write_latent_sources,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_TIMEOUT_S = 900
PAGE_TIMEOUT_S = 60
SCREENSHOT_COPY = Path("/tmp/salve_report_screenshot.png")
LATENTS_SCREENSHOT_COPY = Path("/tmp/salve_latents_screenshot.png")
COMPARE_SCREENSHOT_COPY = Path("/tmp/salve_compare_screenshot.png")
FIRST_SCREEN = (1400, 1000)  # the compare page's key content must fit in this viewport
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


def open_offline(driver, url: str) -> None:
    """Load ``url`` after draining the logs of the browser's own start page, and wait until
    every image has loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

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


def assert_quiet_and_offline(driver, url: str, beside: str | None = None) -> None:
    """No console error; no request but the page itself (data: URIs are not fetched) and files
    under ``beside`` (a file: URL of a folder next to the page)."""
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    urls = requested_urls(driver.get_log("performance"))
    assert unquote(url) in map(unquote, urls), urls  # the log did record the page
    external = [
        u
        for u in urls
        if not u.startswith("data:")
        and unquote(u) != unquote(url)
        and not (beside and unquote(u).startswith(unquote(beside) + "/"))
    ]
    assert not external, external


def open_browser(driver, url: str) -> None:
    """Load the latent browser ``url`` (logs of the start page drained) and the pictures of the
    page it draws."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get_log("performance")
    driver.get_log("browser")
    driver.get(url)
    WebDriverWait(driver, PAGE_TIMEOUT_S).until(
        lambda d: d.execute_script("return document.readyState === 'complete';")
    )
    load_drawn_images(driver)


def load_drawn_images(driver) -> None:
    """Fetch the lazy pictures of the drawn page now (off-screen ones wait for a scroll) and
    wait until each has loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script(
        "document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });"
    )
    WebDriverWait(driver, PAGE_TIMEOUT_S).until(
        lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete);")
    )


def write_browser(root: Path, classes: list[str], num_latents: int) -> tuple[Path, dict, dict]:
    """The synthetic sources, the page and its pictures beside it, as the report stage writes
    them. Returns (page, the oracle, the page's stats)."""
    from tasks.report import copy_latent_images, load_latent_sources

    oracle = write_latent_sources(root, classes, num_latents)
    sources = load_latent_sources(root)
    page = root / LATENTS
    page.parent.mkdir(parents=True, exist_ok=True)
    copy_latent_images(root, dict(sources.gradfam_images))
    text, stats = build_latents_page(sources)
    page.write_text(text, encoding="utf-8")
    return page, oracle, stats


def assert_images_decoded(driver) -> int:
    sizes = driver.execute_script(
        "return Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight]);"
    )
    assert all(w > 0 and h > 0 for w, h in sizes), sizes
    return len(sizes)


VISIBLE_LATENTS = (
    "return Array.from(document.querySelectorAll('[data-latent]'))"
    ".filter(e => !e.hidden && e.offsetParent !== null).map(e => Number(e.dataset.latent));"
)


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_latent_browser_sorts_and_filters_in_chromium(chromium, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    classes = ["cat", "dog", EVIL_CLASS, "owl"]
    num_latents = 12
    page, oracle, stats = write_browser(tmp_path, classes, num_latents)
    url = page.resolve().as_uri()
    freq, change = oracle["frequency"], oracle["change"]

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = start_driver(profile)
    try:
        open_browser(driver, url)
        assert assert_images_decoded(driver) == stats["images"] > 0
        assert len(driver.find_elements(By.CSS_SELECTOR, "[data-latent]")) == num_latents
        body = driver.find_element(By.TAG_NAME, "body").text
        assert '<script>console.error("salve-xss")</script>' in body  # shown as text
        shown = driver.find_element(By.ID, "shown")

        def visible() -> list[int]:
            order = driver.execute_script(VISIBLE_LATENTS)
            assert shown.text == str(len(order))
            return order

        assert visible() == list(range(num_latents))
        sort = Select(driver.find_element(By.ID, "sort"))
        sort.select_by_value("frequency")  # largest first; latents 0 and 1 have none: last
        by_freq = sorted(freq, key=lambda j: (-freq[j], j)) + [0, 1]
        assert visible() == by_freq
        sort.select_by_value("effect")
        by_effect = sorted(range(num_latents), key=lambda j: (change[j].min(), j))
        assert visible() == by_effect

        by_class = Select(driver.find_element(By.ID, "class-filter"))
        by_class.select_by_value("2")
        expected = [j for j in by_effect if j in class_filter_oracle(oracle, 2)]
        assert 0 < len(expected) < num_latents
        assert visible() == expected
        by_class.select_by_value("")

        min_freq = driver.find_element(By.ID, "min-frequency")
        min_freq.clear()
        min_freq.send_keys("0.5")
        assert visible() == [j for j in by_effect if freq.get(j, -1) >= 0.5]
        min_freq.clear()
        min_freq.send_keys("0")

        query = driver.find_element(By.ID, "text-filter")
        query.send_keys("dominant: owl")
        assert visible() == [oracle["dominant"][3]]
        query.clear()
        query.send_keys(" ")  # an input event with an empty query: everything again
        assert sorted(visible()) == list(range(num_latents))
        sort.select_by_value("latent")
        assert visible() == list(range(num_latents))

        # The bars: one per class, height |value| / the largest |value| of 44 px (22 when a
        # value is negative: zero in the middle); the
        # accuracy change on a fixed ±1 scale with zero in the middle.
        heights = driver.execute_script(
            "return Array.from(document.querySelectorAll('#latent-5 svg.bars')).map("
            "s => Array.from(s.querySelectorAll('rect')).map(r => [r.getAttribute('class'),"
            " Number(r.getAttribute('height'))]));"
        )
        mu = oracle["mu"][:, 5]
        half = 22 if (mu < 0).any() else 44  # a negative mean: zero in the middle
        means, drops = heights
        expect = half * np.abs(mu) / np.abs(mu).max()
        assert [h for _, h in means] == pytest.approx(list(expect), abs=0.05)
        assert means[int(np.abs(mu).argmax())][0].startswith("top ")
        assert [h for _, h in drops] == pytest.approx(list(22 * np.abs(change[5])), abs=0.05)

        screenshot = driver.get_screenshot_as_png()
        (page.parent / "latents.png").write_bytes(screenshot)
        LATENTS_SCREENSHOT_COPY.write_bytes(screenshot)
        assert_quiet_and_offline(driver, url, beside=(page.parent / "latents").resolve().as_uri())
    finally:
        driver.quit()


PAGER = (
    "const b = document.querySelector('#pager-top'); return [b.querySelector('input').value,"
    " b.querySelector('.prev').disabled, b.querySelector('.next').disabled];"
)


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_latent_browser_pages_every_latent_in_chromium(chromium, tmp_path: Path):
    """More latents than one page: every latent is reachable page by page, sorting covers all
    of them (not just the drawn page), a #latent-<l> link opens the page that holds l, and the
    pictures each page shows load from the files beside it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from salve.present.latent_browser import PAGE_SIZE

    num_latents = 2 * PAGE_SIZE + 7
    page, oracle, _ = write_browser(tmp_path, ["cat", "dog", "owl"], num_latents)
    url = page.resolve().as_uri()
    freq = oracle["frequency"]
    driver = start_driver(tmp_path / "profile")
    try:
        open_browser(driver, url)

        def walk() -> list[int]:
            seen = []
            while True:
                load_drawn_images(driver)
                assert assert_images_decoded(driver) > 0
                drawn = driver.execute_script(VISIBLE_LATENTS)
                assert 0 < len(drawn) <= PAGE_SIZE
                seen += drawn
                if driver.execute_script(PAGER)[2]:
                    return seen
                driver.find_element(By.CSS_SELECTOR, "#pager-top .next").click()

        assert driver.execute_script(PAGER) == ["1", True, False]
        assert walk() == list(range(num_latents))
        assert driver.find_element(By.ID, "shown").text == str(num_latents)
        Select(driver.find_element(By.ID, "sort")).select_by_value("frequency")
        assert driver.execute_script(PAGER)[0] == "1"  # a new order starts at its first page
        assert walk() == sorted(freq, key=lambda j: (-freq[j], j)) + [0, 1]

        # In the frequency order the last latents come first: a link goes to its page there.
        driver.get(url + "#latent-1")  # no frequency: the last page
        assert driver.execute_script(PAGER) == ["3", False, True]
        assert 1 in driver.execute_script(VISIBLE_LATENTS)
        driver.get("about:blank")
        driver.get(url + f"#latent-{PAGE_SIZE + 3}")  # a fresh page: index order, page 2
        assert driver.execute_script(PAGER) == ["2", False, False]
        assert PAGE_SIZE + 3 in driver.execute_script(VISIBLE_LATENTS)
        assert_quiet_and_offline(driver, url, beside=(page.parent / "latents").resolve().as_uri())
    finally:
        driver.quit()


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_latent_browser_with_4096_latents_draws_one_page(chromium, tmp_path: Path):
    """A paper-scale SAE (#25): 4096 latents, the page holds no picture bytes and draws one page
    of entries, so opening it does not grow with the width (its time is a benchmark's
    business, not a test's)."""
    from salve.present.latent_browser import PAGE_SIZE

    num_latents = 4096
    page, _, stats = write_browser(tmp_path, ["cat", "dog", "owl", "fox", "elk"], num_latents)
    assert stats["latents"] == num_latents
    assert page.stat().st_size < 8 * 2**20, page.stat().st_size
    driver = start_driver(tmp_path / "profile")
    try:
        driver.get("about:blank")
        open_browser(driver, page.resolve().as_uri())
        assert driver.execute_script(VISIBLE_LATENTS) == list(range(PAGE_SIZE))
        assert driver.find_element("id", "shown").text == str(num_latents)
        drawn = driver.execute_script("return document.querySelectorAll('img').length;")
        assert 0 < drawn <= PAGE_SIZE * 8, drawn  # one page's pictures, not 4096 latents'
    finally:
        driver.quit()


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_compare_first_screen_shows_params_and_key_metrics(chromium, tmp_path: Path):
    """A sae.width 64 -> 128 comparison with ~170 changed metrics: at 1400x1000 the first
    screen holds the parameter change and every key metric; the rest is collapsed."""
    from selenium.webdriver.common.by import By

    params, metrics = synthetic_width_diff()
    page = tmp_path / "compare.html"
    page.write_text(
        build_compare_page(_rev("a"), _rev("b"), params, metrics, KEYS), encoding="utf-8"
    )
    url = page.resolve().as_uri()
    width, height = FIRST_SCREEN

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = start_driver(profile)
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        open_offline(driver, url)
        assert driver.execute_script("return [innerWidth, innerHeight];") == [width, height]
        assert driver.execute_script("return scrollY;") == 0
        keys = ["sae.width"] + [f"{k.file}:{k.key}" for k in KEYS]
        for key in keys:
            el = driver.find_element(By.CSS_SELECTOR, f'tr[data-key="{key}"]')
            box = driver.execute_script(
                "const r = arguments[0].getBoundingClientRect();"
                "return [r.left, r.top, r.right, r.bottom];",
                el,
            )
            left, top, right, bottom = box
            assert left >= 0 and top >= 0 and right <= width and bottom <= height, (key, box)
            assert el.is_displayed()
        # The other ~160 changes are there, collapsed: none of their rows is shown.
        rest = driver.find_elements(By.CSS_SELECTOR, "#other-metrics tr.metric")
        assert len(rest) > 150 and not any(r.is_displayed() for r in rest[:20])
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-key="metrics/edit.json:mean_score"]')
        assert "within noise" in row.text
        row = driver.find_element(
            By.CSS_SELECTOR, 'tr[data-key="metrics/edit.json:checkpoint_edit.feature"]'
        )
        assert "4 -> 67 (changed)" in row.text

        screenshot = driver.get_screenshot_as_png()
        (tmp_path / "compare_first_screen.png").write_bytes(screenshot)
        COMPARE_SCREENSHOT_COPY.write_bytes(screenshot)
        assert_quiet_and_offline(driver, url)
    finally:
        driver.quit()
