"""The status page in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium):
it loads, shows a failing probe's reason, and never shows the API key."""
import time

import pytest
import requests
from helpers import require_tool

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict

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


def wait_for_page(driver, url, words, timeout=60.0):
    """Reload the page until its text has `words`; the last text either way."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        driver.get(url)
        body = driver.find_element(By.TAG_NAME, "body").text
        if words in body or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def test_the_service_section_says_down_while_every_collector_is_up(tmp_path):
    """Issue 21: during an outage every collector was green while the server was down. The
    Service section, first on the page, turns from healthy to down when the server stops,
    from the canary's result and the tap's 502s, while the collector table still says up."""
    from fake_whisper import FakeWhisper
    from selenium.webdriver.common.by import By

    from whisper_exporter.collectors.probe import bundled_canary

    canary = bundled_canary()
    fake = FakeWhisper(answers={"en.wav": canary.reference, "silence.wav": ""})
    config = from_dict({
        "listen": "127.0.0.1:0",
        "service": {"url": fake.url},
        "collectors": {"gpu": {"enabled": False}, "process": {"enabled": False},
                       "probe": {"interval": "1s", "timeout": "2s"},
                       "tap": {"enabled": True, "listen": "127.0.0.1:0"}},
    }, source=str(tmp_path / "config.yml"))
    running = daemon.start(config)
    driver = browser()
    try:
        (tap,) = [c for c, _ in running.scheduler.entries if c.name == "tap"]
        deadline = time.monotonic() + 30
        while not tap.tap.port:
            assert time.monotonic() < deadline, "the tap never listened"
            time.sleep(0.1)
        through_tap = f"http://127.0.0.1:{tap.tap.port}/v1/audio/transcriptions"

        def transcribe() -> int:
            with open(canary.audio, "rb") as audio:
                return requests.post(through_tap, files={"file": ("en.wav", audio)}, data={"model": "whisper-1"},
                                     timeout=30).status_code

        assert transcribe() == 200
        driver.set_window_size(1280, 1400)
        body = wait_for_page(driver, running.url + "/", "Verdict: healthy")
        assert "Verdict: healthy" in body, body
        driver.save_screenshot(str(tmp_path / "healthy.png"))

        fake.close()  # the server goes away: connection refused from now on
        assert transcribe() == 502 and transcribe() == 502
        body = wait_for_page(driver, running.url + "/", "Verdict: down")
        driver.save_screenshot(str(tmp_path / "down.png"))
        assert "Verdict: down" in body, body
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings.index("Service") < headings.index("Collectors"), headings
        reasons = driver.find_element(By.XPATH, "//h2[text()='Service']/following-sibling::ul[1]").text
        assert "canary en-short: connection_error" in reasons, reasons
        assert "the tap answered 2 requests with 502" in reasons, reasons
        verdict = driver.find_element(By.CSS_SELECTOR, "p.verdict span")
        assert verdict.get_attribute("class") == "down"
        assert verdict.value_of_css_property("color") != "rgba(0, 102, 0, 1)"  # not the green of "up"
        # The collectors themselves are all fine: they run. That is all the page said before.
        rows = driver.find_elements(By.XPATH, "//h2[text()='Collectors']/following-sibling::table[1]//tr[td]")
        assert {r.find_elements(By.TAG_NAME, "td")[1].text for r in rows} == {"up"}
    finally:
        driver.quit()
        running.close()
        fake.close()
