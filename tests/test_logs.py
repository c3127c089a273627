"""The log collector: presets on sample logs of real servers, exact counts through rotations
(driving update() and through the running exporter), garbage, label folding, memory."""

import json
import logging
import math
import os
import random
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import requests
from helpers import samples as values

from whisper_exporter import wiring as daemon
from whisper_exporter.collectors.logs import LogsCollector
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.logfiles import parse as logparse
from whisper_exporter.logfiles.parse import LineError, make_parser
from whisper_exporter.runtime import requests as request_metrics
from whisper_exporter.runtime.collector import plugins

DATA = Path(__file__).parent / "data" / "logs"


def logs_config(files, **options):
    others = {name: {"enabled": False} for name in plugins() if name != "logs"}
    return from_dict({"listen": "127.0.0.1:0",
                      "collectors": {**others, "logs": {"enabled": True, "files": files, **options}}})


def collector(files, **options):
    return LogsCollector(logs_config(files, **options).collectors.logs)


def requests_by(v, **match):
    """Sum of whisper_requests_total over series whose labels include `match`."""
    total = 0.0
    for (name, labels), value in v.items():
        if name == "whisper_requests_total" and all((k, m) in labels for k, m in match.items()):
            total += value
    return total


def sample(v, name, **labels):
    return v.get((name, tuple(sorted(labels.items()))))


def append(path, *lines):
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def req(**fields):
    base = {"path": "/v1/audio/transcriptions", "status": 200, "language": "en",
            "duration_ms": 500.0, "queue_ms": 5.0, "inference_ms": 400.0, "audio_seconds": 8.0}
    base.update(fields)
    return json.dumps(base)


# ---------------------------------------------------------------------------
# Presets on sample logs

def backfill(tmp_path, sample_file, fmt):
    path = tmp_path / sample_file
    shutil.copyfile(DATA / sample_file, path)
    c = collector([{"path": str(path), "format": fmt}], start_at="beginning")
    c.update()
    return values(c.families()), str(path)


def test_uvicorn_access_preset_on_a_real_faster_whisper_server_log(tmp_path):
    """tests/data/logs/uvicorn-access.log is faster-whisper-server's own output (stdout and
    stderr), with a traceback from the 500; requests: GET /health, two transcriptions (one
    with a query string), an invalid file (500), a missing path (404), no file (422),
    an unknown model (400)."""
    v, path = backfill(tmp_path, "uvicorn-access.log", "uvicorn-access")
    t = "/v1/audio/transcriptions"
    assert requests_by(v) == 7
    assert sample(v, "whisper_requests_total", endpoint="/health", status_code="200", language="unknown") == 1
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="unknown") == 2
    for status in ("500", "422", "400"):
        assert sample(v, "whisper_requests_total", endpoint=t, status_code=status, language="unknown") == 1
    assert sample(v, "whisper_requests_total", endpoint="other", status_code="404", language="unknown") == 1
    assert sample(v, "whisper_exporter_log_label_folded_total", label="endpoint") == 1
    lines = len((DATA / "uvicorn-access.log").read_bytes().splitlines())
    assert sample(v, "whisper_exporter_log_lines_total", path=path) == lines
    assert sample(v, "whisper_exporter_log_lines_ignored_total", path=path) == lines - 7
    assert sum(n for (name, _), n in v.items() if name == "whisper_exporter_log_parse_errors_total") == 0


