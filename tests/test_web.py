"""--web.config.file: TLS, mutual TLS, basic auth, headers, and clear errors for a bad file."""
import subprocess
import threading

import bcrypt
import pytest
import requests
from helpers import sample

from whisper_exporter import wiring as daemon
from whisper_exporter.config import ConfigError, from_dict
from whisper_exporter.runtime.scheduler import Scheduler
from whisper_exporter.web.webconfig import load_web_config


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d


HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()  # cost 4: fast tests


def write(tmp_path, text):
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def serve():
    started = []

    def start(web_path, health_open=False):
        config = from_dict({"listen": "127.0.0.1:0"})
        running = daemon.start(config, Scheduler([]), load_web_config(web_path), health_open=health_open)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def test_basic_auth(tmp_path, serve):
    running = serve(write(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n"))
    url = running.url + "/metrics"
    ok = requests.get(url, auth=("prom", "s3cret"), timeout=5)
    assert ok.status_code == 200 and "whisper_exporter_build_info" in ok.text
    wrong_password = requests.get(url, auth=("prom", "nope"), timeout=5)
    wrong_user = requests.get(url, auth=("mallory", "s3cret"), timeout=5)
    none = requests.get(url, timeout=5)
    for response in (wrong_password, wrong_user, none):
        assert response.status_code == 401
        assert response.text == "Unauthorized\n"  # the same answer, whichever part was wrong
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(running.url + "/", timeout=5).status_code == 401  # the page too
    assert requests.get(running.url + "/-/healthy", timeout=5).status_code == 401


def test_health_can_stay_open(tmp_path, serve):
    running = serve(write(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n"), health_open=True)
    assert requests.get(running.url + "/-/healthy", timeout=5).status_code == 200
    assert requests.get(running.url + "/metrics", timeout=5).status_code == 401


def test_successful_checks_are_cached(tmp_path, serve):
    slow = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(12)).decode()  # ~0.2 s per check
    running = serve(write(tmp_path, f"basic_auth_users:\n  prom: '{slow}'\n"))
    import time

    first = time.perf_counter()
    assert requests.get(running.url + "/metrics", auth=("prom", "s3cret"), timeout=10).status_code == 200
    first = time.perf_counter() - first
    again = time.perf_counter()
    for _ in range(5):
        assert requests.get(running.url + "/metrics", auth=("prom", "s3cret"), timeout=10).status_code == 200
    again = (time.perf_counter() - again) / 5
    assert again < first / 3, (first, again)


def test_tls(tmp_path, serve, pki):
    running = serve(write(tmp_path, f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"))
    assert running.url.startswith("https://")
    response = requests.get(running.url + "/metrics", verify=str(pki / "ca.crt"), timeout=5)
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(running.url + "/metrics", timeout=5)  # not trusted without our CA
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(running.url.replace("https", "http") + "/metrics", timeout=5)


def test_plain_client_cannot_stall_tls_accept(tmp_path, serve, pki):
    running = serve(write(tmp_path, f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"))
    import socket

    host, port = running.server.server_address[:2]
    idle = socket.create_connection((host, port))  # connects, never says hello
    try:
        response = requests.get(running.url + "/-/healthy", verify=str(pki / "ca.crt"), timeout=5)
        assert response.status_code == 200
    finally:
        idle.close()


def test_mutual_tls(tmp_path, serve, pki):
    running = serve(write(tmp_path, (
        "tls_server_config:\n"
        f"  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        f"  client_ca_file: {pki}/ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n"
        "  min_version: TLS12\n"
    )))
    ok = requests.get(running.url + "/metrics", verify=str(pki / "ca.crt"),
                      cert=(str(pki / "client.crt"), str(pki / "client.key")), timeout=5)
    assert ok.status_code == 200
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(running.url + "/metrics", verify=str(pki / "ca.crt"), timeout=5)


def test_response_headers(tmp_path, serve):
    running = serve(write(tmp_path, "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"))
    assert requests.get(running.url + "/", timeout=5).headers["X-Frame-Options"] == "deny"


@pytest.mark.parametrize("text, key, expected", [
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
     "tls_server_config.cert_file", "an existing file"),
    ("tls_server_config:\n  certfile: x\n", "tls_server_config.certfile", "a known key"),
    ("basic_auth_users:\n  prom: hunter2\n", "basic_auth_users.prom", "a bcrypt hash"),
    ("basic_auth_user:\n  prom: x\n", "basic_auth_user", "a known key"),
    ("basic_auth_users: [a]\n", "basic_auth_users", "a mapping"),
])
def test_bad_web_config(tmp_path, text, key, expected):
    with pytest.raises(ConfigError) as info:
        load_web_config(write(tmp_path, text))
    assert info.value.key == key
    assert expected in info.value.expected
    assert "hunter2" not in str(info.value)  # a plain password is never echoed


def test_bad_tls_choices(tmp_path, pki):
    base = f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
    with pytest.raises(ConfigError) as info:
        load_web_config(write(tmp_path, base + "  min_version: TLS14\n"))
    assert info.value.key == "tls_server_config.min_version"
    with pytest.raises(ConfigError) as info:
        load_web_config(write(tmp_path, base + "  client_auth_type: RequireAndVerifyClientCert\n"))
    assert info.value.key == "tls_server_config.client_ca_file"
    with pytest.raises(ConfigError) as info:
        load_web_config(write(tmp_path, f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/client.key\n"))
    assert info.value.key == "tls_server_config.cert_file"


def test_concurrent_authenticated_scrapes(tmp_path, serve):
    running = serve(write(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n"))
    failures = []

    def scrape():
        for _ in range(20):
            r = requests.get(running.url + "/metrics", auth=("prom", "s3cret"), timeout=10)
            if r.status_code != 200:
                failures.append(r.status_code)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def plain(start):
    return start(write_plain())


def write_plain():
    import tempfile

    path = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False)
    path.write("{}\n")
    path.close()
    return path.name


def raw(running, request: bytes) -> bytes:
    """What the server sends back to one raw request (it closes the connection after HTTP/1.0)."""
    import socket

    host, port = running.server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("method", ["DELETE", "POST", "PUT", "PATCH"])
def test_only_get_and_head_on_pages(serve, method):
    running = plain(serve)
    for path in ("/", "/metrics", "/-/healthy"):
        response = requests.request(method, running.url + path, timeout=5)
        assert response.status_code == 405, (method, path)
        assert response.headers["Allow"] == "GET, HEAD"
    assert requests.request(method, running.url + "/nope", timeout=5).status_code == 404


def test_unknown_method_is_an_error(serve):
    running = plain(serve)
    answer = raw(running, b"FOO / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer[:80]


@pytest.mark.parametrize("path", ["/", "/metrics", "/-/healthy"])
def test_head_answers_like_get_without_a_body(serve, path):
    running = plain(serve)
    answer = raw(running, f"HEAD {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"), head
    assert body == b""
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert length and int(length[0].split(b":")[1]) > 0  # the length a GET's body has


def test_name_filter_never_gives_an_empty_scrape(serve):
    running = plain(serve)
    only = requests.get(running.url + "/metrics?name[]=whisper_exporter_build_info", timeout=5)
    assert only.status_code == 200
    assert "whisper_exporter_build_info{" in only.text and "process_cpu_seconds_total" not in only.text
    nothing = requests.get(running.url + "/metrics?name[]=x", timeout=5)
    assert nothing.status_code == 400 and "x" in nothing.text
    gzipped = requests.get(running.url + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=5)
    assert gzipped.headers["Content-Encoding"] == "gzip" and "whisper_exporter_build_info" in gzipped.text


def test_password_longer_than_bcrypt_reads_is_refused_not_a_crash(tmp_path, serve):
    long = "p" * 100
    running = serve(write(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n"))
    for user in ("prom", "mallory"):
        response = requests.get(running.url + "/metrics", auth=(user, long), timeout=10)
        assert response.status_code == 401, (user, response.status_code)
    # bcrypt reads 72 bytes: a password whose first 72 bytes are right is still wrong.
    hashed = bcrypt.hashpw(b"q" * 72, bcrypt.gensalt(4)).decode()
    running = serve(write(tmp_path, f"basic_auth_users:\n  prom: '{hashed}'\n"))
    assert requests.get(running.url + "/metrics", auth=("prom", "q" * 72), timeout=10).status_code == 200
    assert requests.get(running.url + "/metrics", auth=("prom", "q" * 80), timeout=10).status_code == 401


def test_unknown_users_cost_what_configured_users_cost():
    """No timing in a test: the bcrypt cost an unknown user's check pays is read off the hash it
    is checked against, which must be one of the configured users' costs."""
    from whisper_exporter.web.webconfig import BasicAuth

    users = {"a": bcrypt.hashpw(b"x", bcrypt.gensalt(5)), "b": bcrypt.hashpw(b"y", bcrypt.gensalt(6))}
    auth = BasicAuth(lambda e, s: [b""], users)
    seen = []

    class Spy:  # the real bcrypt, recording the hash each check runs against
        def checkpw(self, password, hashed):
            seen.append(hashed[:7])
            return bcrypt.checkpw(password, hashed)

    auth._bcrypt = Spy()
    import base64

    # Each name's decoy is picked by an HMAC with a per-process key: with six names both costs
    # came up in only 31 of 32 runs; with 40, all but once in 2**39.
    for name in [f"unknown-{n}" for n in range(40)]:
        header = "Basic " + base64.b64encode(f"{name}:pw".encode()).decode()
        assert not auth._authorized(header)
    assert {h[4:6] for h in seen} <= {b"05", b"06"}
    assert {h[4:6] for h in seen} == {b"05", b"06"}  # both costs are used, as the users have both


@pytest.mark.parametrize("tls", [False, True])
def test_at_the_connection_limit_idle_connections_make_room(tmp_path, serve, pki, monkeypatch, tls):
    """Silent connections (no request; with TLS, not even a hello) beyond the limit: the longest
    idle are closed so that a scrape still gets in, and the count never passes the limit."""
    import socket

    from whisper_exporter.web import connections

    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 16)
    text = f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n" if tls else "{}\n"
    running = serve(write(tmp_path, text))
    verify = str(pki / "ca.crt") if tls else True
    host, port = running.server.server_address[:2]
    silent = [socket.create_connection((host, port)) for _ in range(50)]
    try:
        for _ in range(5):
            response = requests.get(running.url + "/metrics", verify=verify, timeout=5)
            assert response.status_code == 200
        open_now = sample(response.text, "whisper_exporter_http_connections")
        assert open_now is not None and open_now <= 16
        assert sample(response.text, "whisper_exporter_http_connections_limit") == 16
        assert sample(response.text, "whisper_exporter_http_connections_closed_total", reason="evicted") >= 34
    finally:
        for s in silent:
            s.close()


@pytest.mark.parametrize("kept_alive", [False, True])
def test_a_request_head_has_one_deadline_however_it_drips(serve, monkeypatch, kept_alive):
    """The head of a request (the first on a connection, or the next on a kept-alive one) must
    arrive within HEAD_TIMEOUT in all: a byte every 0.3 s does not reset it, as recv() timeouts did."""
    import socket

    from whisper_exporter.web import connections

    monkeypatch.setattr(connections, "HEAD_TIMEOUT", 1.0)
    running = plain(serve)
    host, port = running.server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as s:
        if kept_alive:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"Healthy." in s.recv(65536)
        sent = 0
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 20:
            try:
                s.sendall(bytes([byte]))
                sent += 1
                s.settimeout(0.3)
                if s.recv(1) == b"":
                    break  # closed by the server
            except socket.timeout:
                continue
            except OSError:
                break
        else:
            pytest.fail("the server never closed a connection dripping its request head")
    text = requests.get(running.url + "/metrics", timeout=5).text
    assert sample(text, "whisper_exporter_http_connections_closed_total", reason="head_timeout") == 1


def test_tls_min_version_is_enforced(tmp_path, serve, pki):
    import socket
    import ssl

    running = serve(write(tmp_path, (
        f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n  min_version: TLS13\n")))
    host, port = running.server.server_address[:2]

    def handshake(max_version):
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.maximum_version = max_version
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2)
    text = requests.get(running.url + "/metrics", verify=str(pki / "ca.crt"), timeout=5).text
    assert sample(text, "whisper_exporter_http_connections_closed_total", reason="tls_failed") >= 1


# --- the status page's Service section: is the service healthy -------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def served(status, duration=0.6, endpoint="/v1/audio/transcriptions"):
    from whisper_exporter.logfiles.parse import Record

    return Record(endpoint, status, "en", duration, None, None, None, None, None)


def service_scheduler(records=(), probes=None, clock=None):
    """A scheduler with shared state fed `records` and, when given, a probe view answering `probes`."""
    from whisper_exporter.runtime.recent import RecentRequests
    from whisper_exporter.runtime.shared import Shared

    shared = Shared(from_dict({}))
    if clock is not None:
        shared.recent_requests = RecentRequests(shared.requests, clock=clock)
    shared.use_requests()
    shared.requests.observe_all(list(records))
    if probes is not None:
        class View:
            def recent_probes(self):
                return probes
        shared.probe_view = View()
    return Scheduler([], shared)


def probe_record(name, result, reference="the reference", age=2.0, reason=""):
    import time

    from whisper_exporter.collectors.probe import ProbeRecord

    return ProbeRecord(canary=name, started=time.time() - age, result=result, duration=0.1, status_code=None,
                       reason=reason, language="en", unit="word", audio_path="a.wav", audio_duration=4.0,
                       target="http://127.0.0.1:9", api="openai", reference=reference)


def test_histogram_quantile_as_prometheus_computes_it():
    from whisper_exporter.runtime.recent import quantile
    from whisper_exporter.runtime.requests import LATENCY_BUCKETS, _Hist

    h = _Hist(LATENCY_BUCKETS)
    for _ in range(100):
        h.observe(0.6)  # all in (0.5, 0.75]: linear within it, as histogram_quantile() does
    assert quantile(0.95, tuple(h.counts)) == pytest.approx(0.5 + 0.25 * 0.95)
    h.observe(1000.0)  # the +Inf bucket answers the highest finite bound
    assert quantile(1.0, tuple(h.counts)) == LATENCY_BUCKETS[-1]
    assert quantile(0.95, (0,) * (len(LATENCY_BUCKETS) + 1)) is None


def test_the_window_counts_only_the_last_minutes():
    from whisper_exporter.runtime.recent import SAMPLE_EVERY, WINDOW

    clock = Clock()
    scheduler = service_scheduler([served(500, 9.0)] * 50, clock=clock)
    shared = scheduler.shared
    first = shared.recent_requests.window()
    assert first.since_start and first.total == 50 and first.server_errors == 50 and first.p95 > 3
    # Scrapes every 15 s sample the counts; the old failures fall out of the window.
    for _ in range(int(WINDOW / 15) + 2):
        clock.now += 15
        list(shared.families())
    shared.requests.observe_all([served(200, 0.2)] * 19 + [served(503, 0.2), served(404, 0.2)])
    window = shared.recent_requests.window()
    assert not window.since_start and WINDOW <= window.seconds < WINDOW + SAMPLE_EVERY + 15
    assert (window.total, window.ok, window.server_errors, window.client_errors) == (21, 19, 1, 1)
    assert window.error_ratio == pytest.approx(1 / 21) and window.p95 < 0.25
    # Health checks and docs are not the API: left out, as the recording rules leave them out.
    shared.requests.observe_all([served(500, endpoint="/health")] * 10)
    assert shared.recent_requests.window().total == 21


def test_service_is_unknown_before_anything_is_known():
    from whisper_exporter.web import service

    s = service.assess(service_scheduler(probes={}))
    assert s.verdict == "unknown" and "nothing says" in s.reasons[0]
    assert "Verdict: <span class=\"unknown\">unknown</span>" in service.render(service_scheduler())


def test_service_is_down_when_no_speech_canary_gets_an_answer():
    from whisper_exporter.web import service

    probes = {"en-short": [probe_record("en-short", "connection_error", reason="connection refused")],
              "silence": [probe_record("silence", "success", reference="")]}
    s = service.assess(service_scheduler(probes=probes))
    assert s.verdict == "down"
    assert any("en-short: connection_error" in r and "connection refused" in r for r in s.reasons)
    # One of two speech canaries unanswered: degraded, not down.
    probes["other"] = [probe_record("other", "success")]
    assert service.assess(service_scheduler(probes=probes)).verdict == "degraded"
    # Only non-speech canaries configured: they still say whether the server answers at all.
    probes = {"silence": [probe_record("silence", "timeout", reference="")]}
    assert service.assess(service_scheduler(probes=probes)).verdict == "down"


def test_service_is_degraded_by_a_wrong_transcript_a_hallucination_or_a_stale_result():
    from whisper_exporter.web import service

    for probes in ({"en-short": [probe_record("en-short", "wrong_transcript")]},
                   {"en-short": [probe_record("en-short", "success")],
                    "silence": [probe_record("silence", "hallucination", reference="")]},
                   {"en-short": [probe_record("en-short", "success", age=3600)]}):
        s = service.assess(service_scheduler(probes=probes))
        assert s.verdict == "degraded", (probes, s)
    assert "stale" in service.render(service_scheduler(probes=probes))


@pytest.mark.parametrize("records, verdict, words", [
    ([served(200)] * 100, "healthy", "100 requests over the last"),
    ([served(200)] * 94 + [served(500)] * 6, "degraded", "6 of 100 requests failed (5xx)"),
    ([served(200)] * 95 + [served(500)] * 5, "healthy", "5.0% failed"),
    ([served(200, 4.0)] * 10, "degraded", "p95 latency"),
    ([served(502)] * 3, "down", "none succeeded"),
    ([served(404)] * 10, "healthy", "0.0% failed"),  # the clients' mistakes are not the service's
])
def test_service_verdict_from_the_recent_requests(records, verdict, words):
    from whisper_exporter.web import service

    s = service.assess(service_scheduler(records))
    assert s.verdict == verdict and any(words in r for r in s.reasons), s


def test_service_section_comes_first_and_escapes_what_it_shows():
    from whisper_exporter.web import status

    probes = {"<b>x</b>": [probe_record("<b>x</b>", "http_error", reason="<script>alert(1)</script>")]}
    page = status.render(from_dict({}), service_scheduler(probes=probes))
    assert page.index("<h2>Service</h2>") < page.index("<h2>Collectors</h2>")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Verdict: <span class=\"down\">down</span>" in page
