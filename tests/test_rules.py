"""The shipped Prometheus rules: promtool accepts them and their unit tests pass, every alert
follows the conventions (severity, summary, description with the value, a runbook section that
exists), and the unit tests make every alert fire and not fire.

The unit tests themselves are rules/tests/*.yml (`promtool test rules`). Here they are also
checked to be able to fail: with every alert made impossible, or made to always fire, promtool
must report a failure for every alert."""
from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from helpers import require_tool
ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/whisper-exporter/whisper-exporter/blob/main/docs/runbook.md#"
SEVERITIES = {"critical", "warning", "info"}
# level:metric:operations
RECORD_NAME = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+$")
COLON_NAME = re.compile(r"\b[a-z][a-z0-9_]*:[a-z][a-z0-9_]*:[a-z0-9_]+\b")


def promtool() -> str:
    return require_tool("promtool")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def all_rules() -> list[tuple[Path, str, dict]]:
    out = []
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                out.append((path, group["name"], rule))
    return out


def alerts() -> list[dict]:
    return [r for _, _, r in all_rules() if "alert" in r]


def records() -> list[dict]:
    return [r for _, _, r in all_rules() if "record" in r]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", RUNBOOK.read_text(), re.M)}


def run_promtool_tests(test_files: list[Path]) -> list[subprocess.CompletedProcess]:
    """`promtool test rules`, one process per file, in parallel (each file takes seconds)."""
    binary = promtool()

    def one(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([binary, "test", "rules", str(path)], capture_output=True, text=True,
                              cwd=path.parent, timeout=300)

    with ThreadPoolExecutor(max_workers=len(test_files)) as pool:
        return list(pool.map(one, test_files))


def test_there_are_rules_and_tests():
    assert {p.name for p in RULE_FILES} >= {"service.yml", "latency.yml", "gpu.yml", "quality.yml",
                                            "exporter.yml", "recording.yml"}
    assert len(TEST_FILES) >= len(RULE_FILES)
    assert len(alerts()) >= 20 and len(records()) >= 10


def test_promtool_check_rules():
    result = subprocess.run([promtool(), "check", "rules", *map(str, RULE_FILES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES), result.stdout


def test_promtool_test_rules():
    results = run_promtool_tests(TEST_FILES)
    for path, result in zip(TEST_FILES, results):
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout, result.stdout


def test_group_names_are_unique():
    names = [g["name"] for p in RULE_FILES for g in load(p)["groups"]]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: f"{r['alert']}-{r['labels']['severity']}")
def test_alert_conventions(rule):
    name = rule["alert"]
    assert re.fullmatch(r"Whisper[A-Z][A-Za-z0-9]+", name), name
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    summary = annotations["summary"]
    # One sentence ending in a period, no templating, no line breaks.
    assert summary[0].isupper() and summary.endswith("."), summary
    assert "\n" not in summary and "{{" not in summary, summary
    assert summary.count(". ") == 0, f"more than one sentence: {summary!r}"
    description = annotations["description"]
    assert "{{ $value" in description, f"{name}: the description must show the value"
    assert "{{ $labels." in description, f"{name}: the description must name the target"
    url = annotations["runbook_url"]
    assert url == RUNBOOK_URL + name.lower(), url
    assert name.lower() in runbook_anchors(), f"docs/runbook.md has no section {name}"


def test_alert_names_with_two_rules_differ_in_severity():
    seen: dict[str, set[str]] = {}
    for rule in alerts():
        severities = seen.setdefault(rule["alert"], set())
        assert rule["labels"]["severity"] not in severities, f"{rule['alert']} twice with one severity"
        severities.add(rule["labels"]["severity"])


def test_every_runbook_alert_section_is_an_alert():
    names = {r["alert"].lower() for r in alerts()}
    sections = {a for a in runbook_anchors() if a.startswith("whisper")}
    assert sections == names, f"sections without an alert: {sections - names}; alerts without one: {names - sections}"


def test_recording_rule_names_and_references():
    defined = {r["record"] for r in records()}
    assert len(defined) == len(records()), "a record is defined twice"
    for name in defined:
        assert RECORD_NAME.match(name), f"{name} is not level:metric:operations"
    assert "language:whisper_quality_error_rate:ratio_rate1h" in defined
    assert "language:whisper_quality_error_rate:ratio_rate1d" in defined
    # every recorded name an expression uses is defined
    for _, _, rule in all_rules():
        for used in COLON_NAME.findall(rule["expr"]):
            assert used in defined, f"{rule.get('alert') or rule.get('record')} uses undefined {used}"


def test_baselines_are_a_week_of_their_own_series():
    baselines = [r for r in records() if "baseline_1w" in r["record"]]
    assert {r["record"] for r in baselines} == {
        "job_instance:whisper_request_duration_seconds:p95_5m_baseline_1w",
        "job_instance:whisper_requests_errors:ratio_rate5m_baseline_1w",
    }
    for rule in baselines:
        source = rule["record"].removesuffix("_baseline_1w")
        assert rule["expr"].strip() == f"quantile_over_time(0.95, {source}[1w])"
    used = " ".join(r["expr"] for r in alerts())
    for rule in baselines:
        assert rule["record"] in used, f"no alert compares with {rule['record']}"


def unit_tests() -> list[tuple[Path, dict]]:
    return [(path, test) for path in TEST_FILES for test in load(path)["tests"]]


def test_every_rule_file_is_loaded_by_a_unit_test():
    loaded = set()
    for path in TEST_FILES:
        for rule_file in load(path)["rule_files"]:
            loaded.add((path.parent / rule_file).resolve())
    assert {p.resolve() for p in RULE_FILES} <= loaded


def test_every_alert_is_tested_firing_and_not_firing():
    firing: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    for _, test in unit_tests():
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                for alert in case["exp_alerts"]:
                    firing.add((case["alertname"], alert["exp_labels"]["severity"]))
            else:
                quiet.add(case["alertname"])
    wanted = {(r["alert"], r["labels"]["severity"]) for r in alerts()}
    assert wanted - firing == set(), f"never tested firing: {sorted(wanted - firing)}"
    names = {r["alert"] for r in alerts()}
    assert names - quiet == set(), f"never tested not firing: {sorted(names - quiet)}"
    assert {a for a, _ in firing} <= names, "a test expects an alert that does not exist"


def test_every_firing_case_checks_the_rendered_annotations():
    """At least one firing case per alert and severity compares the annotations as rendered,
    so that a template error or a wrong value in the description fails the unit tests."""
    checked = set()
    for _, test in unit_tests():
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                annotations = alert.get("exp_annotations") or {}
                if {"summary", "description", "runbook_url"} <= set(annotations):
                    assert "{{" not in annotations["description"]
                    checked.add((case["alertname"], alert["exp_labels"]["severity"]))
    wanted = {(r["alert"], r["labels"]["severity"]) for r in alerts()}
    assert wanted - checked == set(), sorted(wanted - checked)


def test_every_recording_rule_is_tested_or_used_by_a_tested_alert():
    """Every record is checked by a promql_expr_test, or feeds (maybe through other records)
    an alert, whose tests then check it."""
    exprs = [case["expr"] for _, test in unit_tests() for case in test.get("promql_expr_test", [])]
    exprs += [r["expr"] for r in alerts()]
    covered = set(COLON_NAME.findall("\n".join(exprs)))
    by_name = {r["record"]: r for r in records()}
    grew = True
    while grew:
        before = len(covered)
        for name in list(covered):
            if name in by_name:
                covered |= set(COLON_NAME.findall(by_name[name]["expr"]))
        grew = len(covered) > before
    assert set(by_name) - covered == set()


def alert_targets() -> list[tuple[str, int, dict]]:
    """(rule file name, index among the file's rules, rule) of every alerting rule."""
    out = []
    for path in RULE_FILES:
        rules = [rule for group in load(path)["groups"] for rule in group["rules"]]
        out += [(path.name, i, rule) for i, rule in enumerate(rules) if "alert" in rule]
    return out


def mutant(folder: Path, file_name: str, index: int, rule: dict, changed: dict) -> list[Path]:
    """In `folder`, a copy of rules/ with the one rule replaced by `changed`, and copies of the
    unit test files cut down to the test groups that check that rule's alert. Returns the test files."""
    (folder / "tests").mkdir(parents=True)
    for path in RULE_FILES:
        data = load(path)
        if path.name == file_name:
            for group in data["groups"]:
                if index < len(group["rules"]):
                    group["rules"][index] = changed
                    break
                index -= len(group["rules"])
        (folder / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    out = []
    for path in TEST_FILES:
        data = load(path)
        data["tests"] = [test for test in data["tests"]
                         if any(c["alertname"] == rule["alert"] for c in test.get("alert_rule_test", []))]
        if data["tests"]:
            out.append(folder / "tests" / path.name)
            out[-1].write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def check_mutants(tmp_path: Path, mutate) -> None:
    """Mutate one alert at a time: the unit tests that check it must then fail, naming it."""
    jobs = []
    for n, (file_name, index, rule) in enumerate(alert_targets()):
        files = mutant(tmp_path / str(n), file_name, index, rule, mutate(dict(rule)))
        assert files, f"no unit test checks {rule['alert']}"
        jobs += [(rule, path) for path in files]
    binary = promtool()

    def run(job):
        _, path = job
        return subprocess.run([binary, "test", "rules", str(path)], capture_output=True, text=True,
                              cwd=path.parent, timeout=300)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    caught: dict[tuple[str, str], bool] = {}
    for (rule, _), result in zip(jobs, results):
        key = (rule["alert"], rule["labels"]["severity"])
        output = result.stdout + result.stderr
        failed = result.returncode != 0 and f"alertname: {rule['alert']}," in output
        caught[key] = caught.get(key, False) or failed
    missed = sorted(k for k, v in caught.items() if not v)
    assert missed == [], f"the unit tests still pass with these alerts mutated: {missed}"


def test_unit_tests_fail_when_an_alert_cannot_fire(tmp_path):
    check_mutants(tmp_path, lambda rule: {**rule, "expr": "vector(1) == 2"})


def test_unit_tests_fail_when_an_alert_fires_too_much(tmp_path):
    # Without its `for:` and with an unlabelled series whenever its own expression is empty,
    # the alert fires at every evaluation: each "not firing" case must catch that.
    def always(rule):
        rule.pop("for", None)
        return {**rule, "expr": f"({rule['expr']}) or on () vector(1)"}

    check_mutants(tmp_path, always)
