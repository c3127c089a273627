// The whisper-exporter monitoring mixin (in the style of node_exporter's docs/node-mixin).
// Its one source of truth is the committed rules/*.yml and dashboards/*.json (written by
// dashboards/generate.py): it imports them and applies _config, so that with the defaults it
// renders exactly those files and the two cannot drift (tests/test_mixin.py). See mixin/README.md.
local promql = import 'mixin/promql.libsonnet';

// jsonnet imports need literal paths: a new rules or dashboard file is added here too
// (tests/test_mixin.py fails until it is).
local ruleFiles = {
  'capacity.yml': importstr 'rules/capacity.yml',
  'exporter.yml': importstr 'rules/exporter.yml',
  'gpu.yml': importstr 'rules/gpu.yml',
  'hallucination.yml': importstr 'rules/hallucination.yml',
  'latency.yml': importstr 'rules/latency.yml',
  'quality.yml': importstr 'rules/quality.yml',
  'recording.yml': importstr 'rules/recording.yml',
  'review.yml': importstr 'rules/review.yml',
  'service.yml': importstr 'rules/service.yml',
  'slo.yml': importstr 'rules/slo.yml',
  'streaming.yml': importstr 'rules/streaming.yml',
};
local dashboardFiles = {
  'whisper-exporter.json': import 'dashboards/whisper-exporter.json',
  'whisper-fleet.json': import 'dashboards/whisper-fleet.json',
  'whisper-overview.json': import 'dashboards/whisper-overview.json',
  'whisper-performance.json': import 'dashboards/whisper-performance.json',
  'whisper-quality.json': import 'dashboards/whisper-quality.json',
  'whisper-resources.json': import 'dashboards/whisper-resources.json',
};

// The committed files' own job matcher, for scrape configs whose job name has "whisper" in it:
// a configured jobSelector takes its place (both together would match only jobs with both).
local committedJob = 'job=~".*whisper.*"';
local dropCommittedJob(e) =
  std.strReplace(std.strReplace(std.strReplace(e, '{' + committedJob + '}', ''), committedJob + ',', ''), ',' + committedJob, '');

{
  _config+:: {
    // Label matchers added to every selector of a whisper metric, e.g. 'job="speech"'. Empty: as committed.
    jobSelector: '',
    // e.g. 'cluster="eu-1"' for one cluster's rules on a central ruler (Thanos, Mimir, vmalert).
    clusterSelector: '',
    // e.g. 'namespace="asr"'.
    namespaceSelector: '',
    // Labels every by (...) and on (...) of the rules keeps, e.g. ['cluster'] where one ruler sees
    // several clusters: without them job-level sums add the clusters up and joins cross them.
    aggregationLabels: [],
  },

  local cfg = self._config,
  local matchers = std.join(',', std.filter(function(m) m != '', [cfg.jobSelector, cfg.clusterSelector, cfg.namespaceSelector])),
  local ruleExpr(e) = promql.rewrite(if cfg.jobSelector != '' then dropCommittedJob(e) else e, matchers, cfg.aggregationLabels),
  // Dashboards aggregate for display (by (le) of a heatmap): they get the matchers, not the labels.
  local panelExpr(e) = promql.rewrite(e, matchers, []),

  local renderRule(r) = r + { expr: ruleExpr(r.expr) },
  local renderFile(text) =
    local doc = std.parseYaml(text);
    doc { groups: [g { rules: std.map(renderRule, g.rules) } for g in doc.groups] },

  // Each rules file rendered whole, by file name (the layout of rules/).
  ruleFiles:: { [name]: renderFile(ruleFiles[name]) for name in std.objectFields(ruleFiles) },

  local groupsOf(kind) = [
    g { rules: std.filter(function(r) std.objectHas(r, kind), g.rules) }
    for name in std.objectFields($.ruleFiles)
    for g in $.ruleFiles[name].groups
    if std.length(std.filter(function(r) std.objectHas(r, kind), g.rules)) > 0
  ],
  prometheusAlerts+:: { groups+: groupsOf('alert') },
  prometheusRules+:: { groups+: groupsOf('record') },

  // Rewrites every PromQL string of a dashboard: targets' and annotations' expr, variables' query.
  local renderDashboard(d) =
    local walk(o) =
      if std.isObject(o) then {
        [k]: if (k == 'expr' || k == 'query' || k == 'definition') && std.isString(o[k]) then panelExpr(o[k]) else walk(o[k])
        for k in std.objectFields(o)
      }
      else if std.isArray(o) then std.map(walk, o)
      else o;
    walk(d),
  grafanaDashboards+:: { [name]: renderDashboard(dashboardFiles[name]) for name in std.objectFields(dashboardFiles) },
}
