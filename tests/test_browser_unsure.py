"""The drawing page's "unsure" control in a real headless Chromium (see test_browser.py).

The server's --min-confidence is the page's starting threshold; a reading below the threshold
is marked unsure on the page (its digits still shown), and changing the field re-reads.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from hwrjax.apps.recognize import Recognizer
from hwrjax.apps.serve import create_app, serve_in_thread
from test_browser import ONE, SEVEN, browser, draw, wait_for_reading  # noqa: F401 (browser is a fixture)
from test_recognize import shared_untrained_workdir


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """A server whose default threshold (1.0) no reading of an untrained model reaches."""
    recognizer = Recognizer.from_workdir(shared_untrained_workdir(tmp_path_factory), min_confidence=1.0)
    with serve_in_thread(create_app(recognizer)) as url:
        yield url


def test_page_marks_readings_below_its_threshold_unsure(browser, strict_server):  # noqa: F811
    browser.get(strict_server + "/")
    field = browser.find_element(By.ID, "min-confidence")
    WebDriverWait(browser, 30).until(lambda d: field.get_attribute("value") == "100")  # the server's --min-confidence
    draw(browser, [ONE, SEVEN])
    text = wait_for_reading(browser)
    result = browser.find_element(By.ID, "result")
    assert result.get_attribute("data-unsure") == "true"
    assert "write it again" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "text").text == text  # the digits are still shown
    assert len(browser.find_elements(By.CSS_SELECTOR, "#digits .digit.low")) == len(text)

    field.clear()
    field.send_keys("0", Keys.TAB)  # a change event: the drawing is read again at the new threshold
    WebDriverWait(browser, 60).until(lambda d: result.get_attribute("data-unsure") == "false")
    assert "write it again" not in browser.find_element(By.ID, "status").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#digits .digit.low")
