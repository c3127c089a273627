from pathlib import Path

import pytest

from whisper_exporter import config
from whisper_exporter.config import ConfigError, from_dict, load, parse_duration, parse_listen

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "example.yml"


def test_defaults_are_the_documented_ones():
    c = load(None)
    assert c.listen == "0.0.0.0:10111"
    assert c.collectors.gpu.enabled and c.collectors.process.enabled
    assert c.collectors.gpu.interval == 5.0
    assert c.service.url == "http://127.0.0.1:8000"


def test_file_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("collectors:\n  gpu:\n    interval: 2s\n    devices: [0, 1]\n")
    c = load(str(path))
    assert c.collectors.gpu.interval == 2.0
    assert c.collectors.gpu.devices == [0, 1]
    assert c.collectors.gpu.timeout == 3.0  # untouched default
    assert c.collectors.process.match is None and c.collectors.process.port is None
    assert c.source == str(path)


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("# nothing\n")
    assert load(str(path)).listen == config.DEFAULT_LISTEN


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("collectors:\n  gpu:\n    interval: 5x\n", "collectors.gpu.interval", "a duration"),
        ("collectors:\n  gpu:\n    interval: 0s\n", "collectors.gpu.interval", "greater than 0"),
        ("collectors:\n  gpu:\n    intervall: 5s\n", "collectors.gpu.intervall", "a known key"),
        ("collectors:\n  sound:\n    enabled: true\n", "collectors.sound", "a known key"),
        ("listen: localhost\n", "listen", "HOST:PORT"),
        ("listen: 0.0.0.0:70000\n", "listen", "HOST:PORT"),
        ("service:\n  api: grpc\n", "service.api", "one of openai"),
        ("service:\n  url: ftp://x\n", "service.url", "http"),
        ("collectors:\n  process:\n    match: '(['\n", "collectors.process.match", "regular expression"),
        ("collectors:\n  process:\n    pid: abc\n", "collectors.process.pid", "an integer"),
        ("collectors:\n  gpu:\n    devices: [0, a]\n", "collectors.gpu.devices[1]", "an integer"),
        ("collectors:\n  gpu:\n    enabled: yes please\n", "collectors.gpu.enabled", "true, false or auto"),
        ("log_level: loud\n", "log_level", "one of debug"),
        ("- just\n- a list\n", "", "a mapping"),
        ("collectors: [\n", "", "valid YAML at line"),
    ],
)
def test_bad_config_names_file_key_and_expectation(tmp_path, text, key, expected):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    err = info.value
    assert err.key == key
    assert expected in err.expected
    assert str(path) in str(err)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "nope.yml"))
    assert "readable file" in str(info.value)


@pytest.mark.parametrize("text, seconds", [("15s", 15), ("500ms", 0.5), ("2m", 120), ("1h", 3600), (7, 7), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "-1s", "s", "", True, -3])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9") == ("127.0.0.1", 9)
    assert parse_listen(":10111") == ("0.0.0.0", 10111)
    assert parse_listen("[::1]:10111") == ("::1", 10111)
    with pytest.raises(ValueError):
        parse_listen("[::zz]:1")


def test_example_config_is_valid_and_documents_every_key():
    example = load(str(EXAMPLE))
    assert example.source == str(EXAMPLE)
    text = EXAMPLE.read_text()

    def keys(obj, prefix=""):
        import dataclasses

        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            value = getattr(obj, f.name)
            yield f.name
            if dataclasses.is_dataclass(value):
                yield from keys(value)

    missing = [k for k in keys(example) if f"{k}:" not in text]
    assert missing == []


def test_masked_hides_secret_headers():
    c = from_dict({"service": {"headers": {"Authorization": "Bearer sk-123", "X-Team": "asr"}}})
    shown = config.masked(c)
    assert shown["service"]["headers"] == {"Authorization": "<masked>", "X-Team": "asr"}
    assert "sk-123" not in repr(shown)


def test_masked_hides_a_password_in_the_service_url():
    c = from_dict({"service": {"url": "https://asr:hunter2@whisper.internal:8443/base"}})
    assert config.masked(c)["service"]["url"] == "https://asr:<masked>@whisper.internal:8443/base"
    assert config.masked_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"


def test_the_loader_validates_the_sections_it_is_handed(tmp_path):
    """Configuration knows no collector: the caller (the runtime, the CLI) hands it the sections."""
    import dataclasses

    @dataclasses.dataclass
    class Echo:
        enabled: bool = False
        interval: config.Duration = config.Duration(5)
        timeout: config.Duration = config.Duration(1)
        word: str = "hi"

    c = from_dict({"collectors": {"echo": {"word": "ho"}}}, sections={"echo": Echo})
    assert [name for name, _ in c.collectors.items()] == ["echo"] and c.collectors.echo.word == "ho"
    with pytest.raises(ConfigError) as err:  # a bundled collector's name is unknown to this loader
        from_dict({"collectors": {"gpu": {}}}, sections={"echo": Echo})
    assert err.value.key == "collectors.gpu"
    with pytest.raises(ConfigError) as err:
        from_dict({"collectors": {"echo": {"interval": "soon"}}}, sections={"echo": Echo})
    assert err.value.key == "collectors.echo.interval"
    assert load(None, sections={"echo": Echo}).collectors.echo.word == "hi"
    path = tmp_path / "c.yml"
    path.write_text("collectors:\n  echo: {word: yo}\n")
    assert load(str(path), sections={"echo": Echo}).collectors.echo.word == "yo"
