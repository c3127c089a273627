"""What `pip install .` and the Dockerfile ship: the wheel carries every module and the bundled canary."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_packages_and_the_canary(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    # setuptools stops building projects that use deprecated metadata (the license table: 2027-02-18)
    assert "deprecated" not in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("whisper_exporter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (ROOT / "whisper_exporter").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names
    # collectors/ is installed inside the project's namespace
    for module in (ROOT / "collectors").glob("*.py"):
        assert f"whisper_exporter/collectors/{module.name}" in names
    # nothing generic lands in site-packages: one package and its metadata
    assert {n.split("/", 1)[0] for n in names} == {"whisper_exporter", "whisper_exporter-0.1.0.dist-info"}
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["whisper_exporter"]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "whisper_exporter/canary/en.wav" in names and "whisper_exporter/canary/en.txt" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "whisper-exporter = whisper_exporter.cli:main" in entry_points
    for name in ("gpu", "process", "logs", "probe", "quality", "tap"):
        assert f"{name} = whisper_exporter.collectors.{name}:PLUGIN" in entry_points
    # The hallucination detector and its phrase bag; the negative canaries (expected transcript: empty).
    assert {"whisper_exporter/whisper/hallucination.py", "whisper_exporter/whisper/hallucination_phrases.yml"} <= names
    assert {f"whisper_exporter/canary/{n}.{ext}" for n in ("silence", "noise", "tone") for ext in ("wav", "txt")} <= names


def test_dockerfile_runs_non_root_on_the_default_port_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE\s+10111\b", text, re.M)
    assert re.search(r"^HEALTHCHECK .*/-/healthy", text, re.M | re.S)
    for source in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
