"""The shipped Prometheus rules: promtool accepts them and their unit tests pass, every alert
follows the conventions (severity, summary, description with the value, a runbook section that
exists), and the unit tests make every alert fire and not fire. Also (issue 15): the SLO objectives
live in one place, slower groups' records are read through a window, and the shipped
Alertmanager configuration inhibits as documented, asked of a real Alertmanager.

The unit tests themselves are rules/tests/*.yml (`promtool test rules`). Here they are also
checked to be able to fail: with every alert made impossible, or made to always fire, promtool
must report a failure for every alert."""
from __future__ import annotations

import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from helpers import free_port, require_tool

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
                                            "exporter.yml", "recording.yml", "slo.yml"}
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


def check_mutants(tmp_path: Path, mutate) -> list[tuple[str, str]]:
    """Mutate one alert at a time; the alerts whose unit tests still pass (none, when they all fail naming it)."""
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
    return sorted(k for k, v in caught.items() if not v)


def test_unit_tests_fail_when_an_alert_cannot_fire(tmp_path):
    missed = check_mutants(tmp_path, lambda rule: {**rule, "expr": "vector(1) == 2"})
    assert missed == [], f"the unit tests still pass with these alerts unable to fire: {missed}"


def test_unit_tests_fail_when_an_alert_fires_too_much(tmp_path):
    # Without its `for:` and with an unlabelled series whenever its own expression is empty,
    # the alert fires at every evaluation: each "not firing" case must catch that.
    def always(rule):
        rule.pop("for", None)
        return {**rule, "expr": f"({rule['expr']}) or on () vector(1)"}

    missed = check_mutants(tmp_path, always)
    assert missed == [], f"the unit tests still pass with these alerts firing always: {missed}"


# -- issue 15: the SLO in one place, group cadence, Alertmanager inhibition ---------------------

OBJECTIVES = {"slo:whisper_availability:objective", "slo:whisper_latency:objective"}


def test_slo_objectives_are_set_in_one_place():
    """Each objective is one record of a constant; every burn-rate alert divides by it, and no
    rule carries the budget as a literal."""
    defined = {r["record"]: r["expr"] for r in records() if r["record"] in OBJECTIVES}
    assert set(defined) == OBJECTIVES
    for expr in defined.values():
        assert re.fullmatch(r"vector\(0\.\d+\)", expr.strip()), expr
    burns = [r for r in alerts() if r["alert"].endswith("BudgetBurn")]
    assert {(r["alert"], r["labels"]["severity"]) for r in burns} == {
        (a, s) for a in ("WhisperErrorBudgetBurn", "WhisperLatencyBudgetBurn") for s in ("critical", "warning")}
    for rule in burns:
        assert "(1 - slo:whisper_" in rule["expr"], rule["alert"]
    for path, _, rule in all_rules():
        if path.name == "slo.yml" and rule.get("record") not in OBJECTIVES:
            assert not re.search(r"\b0\.995\b|\b0\.99\b|\b0\.005\b|\b0\.01\b", rule["expr"]), rule.get("alert") or rule.get("record")


def test_changing_the_objective_changes_the_pages(tmp_path):
    """With the availability objective lowered to 90%, the bad-replica scenario (the fleet
    failing 10%) no longer pages: the unit test that expects the page must fail."""
    (tmp_path / "tests").mkdir()
    for path in RULE_FILES:
        text = path.read_text()
        if path.name == "slo.yml":
            assert "vector(0.995)" in text
            text = text.replace("vector(0.995)", "vector(0.9)")
        (tmp_path / path.name).write_text(text)
    data = load(RULES / "tests" / "slo_test.yml")
    data["tests"] = [t for t in data["tests"] if t["name"].startswith("one bad replica out of three")]
    assert data["tests"]
    test_file = tmp_path / "tests" / "slo_test.yml"
    test_file.write_text(yaml.safe_dump(data, sort_keys=False))
    shipped = run_promtool_tests([RULES / "tests" / "slo_test.yml"])[0]
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    changed = run_promtool_tests([test_file])[0]
    output = changed.stdout + changed.stderr
    assert changed.returncode != 0 and "alertname: WhisperErrorBudgetBurn" in output, output


