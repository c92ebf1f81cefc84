"""The chat page of lmtune serve in a headless Chromium (Debian's chromium + chromium-driver, via selenium)."""

from __future__ import annotations

import re
import shutil
import time
from importlib import resources

import httpx
import pytest

for _module in ("fastapi", "uvicorn", "sse_starlette"):
    pytest.importorskip(_module, reason="lmtune serve needs its extra: pip install lmtune[serve]")

from serve_helpers import running_server, serve_argv, served_adapters  # noqa: E402

from lmtune.serve import worker as worker_module  # noqa: E402
from lmtune.serve.args import parse_serve_args  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,760")


def test_page_fetches_nothing_from_the_internet():
    static = resources.files("lmtune.serve") / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["chat.css", "chat.js", "index.html"]
    for name in names:
        text = (static / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|//cdn|@import", text), f"{name} refers to another site"


@pytest.fixture(scope="module")
def browser_server(tiny_llama_dir, tmp_path_factory):
    adapters = served_adapters(tiny_llama_dir, tmp_path_factory.mktemp("page"))
    argv = serve_argv(tiny_llama_dir, adapters, "--max_new_tokens", "8", "--max_tokens_limit", "64")
    with running_server(parse_serve_args(argv)) as running:
        yield running


@pytest.fixture
def driver(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver); .ci/run installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield browser
    browser.quit()


@pytest.mark.slow
def test_chat_page_streams_an_answer(browser_server, driver, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # Slow generation down so that the answer is seen while it streams in.
    put = worker_module._JobStreamer.put
    monkeypatch.setattr(worker_module._JobStreamer, "put", lambda self, value: (time.sleep(0.15), put(self, value)))
    driver.get(browser_server.url)
    wait = WebDriverWait(driver, 30, poll_frequency=0.02)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)
    model = Select(driver.find_element(By.ID, "model"))
    assert model.first_selected_option.get_attribute("value") == "chatml"  # the first adapter by default
    for field, value in (("temperature", "0"), ("max-tokens", "12")):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "input").send_keys("Give three tips for staying healthy.", Keys.ENTER)
    partial = wait.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".assistant.streaming")
                                    if e.text])
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".assistant.streaming"))
    shown = driver.execute_script("return document.querySelector('.assistant').textContent")
    driver.save_screenshot(str(tmp_path / "chat.png"))
    expected = httpx.post(browser_server.url + "v1/chat/completions", timeout=60, json={
        "model": "chatml", "messages": [{"role": "user", "content": "Give three tips for staying healthy."}],
        "temperature": 0, "max_tokens": 12}).json()["choices"][0]["message"]["content"]
    assert shown == expected and partial[0] != shown.strip()  # seen part way, then the whole answer
    assert (tmp_path / "chat.png").stat().st_size > 10_000
    assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Give three tips for staying healthy."
    driver.find_element(By.ID, "new-chat").click()
    assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
