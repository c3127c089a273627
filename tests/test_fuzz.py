"""Property-based fuzzing of everything that reads untrusted input: no exception escapes a parser
except the one it documents (LineError for a log line, _BadResponse for an answer, ConfigError
for a configuration), and what it returns is well-formed."""
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisper_exporter.config import ConfigError, ServiceConfig, from_dict
from whisper_exporter.logfiles import parse as logparse
from whisper_exporter.logfiles.parse import LineError, Record
from whisper_exporter.whisper import clients

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-ish values, nested, including the awkward ones (NaN-like strings, huge numbers, bools).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40) | st.sampled_from(["NaN", "-1", "1e400", "", "0x10", "  7 "]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
record_keys = st.sampled_from(["path", "status", "language", "duration_ms", "queue_ms", "inference_ms",
                               "audio_seconds", "model", "error", "request", "x"])
request_objects = st.dictionaries(record_keys, json_values, max_size=9)

PARSERS = {name: logparse.make_parser(name) for name in logparse.PRESETS}
PARSERS["json-dotted"] = logparse.make_parser("json", fields={
    "endpoint": "request.path", "status_code": "response.status", "language": "meta.lang",
    "duration": {"field": "timing.total", "unit": "ms"}, "audio_duration": {"field": "audio.s", "unit": "s"},
})
PARSERS["regex"] = logparse.make_parser(
    "regex", r"(?P<endpoint>\S+) (?P<status_code>\S+) (?P<duration>\S+) (?P<language>\S+)")


PARSE_OUTCOMES = ("rejected", "not a request", "record")


def check_parse(parser, line: bytes) -> str:
    """What the parser made of `line`, one of PARSE_OUTCOMES, after checking what it must hold."""
    try:
        record = parser.parse(line)
    except LineError as err:
        assert err.reason  # every rejection says why, for the parse-errors counter
        return "rejected"
    if record is None:
        return "not a request"
    assert isinstance(record, Record)
    for value in (record.duration, record.queue_wait, record.inference, record.audio_duration):
        # Durations that reach the histograms are real, non-negative numbers.
        assert value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0), value
    return "record"


@pytest.mark.parametrize("name", sorted(PARSERS))
@FUZZ
@given(line=st.binary(max_size=300))
def test_log_parsers_take_any_bytes(name, line):
    assert check_parse(PARSERS[name], line) in PARSE_OUTCOMES


@pytest.mark.parametrize("name", ["json-request", "json-dotted"])
@FUZZ
@given(obj=request_objects | st.dictionaries(st.sampled_from(["request", "response", "timing", "meta", "audio"]),
                                             request_objects, max_size=5))
def test_json_parsers_take_any_object(name, obj):
    assert check_parse(PARSERS[name], json.dumps(obj, allow_nan=True).encode()) in PARSE_OUTCOMES


@pytest.mark.parametrize("name", ["uvicorn-access", "speaches", "whispercpp"])
@FUZZ
@given(method=st.text(max_size=8), path=st.text(max_size=40), status=st.text(max_size=6),
       seconds=st.text(max_size=10), lang=st.text(max_size=10))
def test_text_presets_take_near_miss_lines(name, method, path, status, seconds, lang):
    # Lines shaped like the real ones, with arbitrary text in each field.
    for line in (
        f'INFO:     127.0.0.1:5 - "{method} {path} HTTP/1.1" {status} OK',
        f"2025 INFO:speaches.executors.whisper: Transcribed {seconds} seconds of audio in {seconds} seconds",
        f"operator(): processing '{path}' (1 samples, {seconds} sec), 4 threads, 1 processors, lang = {lang}, task",
    ):
        assert check_parse(PARSERS[name], line.encode("utf-8", "surrogatepass")) in PARSE_OUTCOMES


CLIENTS = [clients.make_client(ServiceConfig(api=api)) for api in ("openai", "asr-webservice", "whispercpp")]


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: type(c).__name__)
@FUZZ
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "text/html", "", "application/x-garbage"]))
def test_server_answers_never_escape_the_parser(client, body, content_type):
    try:
        result = client._parse(body, content_type)
    except clients._BadResponse as err:
        assert str(err)
        return
    assert isinstance(result.text, str)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: type(c).__name__)
@FUZZ
@given(obj=st.fixed_dictionaries({}, optional={
    "text": json_values, "language": json_values, "duration": json_values,
    "segments": st.lists(st.dictionaries(st.sampled_from(
        ["text", "start", "end", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob"]),
        json_values, max_size=7) | json_values, max_size=4),
    "error": json_values, "detail": json_values,
}))
def test_transcription_shaped_answers(client, obj):
    body = json.dumps(obj, allow_nan=True).encode()
    try:
        result = client._parse(body, "application/json")
    except clients._BadResponse:
        return
    for segment in result.segments:
        for value in (segment.start, segment.end, segment.temperature, segment.avg_logprob,
                      segment.compression_ratio, segment.no_speech_prob):
            assert value is None or isinstance(value, float)


config_keys = st.sampled_from(["listen", "log_level", "service", "collectors", "gpu", "process", "logs", "probe",
                               "url", "api", "interval", "timeout", "enabled", "match", "pid", "files", "path",
                               "format", "fields", "canaries", "devices", "bogus"])
config_values = st.recursive(
    json_values, lambda inner: st.dictionaries(config_keys, inner, max_size=4), max_leaves=15)


@FUZZ
@given(data=st.dictionaries(config_keys, config_values, max_size=4) | json_values)
def test_configuration_errors_are_always_config_errors(data):
    try:
        from_dict(data, "fuzz.yml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yml: ")


manifest_columns = st.sampled_from(["audio", "reference", "language", "id", "duration", "duration_band",
                                    "audio_quality", "source", "tags", "text", "bogus"])


MANIFEST_OUTCOMES = ("refused", "loaded")


def check_manifest(path) -> str:
    """What the loader made of `path`, one of MANIFEST_OUTCOMES, after checking what each must hold."""
    from whisper_exporter.quality import manifest

    try:
        loaded = manifest.load(path, check_audio=False)
    except manifest.ManifestError as err:
        assert str(err)  # a manifest that cannot be used at all says why
        return "refused"
    # Every record read is either an item or a named problem with its line number.
    assert len(loaded.items) + len(loaded.problems) == loaded.lines
    for problem in loaded.problems:
        assert problem.line >= 1 and problem.message
    for item in loaded.items:
        assert item.reference.strip() and item.language and item.duration >= 0
    return "loaded"


@FUZZ
@given(lines=st.lists(st.dictionaries(manifest_columns, json_values, max_size=6).map(
    lambda d: json.dumps(d, allow_nan=True).encode()) | st.binary(max_size=80), max_size=8))
def test_jsonl_manifests_never_escape_the_loader(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "refs.jsonl"
    path.write_bytes(b"\n".join(lines))
    assert check_manifest(path) in MANIFEST_OUTCOMES


@FUZZ
@given(header=st.lists(manifest_columns, min_size=1, max_size=5),
       rows=st.lists(st.lists(st.text(max_size=12), max_size=6), max_size=6), raw=st.binary(max_size=60))
def test_csv_manifests_never_escape_the_loader(tmp_path_factory, header, rows, raw):
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("fuzz") / "refs.csv"
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass") + raw)
    assert check_manifest(path) in MANIFEST_OUTCOMES
