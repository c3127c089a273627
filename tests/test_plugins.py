"""Collectors from outside: a plugin distribution (tests/data/plugin, the one docs/plugins.md shows)
is built and installed, found through the entry-point group like the bundled collectors, configured
and validated like them, switched by --collector.NAME, and its metric scraped."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import free_port, sample, wait_for

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "tests" / "data" / "plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The plugin built and installed into a folder of its own (the test venv stays clean)."""
    target = tmp_path_factory.mktemp("plugin-site")
    source = tmp_path_factory.mktemp("plugin-src") / "plugin"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # builds there
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    return target


def exporter(plugin_path: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(plugin_path)}
    return subprocess.Popen([sys.executable, "-m", "whisper_exporter", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(plugin_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(plugin_path)}
    return subprocess.run([sys.executable, "-m", "whisper_exporter", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_installed_plugin_is_configured_validated_and_scraped(plugin_path, tmp_path):
    watched = tmp_path / "model.bin"
    watched.write_bytes(b"x" * 12345)
    config = tmp_path / "exporter.yml"
    port = free_port()
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "collectors:\n  gpu: {enabled: false}\n  process: {enabled: false}\n  probe: {enabled: false}\n"
        f"  filesize: {{enabled: true, interval: 200ms, path: {watched}}}\n")
    proc = exporter(plugin_path, "run", "--config", str(config))
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped() -> str:
            try:
                return requests.get(url, timeout=2).text
            except requests.RequestException:
                return ""

        assert wait_for(lambda: sample(scraped(), "whisper_file_size_bytes") is not None, timeout=30)
        text = scraped()
        assert sample(text, "whisper_file_size_bytes", path=str(watched)) == 12345
        assert sample(text, "whisper_exporter_collector_up", collector="filesize") == 1
        # Its failure is its own: the file goes, the collector is down, the scrape still works.
        watched.unlink()
        assert wait_for(lambda: sample(scraped(), "whisper_exporter_collector_up", collector="filesize") == 0,
                        timeout=30)
        assert sample(scraped(), "whisper_file_size_bytes") is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_plugin_section_errors_exit_2_naming_the_key(plugin_path, tmp_path):
    config = tmp_path / "bad.yml"
    config.write_text("collectors:\n  filesize: {enabled: true}\n")
    result = run(plugin_path, "check-config", str(config))
    assert result.returncode == 2
    assert "collectors.filesize.path" in result.stderr and "the file whose size to export" in result.stderr
    config.write_text("collectors:\n  filesize: {enabled: true, path: /x, colour: red}\n")
    result = run(plugin_path, "check-config", str(config))
    assert result.returncode == 2 and "collectors.filesize.colour" in result.stderr and "a known key" in result.stderr
    config.write_text("collectors:\n  filesize: {interval: soon}\n")
    result = run(plugin_path, "check-config", str(config))
    assert result.returncode == 2 and "collectors.filesize.interval" in result.stderr


def test_collector_flags_come_from_the_registry(plugin_path, tmp_path):
    help_text = run(plugin_path, "run", "--help").stdout
    for name in ("gpu", "process", "logs", "probe", "quality", "filesize"):
        assert f"--collector.{name}" in help_text and f"--no-collector.{name}" in help_text
    # Without the plugin on the path there is no flag for it.
    assert "--collector.filesize" not in subprocess.run(
        [sys.executable, "-m", "whisper_exporter", "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    # --collector.filesize turns on a section the file leaves off (its path given in the file).
    watched = tmp_path / "w.bin"
    watched.write_bytes(b"abc")
    port = free_port()
    config = tmp_path / "c.yml"
    config.write_text(f"listen: 127.0.0.1:{port}\ncollectors:\n  filesize: {{path: {watched}, interval: 200ms}}\n")
    proc = exporter(plugin_path, "run", "--config", str(config), "--collector.filesize", "--no-collector.gpu",
                    "--no-collector.process", "--no-collector.probe")
    try:
        def names() -> str:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:
                return ""

        assert wait_for(lambda: sample(names(), "whisper_file_size_bytes") == 3, timeout=30)
        text = names()
        assert sample(text, "whisper_exporter_collector_up", collector="gpu") is None  # switched off
        assert sample(text, "whisper_exporter_collector_up", collector="probe") is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_docs_show_the_whole_plugin_in_under_50_lines():
    source = (PLUGIN_SOURCE / "whisper_exporter_filesize.py").read_text()
    assert len(source.splitlines()) < 50
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert source.strip() in docs  # the page shows the tested file word for word
    assert (PLUGIN_SOURCE / "pyproject.toml").read_text().strip() in docs


def test_import_graph_has_no_cycles_and_domain_packages_build_no_metrics():
    """Every module's imports of the project, read statically: no cycle; no prometheus_client in
    the Whisper domain, log files and quality subpackages (metric families are built in the
    collectors and the runtime only)."""
    modules: dict[str, Path] = {}
    for path in (ROOT / "whisper_exporter").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "collectors").glob("*.py"):
        name = "whisper_exporter.collectors" + ("" if path.stem == "__init__" else f".{path.stem}")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are for the type checker only
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith(("prometheus_client", "aiohttp")):
                    deps.add(target.split(".")[0])
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    for package in ("whisper_exporter.whisper", "whisper_exporter.logfiles", "whisper_exporter.quality"):
        for name, deps in graph.items():
            if name.startswith(package):
                assert "prometheus_client" not in deps, f"{name} builds metrics; only collectors and runtime may"
    # Arrows run one way: wiring (the composition root) -> web -> runtime -> config. Configuration
    # is handed the plugin sections by the runtime and never reaches up into it (imports inside
    # functions count too).
    layers = ["whisper_exporter.wiring", "whisper_exporter.web", "whisper_exporter.runtime", "whisper_exporter.config"]

    def layer(module: str) -> int:
        return next((i for i, top in enumerate(layers) if module == top or module.startswith(top + ".")), -1)

    for name, deps in graph.items():
        if layer(name) < 0:
            continue
        for dep in deps:
            assert not 0 <= layer(dep) < layer(name), f"{name} imports {dep}: arrows run {' -> '.join(layers)}"
    # Depth-first search for a cycle (imports inside functions included: a cycle is a cycle).
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if state.get(dep) is None:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
