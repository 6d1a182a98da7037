"""/docs in a real browser: headless Chromium, no internet, "Try it out" creates a book.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped
without them. The screenshot is kept in `test-artefacts/` at the repository root.
"""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.servers import ROOT, serving

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTEFACTS = ROOT / "test-artefacts"
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no browser: apt-get install chromium chromium-driver",
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The app as a real process on SQLite; its base URL."""
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'books.db'}", "REDIS_URL": ""}
    with serving(env) as server:
        yield server.url


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium that can resolve no host but this machine: no internet."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_docs_work_offline_and_try_it_out_creates_a_book(served: str, browser: WebDriver):
    wait = WebDriverWait(browser, 20)
    browser.get(f"{served}/docs")
    post = wait.until(
        expected_conditions.element_to_be_clickable(
            (By.CSS_SELECTOR, ".opblock-post .opblock-summary")
        )
    )
    paths = {
        element.text for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/books", "/books/{book_id}"} <= paths

    post.click()
    wait.until(
        expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, ".try-out__btn"))
    ).click()
    body = wait.until(
        expected_conditions.visibility_of_element_located(
            (By.CSS_SELECTOR, "textarea.body-param__text")
        )
    )
    body.clear()
    book = {"title": "Typed in a browser", "author": "Swagger UI", "year": 2026}
    body.send_keys(json.dumps(book))
    browser.find_element(By.CSS_SELECTOR, ".btn.execute").click()
    status = (By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
    wait.until(expected_conditions.visibility_of_element_located(status))
    ARTEFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "docs-try-it-out.png"))
    assert browser.find_element(*status).text.strip() == "201"

    listed = httpx.get(f"{served}/books").json()
    assert [item["title"] for item in listed["items"]] == [book["title"]]
    created = httpx.get(f"{served}/books/{listed['items'][0]['id']}").json()
    assert {key: created[key] for key in book} == book