def test_json_request_preset(tmp_path):
    v, path = backfill(tmp_path, "json-request.jsonl", "json-request")
    t = "/v1/audio/transcriptions"
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="en") == 2
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="zh") == 1
    assert sample(v, "whisper_requests_total", endpoint="/v1/audio/translations", status_code="200", language="de") == 1
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="429", language="unknown") == 1
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="500", language="yue") == 1
    assert sample(v, "whisper_requests_total", endpoint="/health", status_code="200", language="unknown") == 1
    assert requests_by(v) == 7
    assert sample(v, "whisper_exporter_log_lines_ignored_total", path=path) == 2  # startup, model unloaded
    assert sample(v, "whisper_audio_processed_seconds_total", language="en") == pytest.approx(21.0)
    assert sample(v, "whisper_audio_processed_seconds_total", language="yue") == pytest.approx(3.2)
    # RTF: inference / audio; the 500 has no inference time, so its end-to-end time counts.
    assert sample(v, "whisper_realtime_factor_sum", language="en") == pytest.approx(1.18 / 11 + 0.7 / 10)
    assert sample(v, "whisper_realtime_factor_sum", language="yue") == pytest.approx(0.095 / 3.2)
    assert sample(v, "whisper_queue_wait_seconds_count") == 5
    assert sample(v, "whisper_queue_wait_seconds_sum") == pytest.approx((41.2 + 3.1 + 210 + 2 + 10) / 1000)
    assert sample(v, "whisper_queue_wait_seconds_bucket", le="0.2") == 4
    assert sample(v, "whisper_request_duration_seconds_count", endpoint=t) == 5
    assert sample(v, "whisper_request_duration_seconds_bucket", endpoint=t, le="1.5") == 5
    assert sample(v, "whisper_request_duration_seconds_bucket", endpoint=t, le="1.0") == 4
    assert sample(v, "whisper_inference_duration_seconds_count", language="de") == 1


def test_speaches_preset_counts_requests_from_access_lines_only(tmp_path):
    """speaches prints an ERROR line around transcriptions; those are not failures."""
    v, path = backfill(tmp_path, "speaches.log", "speaches")
    t = "/v1/audio/transcriptions"
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="unknown") == 4
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="404", language="unknown") == 1
    assert sample(v, "whisper_requests_total", endpoint="/v1/audio/translations", status_code="422",
                  language="unknown") == 1
    assert requests_by(v) == 8  # with /health and /v1/models
    assert requests_by(v, status_code="500") == 0
    assert sample(v, "whisper_audio_processed_seconds_total", language="unknown") == pytest.approx(48.2)
    assert sample(v, "whisper_inference_duration_seconds_count", language="unknown") == 3
    assert sample(v, "whisper_realtime_factor_sum", language="unknown") == pytest.approx(
        2.474519305999274 / 11 + 0.3381207660026848 / 4.2 + 1.5 / 30)
    assert sample(v, "whisper_audio_duration_seconds_count", language="unknown") == 4


def test_whispercpp_preset(tmp_path):
    v, _ = backfill(tmp_path, "whispercpp-server.log", "whispercpp")
    assert sample(v, "whisper_requests_total", endpoint="/inference", status_code="unknown", language="en") == 1
    assert sample(v, "whisper_requests_total", endpoint="/inference", status_code="unknown", language="de") == 1
    # lang = auto: the language is not known
    assert sample(v, "whisper_requests_total", endpoint="/inference", status_code="unknown", language="unknown") == 1
    assert sample(v, "whisper_requests_total", endpoint="/inference", status_code="error", language="unknown") == 1
    assert sample(v, "whisper_audio_processed_seconds_total", language="de") == 300.0
    assert sample(v, "whisper_audio_duration_seconds_bucket", language="en", le="15.0") == 1
    assert sample(v, "whisper_audio_duration_seconds_bucket", language="en", le="10.0") == 0


def test_uvicorn_lines_with_colours_and_gunicorn_prefix():
    p = make_parser("uvicorn-access")
    colour = b'\x1b[32mINFO\x1b[0m:     127.0.0.1:5 - "\x1b[1mPOST /asr?task=transcribe HTTP/1.1\x1b[0m" \x1b[32m200 OK\x1b[0m'
    assert p.parse(colour)[:2] == ("/asr?task=transcribe", "200")
    gunicorn = b'[2025-06-02 09:14:03 +0000] [8] [INFO] 10.0.0.1:5 - "POST /v1/audio/translations HTTP/1.0" 503'
    assert p.parse(gunicorn)[:2] == ("/v1/audio/translations", "503")
    assert p.parse(b"INFO:     Application startup complete.") is None


