"""The monitoring mixin (mixin.libsonnet): rendered with jsonnet it is the committed rules and
dashboards with the default _config, promtool accepts what it renders, and a configured job,
cluster and namespace reach every selector, aggregation and join."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import _jsonnet
import pytest
import yaml
from helpers import require_tool
from test_dashboards import queries, substitute

ROOT = Path(__file__).resolve().parent.parent
MATCHERS = 'job="speech",cluster="eu-1",namespace="asr"'
CUSTOM = ('{_config+:: {jobSelector: \'job="speech"\', clusterSelector: \'cluster="eu-1"\', '
          'namespaceSelector: \'namespace="asr"\', aggregationLabels: ["cluster", "namespace"]}}')
# Names of series: the exporter's, the recorded ones (level:metric:operations) and Prometheus' own.
METRIC = re.compile(r"(?<![\w:$])(whisper_\w+|process_\w+|scrape_\w+|[a-z_]+:[\w:]+|up|ALERTS)\b(?!\s*\()")


def render(config: str = "{}") -> dict:
    """The mixin's three outputs (and its rules by file) as mixtool would render them."""
    snippet = f"""local m = (import 'mixin.libsonnet') + {config};
    {{alerts: m.prometheusAlerts, rules: m.prometheusRules, files: m.ruleFiles, dashboards: m.grafanaDashboards}}"""
    return json.loads(_jsonnet.evaluate_snippet("render", snippet, jpathdir=[str(ROOT)]))


@pytest.fixture(scope="module")
def default() -> dict:
    return render()


@pytest.fixture(scope="module")
def custom() -> dict:
    return render(CUSTOM)


def promtool_check(tmp_path: Path, mixin: dict) -> str:
    """promtool check rules over the rendered alerts and rules files; its output."""
    promtool = require_tool("promtool")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(mixin["alerts"]))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(mixin["rules"]))
    result = subprocess.run([promtool, "check", "rules", "alerts.yml", "rules.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def exprs(mixin: dict) -> list[str]:
    return [r["expr"] for part in ("alerts", "rules") for g in mixin[part]["groups"] for r in g["rules"]]


def test_mixin_covers_every_committed_file(default):
    """A new rules or dashboard file that the mixin does not import fails here (jsonnet needs literal paths)."""
    assert sorted(default["files"]) == sorted(p.name for p in (ROOT / "rules").glob("*.yml"))
    assert sorted(default["dashboards"]) == sorted(p.name for p in (ROOT / "dashboards").glob("*.json"))


def test_default_config_renders_the_committed_files(default):
    """With the defaults the mixin is the committed rules and dashboards, compared as data."""
    for name, rendered in default["files"].items():
        assert rendered == yaml.safe_load((ROOT / "rules" / name).read_text()), name
    for name, rendered in default["dashboards"].items():
        assert rendered == json.loads((ROOT / "dashboards" / name).read_text()), name


def test_alerts_and_rules_split_the_committed_groups(default):
    """prometheusAlerts holds every alert and prometheusRules every recording rule, in the files' order."""
    committed = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "rules").glob("*.yml"))]
    for kind, part in (("alert", "alerts"), ("record", "rules")):
        want = [(g["name"], g.get("interval"), [r for r in g["rules"] if kind in r])
                for doc in committed for g in doc["groups"]]
        want = [w for w in want if w[2]]
        got = [(g["name"], g.get("interval"), g["rules"]) for g in default[part]["groups"]]
        assert got == want, kind


def test_promtool_accepts_the_default_rendering(tmp_path, default):
    out = promtool_check(tmp_path, default)
    assert f"SUCCESS: {sum(len(g['rules']) for g in default['alerts']['groups'])} rules found" in out


def series_read(expr: str) -> list[re.Match]:
    """The names of series an expression reads (a regex's view, independent of the mixin's lexer)."""
    # Strings, [ranges] and {matchers} blanked to spaces of the same length: offsets stay the expr's.
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: " " * len(m.group(0)), expr)
    text = re.sub(r"\[[^\]]*\]|\{[^}]*\}", lambda m: m.group(0)[0] + " " * (len(m.group(0)) - 1), text)
    return list(METRIC.finditer(text))


def test_custom_selectors_reach_every_selector(default, custom):
    """Each series an expression reads carries the configured matchers, and reads the same series as committed."""
    pairs = list(zip(exprs(default), exprs(custom), strict=True))
    for before, after in pairs:
        assert 'job=~".*whisper.*"' not in after, after  # the configured job replaces the committed one
        found = series_read(after)
        assert [m.group(1) for m in found] == [m.group(1) for m in series_read(before)], after
        for m in found:
            assert after[m.end():].startswith("{" + MATCHERS), (m.group(1), after)
    assert sum(len(series_read(e)) for _, e in pairs) > 250


