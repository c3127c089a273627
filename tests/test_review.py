"""The review page (/review) on the exporter's real HTTP server: off without authentication, 401
without credentials, cross-site and tokenless POSTs refused, audio by item id only with Range, a
submit writing one verified record, and the quality collector counting reviews and confirmed
hallucinations from those records."""
from __future__ import annotations

import json
import logging
import re
import resource
import signal
import time

import bcrypt
import jiwer
import pytest
import requests
from helpers import sample
from prometheus_client import generate_latest
from tap_helpers import wav_bytes

from whisper_exporter import wiring as daemon
from whisper_exporter.config import from_dict
from whisper_exporter.quality.sampling import append_reference, load_references
from whisper_exporter.runtime.exporter import make_registry
from whisper_exporter.web.webconfig import load_web_config

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()  # cost 4: fast tests
AUTH = ("ana", "s3cret")
SPOKEN = "the meeting moved to thursday"
HALLUCINATED = "Thank you for watching!"
OLD, NEW, GERMAN = "0123456789abcdef", "a1b2c3d4e5f60718", "feedfacecafe0001"


def queue_line(ident: str, audio: str, transcript: str, language: str, age: float) -> str:
    return json.dumps({"id": ident, "audio": audio, "transcript": transcript, "language": language,
                       "duration": 2.0, "duration_band": "0-5s", "sampled_at": time.time() - age}) + "\n"