def test_the_exporters_own_requests_are_kept_out_of_user_traffic(tmp_path):
    """uvicorn prints the path with its query: the probe's marker keeps its requests apart."""
    from whisper_exporter.whisper import marker

    log = tmp_path / "access.log"
    log.write_text("")
    c = collector([{"path": str(log), "format": "uvicorn-access"}], start_at="beginning")
    append(log,
           'INFO:     127.0.0.1:1 - "POST /v1/audio/transcriptions HTTP/1.1" 200 OK',
           f'INFO:     127.0.0.1:2 - "POST /v1/audio/transcriptions?{marker.QUERY_STRING} HTTP/1.1" 200 OK',
           f'INFO:     127.0.0.1:3 - "POST /asr?task=transcribe&{marker.QUERY_STRING} HTTP/1.1" 500 Internal',
           'INFO:     127.0.0.1:4 - "POST /v1/audio/transcriptions HTTP/1.1" 500 Internal Server Error')
    c.update()
    v = values(c.families())
    assert requests_by(v) == 2  # the users' two
    assert requests_by(v, status_code="500") == 1
    assert sample(v, "whisper_canary_requests_seen_total", source="log") == 2


# ---------------------------------------------------------------------------
# Parsers: mapping, units, types

def test_json_dotted_paths_and_units():
    p = make_parser("json", fields={
        "endpoint": "http.path", "status_code": "http.status",
        "duration": {"field": "timing.total_us", "unit": "us"},
        "inference": {"field": "timing.infer_ms", "unit": "ms"},
        "audio_duration": "audio.seconds", "language": "lang"})
    r = p.parse(b'{"http": {"path": "/asr", "status": 201}, "timing": {"total_us": 2500000, "infer_ms": 1500}, '
                b'"audio": {"seconds": "12.5"}, "lang": "English"}')
    assert (r.endpoint, r.status_code, r.language) == ("/asr", 201, "English")
    assert r.duration == pytest.approx(2.5) and r.inference == pytest.approx(1.5) and r.audio_duration == 12.5
    # Missing fields are not observed; a non-object in the middle of a path is missing too.
    r = p.parse(b'{"http": "flat", "timing": {"total_us": 1}}')
    assert r.endpoint is None and r.status_code is None and r.duration == pytest.approx(1e-6)
    assert p.parse(b'{"unrelated": 1}') is None