def test_custom_labels_reach_every_aggregation_and_join(custom):
    """Every by (...) and on (...) of the rules keeps the cluster and namespace apart."""
    lists = [m for e in exprs(custom) for m in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", e)]
    assert len(lists) > 150
    assert all(re.match(r"cluster, namespace\b", l) for l in lists), [l for l in lists if not l.startswith("cluster")]


def test_promtool_accepts_the_custom_rendering(tmp_path, custom):
    out = promtool_check(tmp_path, custom)
    for part in ("alerts", "rules"):  # every rule of both files was read, none lost to the rewriting
        assert f"SUCCESS: {sum(len(g['rules']) for g in custom[part]['groups'])} rules found" in out, out


def test_vmalert_accepts_the_custom_rendering(tmp_path, custom):
    """vmalert, the fleet's other ruler, parses the rendered rules (MetricsQL and its templates) too."""
    vmalert = require_tool("vmalert")
    for part in ("alerts", "rules"):
        (tmp_path / f"{part}.yml").write_text(yaml.safe_dump(custom[part]))
    checked = subprocess.run([vmalert, "-dryRun", f"-rule={tmp_path}/*.yml"], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_custom_dashboards_carry_the_selector_and_parse(tmp_path, custom):
    """Every dashboard query (targets, variables, annotations) reads only the configured job, and promtool parses it."""
    promtool = require_tool("promtool")
    found = [(where, q) for d in custom["dashboards"].values() for where, q in queries(d)]
    assert len(found) > 100
    for where, q in found:
        assert "{" + MATCHERS in q, where
    rules = [{"record": f"dashboard:query_{i}:check", "expr": substitute(q)} for i, (_, q) in enumerate(found)]
    (tmp_path / "d.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", "d.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def promtool_test(tmp_path, custom: dict, test: dict) -> subprocess.CompletedProcess:
    """`promtool test rules` of `test` against the custom rendering's alerts and rules: its result."""
    promtool = require_tool("promtool")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(custom["alerts"]))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(custom["rules"]))
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    return subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_custom_alert_fires_for_its_cluster_only(tmp_path, custom):
    """A real evaluation (promtool test rules): the rendered WhisperExporterDown fires for the configured
    job in the configured cluster, and not for the same job down in another cluster."""
    labels = 'job="speech",namespace="asr",instance="a:10111"'
    rule = next(r for g in custom["alerts"]["groups"] for r in g["rules"] if r["alert"] == "WhisperExporterDown")
    test = {"rule_files": ["alerts.yml", "rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f'up{{{labels},cluster="eu-1"}}', "values": "0x10"},
                         {"series": f'up{{{labels},cluster="us-1"}}', "values": "0x10"},
                         {"series": 'up{job="whisper",namespace="asr",cluster="eu-1",instance="b:10111"}', "values": "0x10"}],
        "alert_rule_test": [{"eval_time": "10m", "alertname": "WhisperExporterDown", "exp_alerts": [{
            "exp_labels": {"severity": "warning", "job": "speech", "namespace": "asr", "cluster": "eu-1",
                           "instance": "a:10111"},
            "exp_annotations": {
                "summary": rule["annotations"]["summary"], "runbook_url": rule["annotations"]["runbook_url"],
                "description": "Scrapes of a:10111 (job speech) have failed for 5 minutes (up = 0): nothing about"
                               " this Whisper service is being measured."}}]}],
    }]}
    result = promtool_test(tmp_path, custom, test)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def annotation_queries(mixin: dict) -> list[tuple[str, str]]:
    """(alert, format string) of every query an alert's annotations run: {{ printf "<query>" ... | query }}."""
    return [(r["alert"], m.group(1)) for g in mixin["alerts"]["groups"] for r in g["rules"]
            for text in r.get("annotations", {}).values()
            for m in re.finditer(r'printf "((?:[^"\\]|\\.)*)"[^|}]*\|\s*query', text)]


def test_custom_selectors_reach_annotation_queries(default, custom):
    """The queries that annotations run read the configured job, cluster and namespace, and each
    aggregation label at the alert's own value: on a central ruler they do not pick another cluster."""
    before, after = annotation_queries(default), annotation_queries(custom)
    assert [a for a, _ in after] == [a for a, _ in before] and len(after) >= 8
    escaped = MATCHERS.replace('"', '\\"')
    for (alert, old), (_, new) in zip(before, after, strict=True):
        found = series_read(new.replace('\\"', '"'))
        assert [m.group(1) for m in found] == [m.group(1) for m in series_read(old)] and found, alert
        for m in series_read(new):
            assert new[m.end():].startswith("{" + escaped + ",cluster='%["), (alert, new)
        verbs = old.count("%s")
        assert f"namespace='%[{verbs + 2}]s'" in new and "%s" not in new, (alert, new)
    text = next(t for g in custom["alerts"]["groups"] for r in g["rules"] if r["alert"] == "WhisperErrorRatioHigh"
                for t in r["annotations"].values() if "query" in t)
    assert '$labels.job (index $labels "cluster") (index $labels "namespace") | query' in text, text


def test_custom_annotation_query_reads_the_alerts_cluster(tmp_path, custom):
    """A real evaluation: WhisperReviewBacklogStale's description counts the pending samples of its own
    cluster, not those of the same job and instance in another cluster."""
    labels = 'job="speech",namespace="asr",instance="a:10111"'
    rule = next(r for g in custom["alerts"]["groups"] for r in g["rules"] if r["alert"] == "WhisperReviewBacklogStale")
    age = 4 * 86400
    series = [{"series": f'whisper_quality_review_oldest_pending_age_seconds{{{labels},cluster="{c}"}}',
               "values": f"{age}+60x70"} for c in ("ap-1", "eu-1")]
    series += [{"series": f'whisper_quality_review_pending_items{{{labels},cluster="{c}"}}', "values": f"{n}x70"}
               for c, n in (("ap-1", 99), ("eu-1", 7))]
    test = {"rule_files": ["alerts.yml", "rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [{"eval_time": "70m", "alertname": "WhisperReviewBacklogStale", "exp_alerts": [{
            "exp_labels": {"severity": "warning", "job": "speech", "namespace": "asr", "cluster": "eu-1",
                           "instance": "a:10111"},
            "exp_annotations": {
                "summary": rule["annotations"]["summary"], "runbook_url": rule["annotations"]["runbook_url"],
                "description": "The oldest sample pending review on a:10111 (job speech) has waited 4d 1h 10m 0s;"
                               " 7 samples are pending."}}]}],
    }]}
    result = promtool_test(tmp_path, custom, test)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
