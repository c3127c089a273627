"""The status page in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium):
it loads, shows a failing probe's reason, and never shows the API key."""
import time

import pytest
import requests
from helpers import require_tool

from whisper_exporter.config import from_dict
from whisper_exporter.runtime import wiring as daemon

pytestmark = pytest.mark.integration

SECRET = "sk-live-DO-NOT-LEAK-4242"


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = require_tool("chromium"), require_tool("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def failing_exporter(monkeypatch, tmp_path):
    monkeypatch.setenv("WHISPER_TEST_API_KEY", SECRET)
    config = from_dict({
        "listen": "127.0.0.1:0",
        # Nothing listens on port 9 (discard): every probe fails with connection refused.
        # (User info in the URL together with an API key is refused: both are Authorization.)
        "service": {"url": "http://127.0.0.1:9", "api_key_env": "WHISPER_TEST_API_KEY",
                    "headers": {"Authorization": f"Bearer {SECRET}", "X-Auth-Token": SECRET,
                                "X-Team": "speech"}},
        "collectors": {"gpu": {"enabled": False}, "probe": {"interval": "1s", "timeout": "2s"},
                       "process": {"match": "no-such-process-anywhere"}},
    }, source=str(tmp_path / "config.yml"))
    running = daemon.start(config)
    deadline = time.monotonic() + 15
    while "connection refused" not in requests.get(running.url + "/", timeout=5).text.lower():
        assert time.monotonic() < deadline, "the probe never failed"
        time.sleep(0.3)
    yield running
    running.close()


def test_status_page_in_chromium(failing_exporter):
    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        driver.set_window_size(1280, 1600)
        driver.get(failing_exporter.url + "/")
        assert driver.title == "whisper-exporter"
        body = driver.find_element(By.TAG_NAME, "body").text
        # Collectors with their state.
        assert "Collectors" in body and "probe" in body and "process" in body
        # The failing probe and why it failed, readable on the page.
        probes = driver.find_element(By.XPATH, "//h2[text()='Recent probes']/following-sibling::table[1]")
        assert "connection refused" in probes.text.lower()
        assert "connection_error" in probes.text
        # The effective configuration, with the secrets masked everywhere on the page.
        assert "WHISPER_TEST_API_KEY" in body  # the variable's name is shown...
        assert SECRET not in driver.page_source  # ...never its value, nor the URL's password or the header
        assert "<masked>" in body
        # No external assets: the page works offline.
        for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
            for element in driver.find_elements(By.TAG_NAME, tag):
                assert not (element.get_attribute(attr) or "").startswith("http"), element.get_attribute(attr)
        driver.save_screenshot(str(failing_exporter.config.source).replace("config.yml", "status.png"))
    finally:
        driver.quit()


def test_metrics_and_errors_never_carry_the_secret(failing_exporter):
    text = requests.get(failing_exporter.url + "/metrics", timeout=5).text
    assert 'whisper_probe_success{probe="en-short"} 0.0' in text
    assert SECRET not in text