@pytest.mark.parametrize("line, reason", [
    (b"not json", "invalid_json"),
    (b'{"duration": 1', "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'"a string"', "not_an_object"),
    (b'{"duration": "fast"}', "wrong_type"),
    (b'{"duration": true}', "wrong_type"),
    (b'{"duration": [1]}', "wrong_type"),
    (b'{"endpoint": 42}', "wrong_type"),
    (b'{"status_code": 200.5}', "wrong_type"),
    (b'{"language": {"code": "en"}}', "wrong_type"),
    (b'{"duration": -0.5}', "negative_value"),
    (b'{"audio_duration": "NaN"}', "not_finite"),
    (b'{"inference": "-Infinity"}', "not_finite"),
    (b'{"queue_wait": "1e999"}', "not_finite"),
    (b'{"endpoint": "/x\xff\xfe"}', "invalid_utf8"),
])
def test_json_bad_lines(line, reason):
    with pytest.raises(LineError) as info:
        make_parser("json").parse(line)
    assert info.value.reason == reason


def test_regex_format_with_mapped_groups_and_units():
    p = make_parser("regex", pattern=r'(?P<ep>/\S+) (?P<code>\d+) took=(?P<ms>[\d.]+)ms(?: lang=(?P<language>\w+))?',
                    fields={"endpoint": "ep", "status_code": "code", "duration": {"field": "ms", "unit": "ms"}})
    r = p.parse(b"GET /asr 200 took=1250ms lang=fr")
    assert (r.endpoint, r.status_code, r.duration, r.language) == ("/asr", "200", 1.25, "fr")
    r = p.parse(b"GET /asr 200 took=10ms")
    assert r.language is None
    assert p.parse(b"nothing here") is None
    with pytest.raises(LineError) as info:
        p.parse(b"GET /asr 200 took=1.2.3ms")
    assert info.value.reason == "wrong_type"
    with pytest.raises(LineError) as info:
        p.parse(b"\xff\xfe")
    assert info.value.reason == "invalid_utf8"


# ---------------------------------------------------------------------------
# Configuration

@pytest.mark.parametrize("entry, key, expected", [
    ({"path": "/x", "format": "yaml"}, "collectors.logs.files[0].format", "one of json, regex"),
    ({"format": "json"}, "collectors.logs.files[0].path", "a file or glob"),
    ({"path": "/x", "format": "regex"}, "collectors.logs.files[0].pattern", "regular expression"),
    ({"path": "/x", "format": "regex", "pattern": "("}, "collectors.logs.files[0].pattern", "invalid regular"),
    ({"path": "/x", "format": "regex", "pattern": "(?P<foo>x)"}, "collectors.logs.files[0].pattern", "named group"),
    ({"path": "/x", "fields": {"latency": "t"}}, "collectors.logs.files[0].fields.latency", "a record field"),
    ({"path": "/x", "fields": {"duration": {"field": "t", "unit": "h"}}},
     "collectors.logs.files[0].fields.duration.unit", "one of s, ms, us"),
    ({"path": "/x", "fields": {"duration": {"field": "t", "units": "ms"}}},
     "collectors.logs.files[0].fields.duration.units", "a known key"),
    ({"path": "/x", "fields": {"endpoint": {"field": "p", "unit": "ms"}}},
     "collectors.logs.files[0].fields", "only durations"),
    ({"path": "/x", "format": "uvicorn-access", "pattern": "x"}, "collectors.logs.files[0].fields", "preset"),
])
def test_bad_log_config_names_the_key(entry, key, expected):
    with pytest.raises(ConfigError) as info:
        from_dict({"collectors": {"logs": {"files": [entry]}}})
    assert info.value.key == key
    assert expected in info.value.expected


@pytest.mark.parametrize("logs, key", [
    ({"start_at": "middle"}, "collectors.logs.start_at"),
    ({"languages": ["en", "klingon"]}, "collectors.logs.languages[1]"),
    ({"status_codes": [200, 999]}, "collectors.logs.status_codes[1]"),
    ({"endpoints": ["v1/audio"]}, "collectors.logs.endpoints[0]"),
    ({"max_line_bytes": 0}, "collectors.logs.max_line_bytes"),
    ({"interval": "0s"}, "collectors.logs.interval"),
])
def test_bad_log_options(logs, key):
    with pytest.raises(ConfigError) as info:
        from_dict({"collectors": {"logs": logs}})
    assert info.value.key == key


# ---------------------------------------------------------------------------
# Exact counts through rotations, driving update()

def test_every_line_counted_once_through_every_kind_of_rotation(tmp_path):
    """Identical lines, the hardest case for telling files apart by content. Steps are
    20 ms apart: file times must tell an old rotation from a fresh copy (they do at 1 ms)."""
    log = tmp_path / "requests.jsonl"
    append(log, req(status=201), req(status=201))  # before start: not counted
    c = collector([{"path": str(log), "format": "json-request"}])

    def step():
        time.sleep(0.02)
        c.update()
    written = {"200": 0, "500": 0}

    def write(n, status=200):
        append(log, *[req(status=status) for _ in range(n)])
        written[str(status)] += n

    write(10)
    step()
    write(5, 500)
    os.rename(log, tmp_path / "requests.jsonl.1")  # rename + create, unread lines in the old file
    write(7)
    step()
    write(3)
    shutil.copyfile(log, tmp_path / "requests.jsonl.2")  # copytruncate, 3 lines unread
    os.truncate(log, 0)
    write(4, 500)
    step()
    write(2)
    log.unlink()  # delete + re-create
    step()
    write(6)
    step()
    log.write_text("")  # truncate in place
    step()
    with open(log, "a") as f:
        f.write('{"path": "/v1/audio/transcriptions", "status": 200, "dura')  # a partial line ...
    step()
    with open(log, "a") as f:
        f.write('tion_ms": 12}\n')  # ... completed later
    written["200"] += 1
    step()
    v = values(c.families())
    t = "/v1/audio/transcriptions"
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="en") == written["200"] - 1
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="unknown") == 1
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="500", language="en") == written["500"]
    assert requests_by(v, status_code="201") == 0
    total = written["200"] + written["500"]
    assert sample(v, "whisper_exporter_log_lines_total", path=str(log)) == total
    assert sample(v, "whisper_request_duration_seconds_count", endpoint=t) == total
    assert sample(v, "whisper_audio_processed_seconds_total", language="en") == pytest.approx(8.0 * (total - 1))
    assert sample(v, "whisper_exporter_log_rotations_total", path=str(log)) == 4
    assert sum(n for (name, _), n in v.items() if name == "whisper_exporter_log_parse_errors_total") == 0


