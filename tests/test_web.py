"""--web.config.file: TLS, mutual TLS, basic auth, headers, and clear errors for a bad file."""
import subprocess
import threading

import bcrypt
import pytest
import requests

from whisper_exporter.runtime import wiring as daemon
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
