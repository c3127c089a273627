"""End to end: production traffic through the tap with sampling on, a reviewer in real headless Chromium
(selenium) behind basic auth, and the next quality run scoring what the reviewer verified.

The official `openai` client sends two requests through the tap: to the fake Whisper server (one
clip it transcribes nearly right, one silent clip it answers with a known hallucination), and to the
real faster-whisper-server with tiny.en (espeak-ng speech, and brown noise, which tiny.en
transcribes as "You": a real hallucination). The reviewer
opens /review, plays the first item (keyboard shortcut), changes its speed, corrects its transcript,
submits with Ctrl+Enter; flags the second as no speech and submits. The verified file then holds
both records, and after the next quality run whisper_quality_errors_total{set="production"} equals
an independent jiwer computation on the corrected text, and one hallucination is confirmed."""
from __future__ import annotations

import json
import subprocess
import time

import bcrypt
import jiwer
import pytest
import requests
from fake_whisper import FakeWhisper
from helpers import free_port, require_tool, sample, wait_for, wav
from test_status_page import browser

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict
from whisper_exporter.web.webconfig import load_web_config

pytestmark = pytest.mark.integration
pytest_plugins = ["whisper_server"]

SPOKEN = "the meeting moved to thursday"
HALLUCINATED = "Thank you for watching."
CORRECTED = "The meeting moved to Thursday at noon."


def clips(backend: str, folder) -> dict[str, object]:
    """The two clips sent: speech, and one with nobody speaking."""
    if backend == "fake":
        return {"speech.wav": wav(folder / "clips" / "speech.wav", seconds=3.0),
                "silence.wav": wav(folder / "clips" / "silence.wav", seconds=3.0)}
    from whisper_server import make_speech

    (folder / "clips").mkdir(parents=True, exist_ok=True)
    noise = folder / "clips" / "silence.wav"
    subprocess.run([require_tool("sox"), "-n", "-r", "16000", "-c", "1", str(noise), "synth", "3", "brownnoise",
                    "vol", "0.3"], check=True, capture_output=True)
    return {"speech.wav": make_speech(CORRECTED, folder / "clips" / "speech.wav"), "silence.wav": noise}


@pytest.fixture(params=["fake", "tiny.en"])
def stack(request, tmp_path):
    fake = None
    if request.param == "fake":
        fake = FakeWhisper(answers={"speech.wav": SPOKEN, "silence.wav": HALLUCINATED})
        url, model = fake.url, "whisper-1"
    else:
        server = request.getfixturevalue("whisper_server")
        url, model = server.url, server.model
    tap_port = free_port()
    config = from_dict({"listen": "127.0.0.1:0", "service": {"url": url}, "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
        "tap": {"enabled": True, "listen": f"127.0.0.1:{tap_port}", "upstream": url,
                "sample_dir": str(tmp_path / "samples")},
        "quality": {"enabled": True, "production": {
            "queue": str(tmp_path / "review" / "queue.jsonl"), "references": str(tmp_path / "review" / "verified.jsonl"),
            "fraction": 1.0}}}}, source=str(tmp_path / "config.yml"))
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  ana: '{hashed}'\n")
    running = daemon.start(config, web=load_web_config(str(tmp_path / "web.yml")))
    yield running, f"http://127.0.0.1:{tap_port}/v1", model, clips(request.param, tmp_path), tmp_path
    running.close()
    if fake is not None:
        fake.close()