def test_records_of_slower_groups_are_read_through_a_window():
    """promtool evaluates every group at the test's interval, so it cannot see this: a record
    from a group evaluated every 5m, read plainly by a rule evaluated every minute, can find its
    newest sample just past the 5-minute lookback, see nothing, and reset `for:`. Every read of
    such a record must go through *_over_time with a window of at least twice the interval."""
    slow: dict[str, int] = {}
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            interval = group.get("interval")
            if interval:
                seconds = int(interval[:-1]) * {"s": 1, "m": 60, "h": 3600}[interval[-1]]
                for rule in group["rules"]:
                    if "record" in rule:
                        slow[rule["record"]] = seconds
    assert slow, "no slower group: drop this test"
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    for path in RULE_FILES:
        for group in load(path)["groups"]:
            if group.get("interval"):
                continue
            for rule in group["rules"]:
                for name, seconds in slow.items():
                    for m in re.finditer(re.escape(name) + r"(\[(\d+)([smhdw])\])?", rule["expr"]):
                        before = rule["expr"][:m.start()]
                        assert m.group(1) and re.search(r"_over_time\($", before.rstrip()), \
                            f"{rule.get('alert') or rule.get('record')} reads {name} without a window"
                        assert int(m.group(2)) * units[m.group(3)] >= 2 * seconds, rule.get("alert")


@pytest.fixture
def alertmanager(tmp_path):
    """The shipped deploy/alertmanager.yml in a real Alertmanager on loopback."""
    binary = require_tool("prometheus-alertmanager")
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={ROOT / 'deploy' / 'alertmanager.yml'}",
                             f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address="], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            try:
                if requests.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_alertmanager_lets_the_symptom_lead(alertmanager):
    """Inhibition as the shipped config does it, asked of a real Alertmanager: the failing canary
    inhibits the guessed cause, never the other way round; a page inhibits its own ticket; one
    instance's outage does not hide the service-level page."""
    import requests  # noqa: PLC0415

    def alert(name: str, severity: str, **labels: str) -> dict:
        return {"labels": {"alertname": name, "severity": severity, "job": "whisper", **labels},
                "annotations": {"summary": name}}

    sent = [
        # whisper-0: the server is down; the canary fails, and the process is not found.
        alert("WhisperProbeFailing", "critical", instance="whisper-0:10111", probe="en-short"),
        alert("WhisperServerProcessDown", "warning", instance="whisper-0:10111"),
        alert("WhisperErrorRatioHigh", "warning", instance="whisper-0:10111"),
        # whisper-1: the process pattern stopped matching, while its requests fail: the
        # guessed cause must not hide the symptom.
        alert("WhisperServerProcessDown", "warning", instance="whisper-1:10111"),
        alert("WhisperErrorRatioHigh", "warning", instance="whisper-1:10111"),
        # The service: a page over 1h and its own ticket over 1d.
        alert("WhisperErrorBudgetBurn", "critical", window="1h"),
        alert("WhisperErrorBudgetBurn", "warning", window="1d"),
    ]
    response = requests.post(alertmanager + "/api/v2/alerts", json=sent, timeout=10)
    assert response.status_code == 200, response.text
    got = requests.get(alertmanager + "/api/v2/alerts", timeout=10).json()
    inhibited = {(a["labels"]["alertname"], a["labels"].get("instance", ""), a["labels"]["severity"]):
                 bool(a["status"]["inhibitedBy"]) for a in got}
    assert inhibited == {
        ("WhisperProbeFailing", "whisper-0:10111", "critical"): False,
        ("WhisperServerProcessDown", "whisper-0:10111", "warning"): True,
        ("WhisperErrorRatioHigh", "whisper-0:10111", "warning"): True,
        ("WhisperServerProcessDown", "whisper-1:10111", "warning"): False,
        ("WhisperErrorRatioHigh", "whisper-1:10111", "warning"): False,
        ("WhisperErrorBudgetBurn", "", "critical"): False,
        ("WhisperErrorBudgetBurn", "", "warning"): True,
    }
