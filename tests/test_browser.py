"""The drawing page in a real headless Chromium: draw strokes, read the live result.

The server holds the session's trained run (tests/conftest.py), so the page must read the
digits drawn, not just any digits.

Uses Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)
through Selenium, never a downloaded driver. Skipped only on a machine without
chromium outside CI; in CI (env CI set) a missing browser is a failure.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile

import httpx
import pytest

from hwrjax.apps.recognize import Recognizer
from hwrjax.apps.serve import create_app, serve_in_thread

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Strokes in canvas fractions (x, y): a "1" on the left, a "7" or a two-stroke "4" on the right.
ONE = [(0.22, 0.15), (0.21, 0.5), (0.20, 0.85)]
SEVEN = [(0.55, 0.18), (0.65, 0.17), (0.78, 0.18), (0.70, 0.5), (0.62, 0.85)]
FOUR = [[(0.62, 0.15), (0.52, 0.6), (0.72, 0.6)], [(0.68, 0.35), (0.68, 0.88)]]


@pytest.fixture(scope="module")
def server(trained_run):
    recognizer = Recognizer.from_workdir(trained_run)
    with serve_in_thread(create_app(recognizer)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="hwrjax-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=800,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def draw(driver, strokes, kind=interaction.POINTER_MOUSE):
    """Draws each stroke (a list of canvas-fraction points) with real pointer input."""
    canvas = driver.find_element(By.ID, "pad")
    w, h = canvas.size["width"], canvas.size["height"]
    source = PointerInput(kind, "finger" if kind == interaction.POINTER_TOUCH else "mouse")
    builder = ActionBuilder(driver, mouse=source, duration=10)
    pointer = builder.pointer_action
    for stroke in strokes:
        # Offsets are from the element's centre; walk each segment in small steps like a hand would.
        points = [(int((x - 0.5) * w), int((y - 0.5) * h)) for x, y in stroke]
        pointer.move_to(canvas, *points[0])
        pointer.pointer_down()
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            for k in range(1, 7):
                pointer.move_to(canvas, x0 + (x1 - x0) * k // 6, y0 + (y1 - y0) * k // 6)
        pointer.pointer_up()
    builder.perform()


def wait_for_reading(driver) -> str:
    """Waits until the page shows a reading of the current drawing; returns its data-text."""
    result = driver.find_element(By.ID, "result")
    WebDriverWait(driver, 60).until(
        lambda d: result.get_attribute("data-text") is not None or result.get_attribute("data-error") is not None)
    assert result.get_attribute("data-error") is None, result.get_attribute("data-error")
    assert result.get_attribute("data-state") == "done"
    return result.get_attribute("data-text")


def api_reading(driver, server, mode) -> str:
    """POSTs the image the page itself sends (its canvas, downscaled) to the API; returns the text read."""
    url = driver.execute_script("return window.hwrjaxUploadCanvas().toDataURL('image/png');")
    png = base64.b64decode(url.split(",", 1)[1])
    r = httpx.post(f"{server}/api/recognize?mode={mode}", content=png, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_draw_a_number_and_read_it_live(browser, server):
    browser.get(server + "/")
    assert browser.find_element(By.ID, "result").get_attribute("data-text") is None
    draw(browser, [ONE, SEVEN])
    text = wait_for_reading(browser)
    assert text == "17"  # two separate marks: two digits, read correctly
    assert browser.find_element(By.ID, "text").text == text
    assert api_reading(browser, server, "number") == text

    browser.find_element(By.CSS_SELECTOR, "label[for=mode-digit]").click()  # re-reads in digit mode
    text = wait_for_reading(browser)
    assert re.fullmatch(r"[0-9]", text), text
    assert api_reading(browser, server, "digit") == text


def test_clear_and_draw_with_a_finger(browser, server):
    browser.get(server + "/")
    draw(browser, [ONE])
    wait_for_reading(browser)
    browser.find_element(By.ID, "clear").click()
    result = browser.find_element(By.ID, "result")
    assert result.get_attribute("data-text") is None and result.get_attribute("data-state") == "empty"
    blank = browser.execute_script(
        "const c = document.getElementById('pad');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return d.every(v => v === 255);")
    assert blank

    browser.execute_script("window.kinds = []; document.getElementById('pad')"
                           ".addEventListener('pointerdown', e => window.kinds.push(e.pointerType));")
    draw(browser, [SEVEN], kind=interaction.POINTER_TOUCH)
    assert browser.execute_script("return window.kinds;") == ["touch"]
    text = wait_for_reading(browser)
    assert text == "7"
    assert api_reading(browser, server, "number") == text


def test_a_digit_of_two_strokes_is_read_as_one(browser, server):
    browser.get(server + "/")
    browser.find_element(By.CSS_SELECTOR, "label[for=mode-digit]").click()
    draw(browser, FOUR)
    assert wait_for_reading(browser) == "4"