@pytest.fixture
def files(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir(mode=0o700)
    for name in ("old.wav", "new.wav", "de.wav"):
        (samples / name).write_bytes(wav_bytes(2.0))
    queue = tmp_path / "review" / "queue.jsonl"
    queue.parent.mkdir(mode=0o700)
    queue.write_text(queue_line(NEW, str(samples / "new.wav"), SPOKEN, "en", 60)
                     + queue_line(OLD, str(samples / "old.wav"), HALLUCINATED, "en", 7200)
                     + queue_line(GERMAN, str(samples / "de.wav"), "guten morgen", "de", 600))
    queue.chmod(0o600)
    return tmp_path


@pytest.fixture
def exporter(files):
    started = []

    def start(users: bool = True):
        config = from_dict({"listen": "127.0.0.1:0", "collectors": {
            "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
            "quality": {"enabled": True, "production": {"queue": str(files / "review" / "queue.jsonl"),
                                                        "references": str(files / "review" / "verified.jsonl")}}}},
            source=str(files / "config.yml"))
        web = None
        if users:
            (files / "web.yml").write_text(f"basic_auth_users:\n  ana: '{HASH}'\n")
            web = load_web_config(str(files / "web.yml"))
        running = daemon.start(config, web=web)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def token(page: str) -> str:
    found = re.search(r'name="token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def post(running, data: dict, **headers: str) -> requests.Response:
    headers.setdefault("Origin", running.url)
    return requests.post(running.url + "/review/submit", data=data, auth=AUTH, headers=headers,
                         allow_redirects=False, timeout=10)


def records(files) -> list[dict]:
    path = files / "review" / "verified.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def quality(running):
    (collector,) = [c for c, s in running.scheduler.entries if s.name == "quality"]
    return collector


def scrape(running) -> str:
    return generate_latest(make_registry(running.scheduler)).decode()


def test_without_authentication_in_the_web_config_the_page_is_off_and_says_which_keys(exporter):
    running = exporter(users=False)
    for path in ("/review", f"/review/audio/{OLD}"):
        answer = requests.get(running.url + path, timeout=10)
        assert answer.status_code == 403
        assert "basic_auth_users" in answer.text and "client_auth_type" in answer.text
        assert "RIFF" not in answer.text and SPOKEN not in answer.text


def test_page_audio_and_submit_answer_401_without_credentials(exporter):
    running = exporter()
    assert requests.get(running.url + "/review", timeout=10).status_code == 401
    assert requests.get(running.url + f"/review/audio/{OLD}", timeout=10).status_code == 401
    assert requests.get(running.url + "/review", auth=("ana", "wrong"), timeout=10).status_code == 401
    answer = requests.post(running.url + "/review/submit", data={"id": OLD, "action": "submit"}, timeout=10)
    assert answer.status_code == 401


def test_the_page_shows_pending_items_oldest_first_and_filters_by_language(exporter):
    running = exporter()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10)
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    text = page.text
    assert 'id="left">3<' in text
    assert f'<code id="item">{OLD}</code>' in text  # the oldest first
    assert text.index(OLD) < text.index(GERMAN) < text.index(NEW)
    assert "Thank you for watching!" in text and 'value="en" selected' in text
    assert "Alt+K" in text and "play / pause" in text  # the shortcuts are on the page
    german = requests.get(running.url + "/review?language=de", auth=AUTH, timeout=10).text
    assert f'<code id="item">{GERMAN}</code>' in german and 'id="left">1<' in german and OLD not in german


def test_audio_is_served_by_item_id_with_its_type_and_range(exporter, files):
    running = exporter()
    data = (files / "samples" / "old.wav").read_bytes()
    url = running.url + f"/review/audio/{OLD}"
    whole = requests.get(url, auth=AUTH, timeout=10)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["Content-Type"] == "audio/wav" and whole.headers["Accept-Ranges"] == "bytes"
    part = requests.get(url, auth=AUTH, headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = requests.get(url, auth=AUTH, headers={"Range": "bytes=-44"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-44:]
    beyond = requests.get(url, auth=AUTH, headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert beyond.status_code == 416
    head = requests.head(url, auth=AUTH, timeout=10)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data)) and head.content == b""


@pytest.mark.parametrize("path", ["..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%2E%2E", "x.wav", "a" * 65])
def test_an_id_that_names_a_path_is_refused(exporter, path):
    running = exporter()
    answer = requests.get(running.url + "/review/audio/" + path, auth=AUTH, timeout=10)
    assert answer.status_code in (400, 404)
    assert "root:" not in answer.text and not answer.content.startswith(b"RIFF")


def test_an_id_not_in_the_queue_or_audio_that_became_a_link_is_not_served(exporter, files):
    running = exporter()
    assert requests.get(running.url + "/review/audio/deadbeefdeadbeef", auth=AUTH, timeout=10).status_code == 404
    new = files / "samples" / "new.wav"
    new.unlink()
    new.symlink_to("/etc/passwd")  # the queued path now points elsewhere: not followed
    answer = requests.get(running.url + f"/review/audio/{NEW}", auth=AUTH, timeout=10)
    assert answer.status_code == 404 and "root:" not in answer.text


def test_a_submit_writes_one_verified_record_and_logs_no_text(exporter, files, caplog):
    running = exporter()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    with caplog.at_level(logging.DEBUG, logger="whisper_exporter"):
        answer = post(running, {"id": OLD, "token": token(page), "filter": "", "action": "submit",
                                "reference": "  we moved the\r\nmeeting ", "language": "de"})
    assert answer.status_code == 303 and answer.headers["Location"] == "../review"
    (record,) = records(files)
    assert record["id"] == OLD and record["reference"] == "we moved the meeting" and record["language"] == "de"
    assert record["reviewer"] == "ana" and record["source"] == "page" and record["original"] == HALLUCINATED
    assert 0 <= record["seconds"] < 3600 and abs(record["reviewed_at"] - time.time()) < 3600
    assert "flags" not in record
    refs, problems = load_references(str(files / "review" / "verified.jsonl"))
    assert problems == [] and refs[OLD].reviewer == "ana" and refs[OLD].language == "de"
    assert "ana verified item " + OLD in caplog.text
    assert "meeting" not in caplog.text and "Thank you" not in caplog.text  # never what was said
    after = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    assert 'id="left">2<' in after and f'<code id="item">{GERMAN}</code>' in after
    text = scrape(running)
    assert sample(text, "whisper_quality_review_pending_items") == 2
    assert 500 < sample(text, "whisper_quality_review_oldest_pending_age_seconds") < 3600  # the German one, 600 s


def test_a_flag_needs_no_transcript_and_no_speech_empties_it(exporter, files):
    running = exporter()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    answer = post(running, {"id": OLD, "token": token(page), "action": "submit", "reference": HALLUCINATED,
                            "language": "en", "flag": ["no_speech", "personal_data"]})
    assert answer.status_code == 303
    (record,) = records(files)
    assert record["reference"] == "" and record["flags"] == ["no_speech", "personal_data"]
    assert record["original"] == HALLUCINATED


def test_cross_site_and_tokenless_posts_are_refused(exporter, files):
    running = exporter()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    good = {"id": OLD, "token": token(page), "action": "submit", "reference": "x y", "language": "en"}
    assert post(running, good, Origin="http://evil.example").status_code == 403
    assert post(running, good, Origin="null").status_code == 403
    assert post(running, good, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert post(running, {**good, "token": ""}).status_code == 403
    genuine = token(page)
    forged = genuine[:-1] + ("1" if genuine.endswith("0") else "0")  # one digit off, never the same
    assert post(running, {**good, "token": forged}).status_code == 403
    assert post(running, {**good, "id": NEW}).status_code == 403  # a token names its item
    assert post(running, {**good, "flag": "maybe"}).status_code == 400
    assert records(files) == []  # nothing written by any of them
    assert post(running, good).status_code == 303 and len(records(files)) == 1


def test_a_form_over_the_body_limit_gets_413_and_one_over_its_own_limits_400_and_writes_nothing(exporter, files):
    """The review form is the one request body the metrics port reads: a body over MAX_BODY, sized
    up front or chunked with no length, gets 413 without reaching the page, and the page serves on."""
    from whisper_exporter.web.connections import MAX_BODY

    running = exporter()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    good = {"id": OLD, "token": token(page), "action": "submit", "reference": "x y", "language": "en"}
    huge = {**good, "reference": "word " * (MAX_BODY // 5 + 1)}
    assert post(running, huge).status_code == 413

    def chunks():
        for _ in range(MAX_BODY // 4096 + 8):
            yield b"reference=" + b"w" * 4086

    chunked = requests.post(running.url + "/review/submit", data=chunks(), auth=AUTH, timeout=10,
                            headers={"Origin": running.url, "Content-Type": "application/x-www-form-urlencoded"})
    assert chunked.status_code == 413 and chunked.request.headers.get("Transfer-Encoding") == "chunked"
    # Under the body limit, the form's own limits: 20 fields, a transcript of 20,000 characters.
    many = post(running, {**good, **{f"x{n}": "1" for n in range(20)}})
    assert many.status_code == 400 and "too many fields" in many.text
    long = post(running, {**good, "reference": "a" * 20001})
    assert long.status_code == 400 and "20000" in long.text
    assert records(files) == []
    assert post(running, good).status_code == 303 and len(records(files)) == 1  # still serving


def test_skip_counts_and_shows_the_next_item(exporter, files):
    running = exporter()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    assert post(running, {"id": OLD, "token": token(page), "action": "skip"}).status_code == 303
    after = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    assert f'<code id="item">{GERMAN}</code>' in after and 'id="left">3<' in after  # skipped, still pending
    assert records(files) == []
    assert sample(scrape(running), "whisper_quality_reviews_total", result="skipped") == 1


def test_a_full_disk_refuses_the_review_and_leaves_no_partial_record(exporter, files):
    running = exporter()
    path = files / "review" / "verified.jsonl"
    append_reference(str(path), GERMAN, "guten morgen", "de")
    before = path.read_bytes()
    page = requests.get(running.url + "/review", auth=AUTH, timeout=10).text
    # The file-size limit stands in for a full disk: a real short write, then EFBIG.
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 20, old_limit[1]))
    try:
        answer = post(running, {"id": OLD, "token": token(page), "action": "submit", "reference": "a longer "
                                "transcript than the room left", "language": "en"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert answer.status_code == 503 and "Nothing was written" in answer.text
    assert path.read_bytes() == before  # cut back to the whole records
    assert post(running, {"id": OLD, "token": token(page), "action": "submit", "reference": "again",
                          "language": "en"}).status_code == 303
    assert [r["id"] for r in records(files)] == [GERMAN, OLD]


def test_the_quality_collector_scores_verified_records_and_counts_flags_and_confirmed_hallucinations(exporter, files):
    running = exporter()
    collector = quality(running)
    collector.update()  # the queue's languages go out at 0
    path = str(files / "review" / "verified.jsonl")
    corrected = "the meeting moved to Thursday, at noon."
    append_reference(path, NEW, corrected, "en", reviewer="ana", source="page", original=SPOKEN)
    append_reference(path, OLD, "", "en", flags=["no_speech"], reviewer="ana", source="label-studio")
    append_reference(path, GERMAN, "", None, flags=["unintelligible"], reviewer="bo")
    collector.update()
    text = scrape(running)
    # The one verified item is scored against an independent computation on the corrected text;
    # the flagged ones are not scored.
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    truth = jiwer.process_words(norm(corrected), norm(SPOKEN))
    errors = sum(sample(text, "whisper_quality_errors_total", set="production", language="en", type=t) or 0
                 for t in ("substitution", "deletion", "insertion"))
    assert errors == truth.substitutions + truth.deletions + truth.insertions == 2
    assert sample(text, "whisper_quality_utterances_total", set="production", language="en", result="scored") == 1
    assert sample(text, "whisper_quality_reviews_total", result="verified") == 1
    assert sample(text, "whisper_quality_reviews_total", result="flagged", flag="no_speech") == 1
    assert sample(text, "whisper_quality_reviews_total", result="flagged", flag="unintelligible") == 1
    assert sample(text, "whisper_quality_verified_items_total", language="en") == 1
    assert sample(text, "whisper_quality_verified_items_total", language="de") == 0
    assert sample(text, "whisper_hallucination_confirmed_total", language="en") == 1
    assert sample(text, "whisper_hallucination_confirmed_total", language="de") == 0
    # "Thank you for watching!" is a known phrase: suspected, and confirmed by the reviewer.
    assert sample(text, "whisper_hallucination_review_total", language="en", suspected="true",
                  confirmed="true") == 1
    assert sample(text, "whisper_hallucination_review_total", language="en", suspected="false",
                  confirmed="false") == 1
    assert sample(text, "whisper_hallucination_review_total", language="de", suspected="false",
                  confirmed="false") == 0  # unintelligible: no verdict
    assert sample(text, "whisper_quality_review_pending_items") == 0
    assert sample(text, "whisper_quality_review_queue_items") == 0  # all taken off the queue


def test_records_with_flags_parse_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "verified.jsonl"
    path.write_text("\n".join(json.dumps(o) for o in (
        {"id": "a", "reference": "", "flags": ["no_speech"], "reviewer": "ana", "seconds": 3.5,
         "original": "hi", "reviewed_at": 1.0, "source": "page", "note": "n"},
        {"id": "b", "reference": ""},
        {"id": "c", "reference": "x", "flags": ["sneeze"]},
        {"id": "d", "reference": "x", "seconds": -1},
        {"id": "e", "reference": "x", "source": "email"},
    )) + "\n")
    refs, problems = load_references(str(path))
    assert list(refs) == ["a"] and refs["a"].flags == ("no_speech",) and refs["a"].seconds == 3.5
    assert [p.line for p in problems] == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        append_reference(str(path), "f", "")
    with pytest.raises(ValueError):
        append_reference(str(path), "f", "x", flags=["sneeze"])


def test_an_empty_queue_at_start_is_the_one_queue_the_tap_fills_and_the_quality_run_empties(tmp_path):
    """An empty ReviewQueue is falsy (len 0): the quality collector built a second one on the same
    file, so the queue the tap appends to never saw items go, and looked full for ever."""
    from whisper_exporter.quality.sampling import QueueItem
    from whisper_exporter.runtime.shared import Shared

    queue, refs = tmp_path / "review" / "queue.jsonl", tmp_path / "review" / "verified.jsonl"
    config = from_dict({"collectors": {"quality": {"enabled": True, "production": {
        "queue": str(queue), "references": str(refs), "max_queue": 1}}}}, source=str(tmp_path / "config.yml"))
    shared = Shared.build(config)
    import collectors.quality as quality_module

    collector = quality_module.make(config.collectors.quality, shared)
    item = QueueItem(OLD, str(tmp_path / "a.wav"), SPOKEN, "en", 2.0, "0-5s", time.time())
    assert shared.review_queue.add(item)  # what the tap does
    collector.update()  # seeds en
    append_reference(str(refs), OLD, SPOKEN, "en")
    collector.update()  # scores it and takes it off the queue
    assert len(shared.review_queue) == 0
    later = QueueItem(NEW, str(tmp_path / "b.wav"), SPOKEN, "en", 2.0, "0-5s", time.time())
    assert shared.review_queue.add(later)  # room again (max_queue 1)


def test_with_required_client_certificates_the_reviewer_is_the_certificates_name(files, tmp_path):
    from test_web import openssl

    pki = tmp_path / "pki"
    pki.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("bo", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=pki)
        (pki / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)
    config = from_dict({"listen": "127.0.0.1:0", "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
        "quality": {"enabled": True, "production": {"queue": str(files / "review" / "queue.jsonl"),
                                                    "references": str(files / "review" / "verified.jsonl")}}}},
        source=str(files / "config.yml"))
    tls = f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
    for auth, status in (("NoClientCert", 403), ("RequireAndVerifyClientCert", 200)):
        web = files / f"{auth}.yml"
        web.write_text(tls + f"  client_auth_type: {auth}\n  client_ca_file: {pki}/ca.crt\n")
        running = daemon.start(config, web=load_web_config(str(web)))
        try:
            url = running.url.replace("http://", "https://") + "/review"
            page = requests.get(url, cert=(str(pki / "bo.crt"), str(pki / "bo.key")), verify=str(pki / "ca.crt"),
                                timeout=10)
            assert page.status_code == status, page.text
            if status == 403:  # TLS alone is not authentication
                assert "client_auth_type" in page.text
                continue
            assert "Signed in as <b>bo</b>" in page.text
            answer = requests.post(url + "/submit", cert=(str(pki / "bo.crt"), str(pki / "bo.key")),
                                   verify=str(pki / "ca.crt"), allow_redirects=False, timeout=10,
                                   headers={"Origin": url.rsplit("/review", 1)[0]},
                                   data={"id": OLD, "token": token(page.text), "action": "submit",
                                         "reference": "hello", "language": "en"})
            assert answer.status_code == 303
            assert records(files)[-1]["reviewer"] == "bo"
        finally:
            running.close()


def test_basic_auth_added_or_removed_by_a_reload_opens_or_closes_the_review_page_at_once(files):
    """A reload applied new basic_auth_users to the requests (401 without them) but the review page
    and the status page kept the start-up's verdict on authentication: users added by a reload met
    403 "set basic_auth_users", and users removed left production text on an open status page."""
    from types import SimpleNamespace

    settings = {"listen": "127.0.0.1:0", "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
        "quality": {"enabled": True, "production": {"queue": str(files / "review" / "queue.jsonl"),
                                                    "references": str(files / "review" / "verified.jsonl")}}}}
    web = files / "web.yml"
    web.write_text("http_server_config:\n  headers:\n    X-Frame-Options: DENY\n")
    running = daemon.start(from_dict(settings, source=str(files / "config.yml")), web=load_web_config(str(web)),
                           load_config=lambda: from_dict(settings, source=str(files / "config.yml")),
                           load_web=lambda: load_web_config(str(web)))
    try:
        assert requests.get(running.url + "/review", auth=AUTH, timeout=10).status_code == 403

        web.write_text(f"basic_auth_users:\n  ana: '{HASH}'\n")
        assert running.reload() is None
        assert requests.get(running.url + "/review", timeout=10).status_code == 401
        page = requests.get(running.url + "/review", auth=AUTH, timeout=10)
        assert page.status_code == 200, page.text
        assert "Signed in as <b>ana</b>" in page.text

        web.write_text("http_server_config:\n  headers:\n    X-Frame-Options: DENY\n")
        assert running.reload() is None
        answer = requests.get(running.url + "/review", auth=AUTH, timeout=10)
        assert answer.status_code == 403 and "basic_auth_users" in answer.text
        said = SimpleNamespace(id="p1", language="en", unit="word", error_rate=0.5, score=object(), result="scored",
                               outcome="success", reference="my card number is 4111",
                               transcript="my card number is 4111", started=0.0, reason="")
        running.scheduler.shared.quality_view = SimpleNamespace(worst_items=lambda: {"production": [said]})
        status = requests.get(running.url + "/", timeout=10)
        assert status.status_code == 200 and "p1" in status.text
        assert "4111" not in status.text  # the page is open again: no production text on it
    finally:
        running.close()


def test_users_removed_by_a_reload_hide_production_text_on_the_status_page_again(files, caplog):
    """Started behind basic auth, the status page may show production text; a reload to a web
    config without users opened the port but left the page showing it."""
    from types import SimpleNamespace

    settings = {"listen": "127.0.0.1:0", "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False},
        "quality": {"enabled": True, "production": {"queue": str(files / "review" / "queue.jsonl"),
                                                    "references": str(files / "review" / "verified.jsonl")}}}}
    web = files / "web.yml"
    web.write_text(f"basic_auth_users:\n  ana: '{HASH}'\n")
    running = daemon.start(from_dict(settings, source=str(files / "config.yml")), web=load_web_config(str(web)),
                           load_config=lambda: from_dict(settings, source=str(files / "config.yml")),
                           load_web=lambda: load_web_config(str(web)))
    said = SimpleNamespace(id="p1", language="en", unit="word", error_rate=0.5, score=object(), result="scored",
                           outcome="success", reference="my card number is 4111",
                           transcript="my card number is 4111", started=0.0, reason="")
    try:
        running.scheduler.shared.quality_view = SimpleNamespace(worst_items=lambda: {"production": [said]})
        assert "4111" in requests.get(running.url + "/", auth=AUTH, timeout=10).text  # behind auth: shown
        web.write_text("{}\n")
        with caplog.at_level(logging.WARNING, logger="whisper_exporter"):
            assert running.reload() is None
        assert any("no longer requires authentication" in r.getMessage() and "/review" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        running.scheduler.shared.quality_view = SimpleNamespace(worst_items=lambda: {"production": [said]})
        status = requests.get(running.url + "/", timeout=10)
        assert status.status_code == 200 and "p1" in status.text
        assert "4111" not in status.text
    finally:
        running.close()


def review_section(text: str) -> str:
    """The status page's Review section (up to the next heading), or "" without one."""
    found = re.search(r"<h2>Review</h2>(.*?)(?=<h2>|$)", text, re.S)
    return found.group(1) if found else ""


def test_the_status_page_shows_the_review_queue_and_links_to_the_review_page(exporter, files):
    running = exporter()
    status = requests.get(running.url + "/", auth=AUTH, timeout=10).text
    section = review_section(status)
    assert "<b>3</b> production samples waiting for review (the oldest for 2 h)" in section, section
    assert "<b>0</b> verified" in section
    link = re.search(r'<a id="review-link" href="([^"]+)"', section)
    assert link, section
    page = requests.get(requests.compat.urljoin(running.url + "/", link.group(1)), auth=AUTH, timeout=10)
    assert page.status_code == 200 and 'id="left">3<' in page.text  # the link is the review page
    assert HALLUCINATED not in status and SPOKEN not in status  # the section counts, it shows no text

    answer = post(running, {"id": OLD, "token": token(page.text), "action": "submit", "reference": "hello",
                            "language": "en"})
    assert answer.status_code == 303
    skipped = post(running, {"id": GERMAN, "token": token(requests.get(
        running.url + f"/review?id={GERMAN}", auth=AUTH, timeout=10).text), "action": "skip"})
    assert skipped.status_code == 303
    section = review_section(requests.get(running.url + "/", auth=AUTH, timeout=10).text)
    assert "<b>2</b> production samples waiting" in section and "1 skipped" in section, section
    quality(running).update()  # the quality collector takes the verified record
    section = review_section(requests.get(running.url + "/", auth=AUTH, timeout=10).text)
    assert "<b>1</b> verified" in section, section


def test_without_authentication_the_status_page_says_how_to_turn_the_review_page_on(exporter):
    running = exporter(users=False)
    section = review_section(requests.get(running.url + "/", timeout=10).text)
    assert "<b>3</b> production samples waiting" in section, section
    assert 'id="review-off"' in section and "basic_auth_users" in section and "client_auth_type" in section
    assert 'href="review"' not in section  # no link to a page that answers 403


def test_without_a_review_queue_the_status_page_has_no_review_section(tmp_path):
    config = from_dict({"listen": "127.0.0.1:0", "collectors": {
        "gpu": {"enabled": False}, "process": {"enabled": False}, "probe": {"enabled": False}}},
        source=str(tmp_path / "config.yml"))
    running = daemon.start(config)
    try:
        text = requests.get(running.url + "/", timeout=10).text
        assert "<h2>Collectors</h2>" in text and review_section(text) == "" and 'href="review"' not in text
    finally:
        running.close()
