"""What `pip install .` and the Dockerfile ship: the wheel carries every module and the bundled canary."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_packages_and_the_canary(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("whisper_exporter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in list((ROOT / "whisper_exporter").glob("*.py")) + list((ROOT / "collectors").glob("*.py")):
        assert f"{module.parent.name}/{module.name}" in names
    assert "whisper_exporter/canary/en.wav" in names and "whisper_exporter/canary/en.txt" in names
    # The hallucination detector and its phrase bag; the negative canaries (expected transcript: empty).
    assert {"whisper_exporter/whisper/hallucination.py", "whisper_exporter/whisper/hallucination_phrases.yml"} <= names
    assert {f"whisper_exporter/canary/{n}.{ext}" for n in ("silence", "noise", "tone") for ext in ("wav", "txt")} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "whisper-exporter = whisper_exporter.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_dockerfile_runs_non_root_on_the_default_port_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE\s+10111\b", text, re.M)
    assert re.search(r"^HEALTHCHECK .*/-/healthy", text, re.M | re.S)
    for source in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