def test_a_reviewer_in_chromium_verifies_one_item_and_flags_another_and_the_quality_run_scores_them(stack):
    from openai import OpenAI
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    from whisper_normalizer.english import EnglishTextNormalizer

    running, tap_url, model, sent, folder = stack
    client = OpenAI(base_url=tap_url, api_key="not-needed", max_retries=0, timeout=120)
    answers = {}
    for name, path in sent.items():
        with open(path, "rb") as f:
            # model_name: what faster-whisper-server reads to pick its configured model
            answers[name] = client.audio.transcriptions.create(
                model=model, file=(name, f.read(), "audio/wav"), language="en", extra_body={"model_name": model}).text
        time.sleep(0.05)  # sampled_at orders the queue: the speech clip is the older item
    queue = folder / "review" / "queue.jsonl"
    assert wait_for(lambda: queue.exists() and len(queue.read_text().splitlines()) == 2, timeout=30)
    spoken, hallucinated = answers["speech.wav"], answers["silence.wav"]
    # Where nobody spoke tiny.en writes text on some CPUs ("You") and nothing on others: what the
    # exporter does with either is asserted below, never which one came.
    (quality,) = [c for c, s in running.scheduler.entries if s.name == "quality"]
    quality.update()  # an hourly run that finds both waiting (their languages go out at 0)

    host = running.url.split("://", 1)[1]
    driver = browser()
    try:
        driver.set_window_size(1280, 1400)
        driver.get(f"http://ana:s3cret@{host}/review")
        assert driver.find_element(By.ID, "left").text == "2"
        box = driver.find_element(By.ID, "reference")
        assert box.get_attribute("value") == spoken  # the server's transcript, pre-filled
        assert "Alt+K" in driver.find_element(By.ID, "shortcuts").text

        # Play with the shortcut while typing in the transcript: it plays and types nothing.
        box.click()
        ActionChains(driver).key_down(Keys.ALT).send_keys("k").key_up(Keys.ALT).perform()
        assert wait_for(lambda: driver.execute_script(
            "const a = document.getElementById('audio'); return !a.paused && a.currentTime > 0;"), timeout=20)
        assert box.get_attribute("value") == spoken
        Select(driver.find_element(By.ID, "speed")).select_by_value("1.5")
        assert driver.execute_script("return document.getElementById('audio').playbackRate") == 1.5
        ActionChains(driver).key_down(Keys.ALT).send_keys("j").key_up(Keys.ALT).perform()  # seek back to 0
        assert driver.execute_script("return document.getElementById('audio').currentTime") < 1.0

        box.clear()
        box.send_keys(CORRECTED)
        box.send_keys(Keys.CONTROL, Keys.ENTER)  # submit
        assert wait_for(lambda: driver.find_element(By.ID, "left").text == "1", timeout=20)
        box = driver.find_element(By.ID, "reference")
        assert box.get_attribute("value") == hallucinated
        ActionChains(driver).key_down(Keys.ALT).send_keys("1").key_up(Keys.ALT).perform()  # flag: no speech
        assert driver.find_element(By.ID, "flag-no_speech").is_selected()
        driver.find_element(By.ID, "submit").click()
        assert wait_for(lambda: driver.find_elements(By.ID, "done"), timeout=20)
    finally:
        driver.quit()

    records = [json.loads(line) for line in (folder / "review" / "verified.jsonl").read_text().splitlines()]
    assert [(r["reference"], r.get("flags"), r["original"], r["reviewer"], r["source"]) for r in records] == [
        (CORRECTED, None, spoken, "ana", "page"), ("", ["no_speech"], hallucinated, "ana", "page")]
    assert all(r["language"] == "en" and r["seconds"] >= 0 for r in records)

    quality.update()  # the next quality run
    metrics = requests.get(running.url + "/metrics", auth=("ana", "s3cret"), timeout=10).text
    norm = EnglishTextNormalizer()
    truth = jiwer.process_words(norm(CORRECTED), norm(spoken))
    errors = {t: sample(metrics, "whisper_quality_errors_total", set="production", language="en", type=t)
              for t in ("substitution", "deletion", "insertion")}
    assert errors == {"substitution": truth.substitutions, "deletion": truth.deletions,
                      "insertion": truth.insertions}
    assert sample(metrics, "whisper_quality_reference_units_total", set="production", language="en") == \
        len(norm(CORRECTED).split())
    # No speech on a transcript with text is a confirmed hallucination; on an empty one there was none.
    assert sample(metrics, "whisper_hallucination_confirmed_total", language="en") == (1 if hallucinated.strip() else 0)
    assert sample(metrics, "whisper_quality_reviews_total", result="verified") == 1
    assert sample(metrics, "whisper_quality_reviews_total", result="flagged", flag="no_speech") == 1
    assert sample(metrics, "whisper_quality_review_pending_items") == 0


def test_the_status_page_links_a_reviewer_to_the_review_queue_in_chromium(tmp_path):
    """The status page's Review section, in Chromium: how many samples wait, and a link that opens
    /review on the oldest of them."""
    from selenium.webdriver.common.by import By
    from test_review import queue_line

    queue = tmp_path / "review" / "queue.jsonl"
    queue.parent.mkdir(mode=0o700)
    audio = wav(tmp_path / "samples" / "one.wav", seconds=2.0)
    queue.write_text(queue_line("00000000000000aa", str(audio), SPOKEN, "en", 7200)
                     + queue_line("00000000000000bb", str(audio), SPOKEN, "de", 60))
    config = from_dict({"listen": "127.0.0.1:0", "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
        "quality": {"enabled": True, "production": {"queue": str(queue),
                                                    "references": str(tmp_path / "review" / "verified.jsonl")}}}},
        source=str(tmp_path / "config.yml"))
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  ana: '{hashed}'\n")
    running = daemon.start(config, web=load_web_config(str(tmp_path / "web.yml")))
    driver = browser()
    try:
        host = running.url.split("://", 1)[1]
        driver.get(f"http://ana:s3cret@{host}/")
        summary = driver.find_element(By.ID, "review-queue").text
        assert "2 production samples waiting for review (the oldest for 2 h)" in summary, summary
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert "Review" in headings, headings
        driver.find_element(By.ID, "review-link").click()
        assert wait_for(lambda: driver.find_elements(By.ID, "item"), timeout=20)
        assert driver.current_url.endswith("/review")
        assert driver.find_element(By.ID, "item").text == "00000000000000aa"  # the oldest first
        assert driver.find_element(By.ID, "left").text == "2"
    finally:
        driver.quit()
        running.close()