def test_glob_follows_files_that_appear_later(tmp_path):
    (tmp_path / "a.log").write_text('INFO:     1.2.3.4:5 - "GET /health HTTP/1.1" 200 OK\n')
    c = collector([{"path": str(tmp_path / "*.log"), "format": "uvicorn-access"}])
    append(tmp_path / "b.log", 'INFO:     1.2.3.4:5 - "POST /asr HTTP/1.1" 500 Internal Server Error')
    append(tmp_path / "a.log", 'INFO:     1.2.3.4:5 - "POST /asr HTTP/1.1" 200 OK')
    c.update()
    v = values(c.families())
    assert requests_by(v) == 2
    assert sample(v, "whisper_requests_total", endpoint="/asr", status_code="500", language="unknown") == 1
    assert sample(v, "whisper_exporter_log_files", path=str(tmp_path / "*.log")) == 2


def test_garbage_mixed_into_the_log_is_counted_and_the_rest_is_exact(tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text("")
    c = collector([{"path": str(log), "format": "json-request"}], max_line_bytes=1 << 20)
    rng = random.Random(3)
    garbage = [
        (b"Traceback (most recent call last):", "invalid_json"),
        (b'{"path": "/v1/audio/transcriptions", "status": 200, "dura', "invalid_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"path": "/v1/audio/transcriptions", "status": "OK", "duration_ms": "slow"}', "wrong_type"),
        (b'{"path": ["/v1"], "status": 200}', "wrong_type"),
        (b'{"path": "/v1/audio/transcriptions", "status": 200, "duration_ms": -5}', "negative_value"),
        (b'{"path": "/v1/audio/transcriptions", "status": 200, "audio_seconds": "NaN"}', "not_finite"),
        (b'{"path": "/v1/audio/transcriptions", "status": 200, "duration_ms": NaN}', None),  # orjson: invalid
        (b'{"path": "/v1/\xc3\x28", "status": 200}', "invalid_utf8"),
        (b"\x00\x01\x02\xff binary", "invalid_utf8"),
        (b'{"a": "' + b"x" * (3 << 20) + b'"}', "line_too_long"),
    ]
    expected_errors = {}
    good = 0
    with open(log, "ab") as f:
        for i in range(600):
            if i % 50 == 25:
                line, reason = garbage[(i // 50) % len(garbage)]
                f.write(line + b"\n")
                if reason is None:
                    reason = "invalid_json" if logparse.JSON_LIBRARY == "orjson" else "not_finite"
                expected_errors[reason] = expected_errors.get(reason, 0) + 1
            else:
                f.write(req(language=rng.choice(["en", "de"])).encode() + b"\n")
                good += 1
        f.write(b"\n")  # a blank line: ignored, not an error
    c.update()
    v = values(c.families())
    p = str(log)
    assert requests_by(v) == good
    assert sample(v, "whisper_request_duration_seconds_count", endpoint="/v1/audio/transcriptions") == good
    for reason in logparse.REASONS:
        assert sample(v, "whisper_exporter_log_parse_errors_total", path=p, reason=reason) == \
            expected_errors.get(reason, 0), reason
    assert sample(v, "whisper_exporter_log_lines_total", path=p) == 600 + 1
    assert sample(v, "whisper_exporter_log_lines_ignored_total", path=p) == 1


def test_bad_lines_are_logged_rate_limited_without_their_content(tmp_path, caplog):
    log = tmp_path / "requests.jsonl"
    log.write_text("")
    c = collector([{"path": str(log), "format": "json"}])
    append(log, *[f"garbage number {i}" for i in range(100)])
    with caplog.at_level(logging.WARNING, logger="whisper_exporter.logs"):
        c.update()
    warnings = [r.getMessage() for r in caplog.records if r.name == "whisper_exporter.logs"]
    assert len(warnings) == 1
    # A glob may match a file that is not a log (a key file): its lines are never quoted.
    assert "invalid_json" in warnings[0] and "16 bytes" in warnings[0] and "garbage" not in warnings[0]


# ---------------------------------------------------------------------------
# Bounded labels

def test_unknown_values_fold_into_other_and_are_counted(tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text("")
    c = collector([{"path": str(log), "format": "json-request"}],
                  endpoints=["/v1/audio/transcriptions"], status_codes=[200, 500], languages=["en", "Chinese"])
    append(log,
           req(path="/v1/audio/transcriptions?model=x", language="English"),
           req(path="/v1/audio/transcriptions/", language="zh"),
           req(path="/admin/../etc", status=418, language="de"),
           req(language="xx-random", status="200 OK"),
           req(language="auto"))
    c.update()
    v = values(c.families())
    t = "/v1/audio/transcriptions"
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="en") == 1  # query stripped
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="zh") == 1  # trailing /
    assert sample(v, "whisper_requests_total", endpoint="other", status_code="other", language="other") == 1
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="other") == 1  # "200 OK"
    assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="unknown") == 1  # auto
    assert requests_by(v) == 5
    assert sample(v, "whisper_exporter_log_label_folded_total", label="endpoint") == 1
    assert sample(v, "whisper_exporter_log_label_folded_total", label="status_code") == 1
    assert sample(v, "whisper_exporter_log_label_folded_total", label="language") == 2


def test_language_names_and_locales_map_to_whisper_codes():
    assert logparse.language_code("english") == "en"
    assert logparse.language_code("Cantonese") == "yue"
    assert logparse.language_code("pt-BR") == "pt"
    assert logparse.language_code("zh_TW") == "zh"
    assert logparse.language_code("mandarin") == "zh"
    assert logparse.language_code("elvish") is None
    assert len(logparse.WHISPER_LANGUAGES) == 100


def test_a_flood_of_random_values_keeps_series_and_memory_bounded(tmp_path):
    c = collector([{"path": str(tmp_path / "none.log"), "format": "json-request"}], max_series=300)
    source = c.sources[0]
    rng = random.Random(5)

    def batch(n):
        lines = []
        for _ in range(n):
            lines.append(json.dumps({
                "path": "/%x" % rng.getrandbits(64) if rng.random() < 0.5 else "/v1/audio/transcriptions",
                "status": rng.randrange(100, 600) if rng.random() < 0.5 else rng.getrandbits(40),
                "language": "%x" % rng.getrandbits(48) if rng.random() < 0.5 else rng.choice(list(logparse.WHISPER_LANGUAGES)),
                "duration_ms": rng.random() * 1000, "audio_seconds": rng.random() * 30,
                "inference_ms": rng.random() * 900}).encode())
        return lines

    c.feed(source, batch(30_000))  # warm up: caches fill to their cap, series to max_series
    flood = [batch(10_000) for _ in range(5)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for lines in flood:
        c.feed(source, lines)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    v = values(c.families())
    series = [k for k in v if k[0] == "whisper_requests_total"]
    assert len(series) <= 301
    assert requests_by(v) == 80_000
    assert sample(v, "whisper_exporter_log_label_folded_total", label="series") > 0
    assert sample(v, "whisper_exporter_log_label_folded_total", label="endpoint") > 30_000
    assert len([k for k in v if k[0] == "whisper_realtime_factor_count"]) <= 102  # languages + unknown + other
    assert after - before < 64 * 1024, f"grew by {after - before} bytes over 50,000 random lines"


# ---------------------------------------------------------------------------
# Self-metrics, and the running exporter

def test_self_metrics(tmp_path):
    log = tmp_path / "requests.jsonl"
    c = collector([{"path": str(log), "format": "json-request"}])
    v = values(c.families())
    assert sample(v, "whisper_exporter_log_files", path=str(log)) == 0
    assert sample(v, "whisper_exporter_log_last_line_timestamp_seconds", path=str(log)) is None
    line = req()
    append(log, line, line)
    before = time.time()
    c.update()
    v = values(c.families())
    assert sample(v, "whisper_exporter_log_files", path=str(log)) == 1
    assert sample(v, "whisper_exporter_log_read_bytes_total", path=str(log)) == 2 * (len(line) + 1)
    assert sample(v, "whisper_exporter_log_last_line_timestamp_seconds", path=str(log)) >= before - 1
    assert 0 <= sample(v, "whisper_exporter_log_seconds_since_last_line", path=str(log)) < 5
    assert c.status == f"{log} (json-request preset): 1 file(s), 2 lines"  # the preset by name, not "(json)"


def test_status_names_json_and_regex_by_format(tmp_path):
    c = collector([{"path": str(tmp_path / "a.jsonl"), "format": "json"},
                   {"path": str(tmp_path / "b.log"), "format": "regex", "pattern": r"took (?P<duration>\S+)"}])
    assert c.status == f"{tmp_path}/a.jsonl (json): no file yet, 0 lines; {tmp_path}/b.log (regex): no file yet, 0 lines"


def test_through_the_running_exporter(tmp_path):
    log = tmp_path / "access.log"
    append(log, 'INFO:     1.2.3.4:5 - "POST /v1/audio/transcriptions HTTP/1.1" 200 OK')  # before start
    config = logs_config([{"path": str(log), "format": "uvicorn-access"}], interval="100ms")
    running = daemon.start(config)

    def scrape_when(lines):
        """The exposition once the collector has read `lines` lines (a rotation waits for the
        file before it to be seen: a file that lives less than one poll cannot be)."""
        deadline = time.monotonic() + 15
        while True:
            v = values(requests.get(running.url + "/metrics", timeout=5).text)
            if sample(v, "whisper_exporter_log_lines_total", path=str(log)) == lines or time.monotonic() > deadline:
                return v
            time.sleep(0.05)

    try:
        line = 'INFO:     1.2.3.4:5 - "POST /v1/audio/transcriptions HTTP/1.1" {} X'
        append(log, *[line.format(200)] * 40, *[line.format(503)] * 3)
        os.rename(log, tmp_path / "access.log.1")  # unread lines in the renamed file
        append(log, *[line.format(200)] * 5)
        scrape_when(48)
        append(log, *[line.format(200)] * 2)
        shutil.copyfile(log, tmp_path / "access.log.2")  # copytruncate, 2 lines unread
        os.truncate(log, 0)
        append(log, "INFO:     Shutting down", *[line.format(429)] * 2)
        v = scrape_when(53)
        t = "/v1/audio/transcriptions"
        assert sample(v, "whisper_requests_total", endpoint=t, status_code="200", language="unknown") == 47
        assert sample(v, "whisper_requests_total", endpoint=t, status_code="503", language="unknown") == 3
        assert sample(v, "whisper_requests_total", endpoint=t, status_code="429", language="unknown") == 2
        assert sample(v, "whisper_exporter_log_lines_total", path=str(log)) == 53
        assert sample(v, "whisper_exporter_log_lines_ignored_total", path=str(log)) == 1
        assert sample(v, "whisper_exporter_collector_up", collector="logs") == 1
    finally:
        running.close()


def test_histogram_buckets_suit_asr():
    assert request_metrics.LATENCY_BUCKETS[0] <= 0.05 and request_metrics.LATENCY_BUCKETS[-1] >= 120
    assert request_metrics.RTF_BUCKETS[0] == 0.01 and request_metrics.RTF_BUCKETS[-1] == 10
    assert 0.8 in request_metrics.RTF_BUCKETS and 0.2 in request_metrics.QUEUE_BUCKETS
    assert all(a < b for a, b in zip(request_metrics.LATENCY_BUCKETS, request_metrics.LATENCY_BUCKETS[1:]))
    assert not any(math.isinf(b) for b in request_metrics.AUDIO_BUCKETS)
