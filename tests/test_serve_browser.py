"""The clinic page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium) at a
phone's width, against the real `edge-serve`: upload through the page, see the verdict and the overlay.

Set EDGE_SERVE_SCREENSHOT=PATH to also save the phone-width screenshot there (the README's docs/serve.png:
`cd tests && EDGE_SERVE_SCREENSHOT=../docs/serve.png python -m pytest -q test_serve_browser.py`).
"""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from serve_server import request, running_server

pytest.importorskip("starlette", reason='edge-serve needs its extra: pip install "edge-mri[serve]"')

PHONE_WIDTH = 360
WAIT_S = 120
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
WORDS = {"glioma": "Glioma", "meningioma": "Meningioma", "pituitary": "Pituitary tumour", "notumor": "No tumour"}


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'selenium is not installed (pip install "edge-mri[test]")'
    if CHROMIUM is None or CHROMEDRIVER is None:
        return ("no system Chromium and chromedriver (Debian: apt-get install -y chromium chromium-driver; "
                ".ci/run installs them when it runs as root)")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test skipped: {_missing()}")


@pytest.fixture()
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                     f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={PHONE_WIDTH},800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP violations included
    options.add_experimental_option("mobileEmulation", {
        "deviceMetrics": {"width": PHONE_WIDTH, "height": 780, "pixelRatio": 2.0, "touch": True}})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition, message)


def cards(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results > li.card")


def finished(driver, count: int):
    found = cards(driver)
    return found if len(found) == count and not any("pending" in c.get_attribute("class") for c in found) else False


def label_of(path: Path) -> str:
    return path.stem.split("_")[0]


def phone_screenshot(driver) -> bytes:
    """The page from its top to the end of the newest result, at the phone's width (Chrome DevTools Protocol)."""
    height = driver.execute_script(
        "return Math.ceil(document.querySelector('#results > li').getBoundingClientRect().bottom + 12)")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": PHONE_WIDTH, "height": height, "scale": 1}})
    return base64.b64decode(shot["data"])


def test_the_page_classifies_scans_at_phone_width_with_every_asset_from_the_device(browser, sample_scans, tmp_path):
    from selenium.webdriver.common.by import By

    one_per_class = {label_of(p): p for p in reversed(sample_scans)}
    scans = [one_per_class[label] for label in sorted(one_per_class)]
    with running_server("--threads", "2", cwd=tmp_path) as server:
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_element(By.ID, "model").text.startswith("Model custom-cnn"),
                 "the page never showed the model")
        assert "Decision support, not a diagnosis" in browser.find_element(By.TAG_NAME, "body").text
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in scans))
        done = wait_for(browser, lambda d: finished(d, len(scans)), "the page never showed every result")
        shown = {}
        for card in done:
            name = card.find_element(By.CSS_SELECTOR, ".file").text
            assert "ok" in card.get_attribute("class").split(), card.text
            verdict = card.find_element(By.CSS_SELECTOR, ".verdict").text
            assert card.find_elements(By.CSS_SELECTOR, ".topk li"), "top-k probabilities shown"
            image = card.find_element(By.CSS_SELECTOR, "img.overlay")
            assert image.get_attribute("src").startswith("data:image/png;base64,")
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100
            shown[name] = verdict
        for scan in scans:
            assert shown[scan.name].startswith(WORDS[label_of(scan)] + " "), (scan.name, shown[scan.name])
        # usable at 360 px: nothing wider than the screen
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE_WIDTH
        # offline: every resource the page loaded came from the device itself
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(server.url) for url in loaded), loaded
        logs = browser.get_log("browser")
        assert not [entry for entry in logs if entry.get("level") == "SEVERE"], logs
        # the newest result on top, as a phone user sees it first
        browser.execute_script("window.scrollTo(0, 0)")
        png = phone_screenshot(browser)
    (tmp_path / "serve.png").write_bytes(png)
    target = os.environ.get("EDGE_SERVE_SCREENSHOT")
    if target:
        Path(target).write_bytes(png)


def test_the_page_asks_for_the_access_code_and_then_classifies(browser, sample_scans, tmp_path):
    from selenium.webdriver.common.by import By

    token = "clinic-code-0123456789"
    scan = sample_scans[0]
    with running_server("--threads", "1", "--token", token, cwd=tmp_path) as server:
        browser.get(server.url)
        form = wait_for(browser, lambda d: d.find_element(By.ID, "token-form").is_displayed()
                        and d.find_element(By.ID, "token-form"), "the page never asked for the access code")
        browser.find_element(By.ID, "files").send_keys(str(scan))
        form.find_element(By.ID, "token").send_keys(token)
        form.find_element(By.CSS_SELECTOR, "button").click()
        (card,) = wait_for(browser, lambda d: finished(d, 1), "no result after the code was given")
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text.startswith(WORDS[label_of(scan)])
        assert not browser.find_element(By.ID, "token-form").is_displayed()


def test_the_page_shows_an_unreadable_file_as_an_error_not_a_verdict(browser, sample_scans, tmp_path):
    from selenium.webdriver.common.by import By

    cut = tmp_path / "cut.jpg"
    data = sample_scans[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with running_server("--threads", "1", cwd=tmp_path) as server:
        browser.get(server.url)
        browser.find_element(By.ID, "files").send_keys(str(cut))
        (card,) = wait_for(browser, lambda d: finished(d, 1), "no answer for the truncated file")
        assert "error" in card.get_attribute("class").split()
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "Could not classify this file"
        assert "truncated" in card.find_element(By.CSS_SELECTOR, ".message").text
        assert not card.find_elements(By.CSS_SELECTOR, "img.overlay, .topk")


def test_a_scan_without_a_verdict_says_so_and_shows_no_label(browser, tmp_path):
    """A blank and a colour image (refused by the input gate) and, with a model that carries the gate's
    calibration, a plot (referred): each card says "No verdict" and the record's sentence, shows the scan
    without heat, and names none of the model's labels."""
    from selenium.webdriver.common.by import By
    from test_serve import no_verdict_images

    paths = []
    for name, (data, _) in no_verdict_images().items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    with running_server("--threads", "1", cwd=tmp_path) as server:
        if request(server, "GET", "/api/models").json()["loaded"]["gate"]:
            # a model with a gate calibration also refers what is not like its training scans: a plot
            paths.append(Path(__file__).resolve().parent.parent / "docs" / "latency.png")
        browser.get(server.url)
        wait_for(browser, lambda d: d.find_element(By.ID, "gate").text, "the page never said what its gate does")
        browser.find_element(By.ID, "files").send_keys("\n".join(map(str, paths)))
        done = wait_for(browser, lambda d: finished(d, len(paths)), "no answer for the turned-away images")
        for card in done:
            assert "no-verdict" in card.get_attribute("class").split(), card.text
            assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "No verdict"
            assert card.find_element(By.CSS_SELECTOR, ".message").text.endswith("no verdict")
            assert not card.find_elements(By.CSS_SELECTOR, ".topk, .confidence")
            assert not any(word in card.text for word in WORDS.values()), card.text
            image = card.find_element(By.CSS_SELECTOR, "img.overlay")
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100
        png = phone_screenshot(browser)
    (tmp_path / "no-verdict.png").write_bytes(png)
