"""The Kubernetes example's server log: size-capped by the writer in its container args, and
followed across the writer's rotations by the exporter's own follower without losing a line."""
import subprocess
import threading
from pathlib import Path

import yaml
from helpers import wait_for

from whisper_exporter.logfiles.follow import Follower

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "whisper.yaml"
CAP = 20_000  # bytes, in place of the example's 100 MiB


def writer_command(log: Path) -> str:
    """The server container's shell command, with `cat` as the server and a small cap."""
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "whisper"]
    command = server["args"][0]
    assert command.startswith("faster-whisper-server --host 0.0.0.0 --port 8000 2>&1 | python3 -u -c '")
    assert "/var/log/whisper/server.log" in command and "maxBytes=100 * 2**20" in command
    assert "tee" not in command
    return (command.replace("faster-whisper-server --host 0.0.0.0 --port 8000", "cat")
            .replace("/var/log/whisper/server.log", str(log)).replace("100 * 2**20", str(CAP)))


def test_server_log_is_capped_and_followed_across_rotations(tmp_path):
    log = tmp_path / "server.log"
    seen: list[bytes] = []
    follower = Follower(str(log), seen.extend, start_at_end=False)
    proc = subprocess.Popen(["sh", "-c", writer_command(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out: list[bytes] = []
    drain = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # a full pipe would block it
    drain.start()
    sent = []
    try:
        for chunk in range(40):  # 40 x 30 lines of ~100 bytes: 120 kB through a 20 kB cap
            lines = [f'INFO:     127.0.0.1:5{chunk:02d}{i:02d} - "POST /v1/audio/transcriptions HTTP/1.1" '
                     f"200 OK {'x' * 20}" for i in range(30)]
            proc.stdin.write(("\n".join(lines) + "\n").encode())
            proc.stdin.flush()
            sent += lines
            assert wait_for(lambda: (follower.poll(), len(seen) == len(sent))[1], timeout=10), (len(seen), len(sent))
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
        drain.join(10)
        echoed = b"".join(out).decode().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
        follower.close()
    assert echoed == sent  # kubectl logs still has everything
    assert [line.decode() for line in seen] == sent  # and the exporter read every line once, in order
    assert follower.rotations >= 5
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["server.log", "server.log.1"]  # bounded: two files at most
    assert all(f.stat().st_size <= CAP for f in files)
    kept = (files[1].read_text() + files[0].read_text()).splitlines()
    assert kept == sent[-len(kept):]  # whole lines, the newest ones
