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

  // A query an annotation runs ({{ with printf "<query>" $labels.job | query }}) reads series too: it
  // gets the matchers (escaped for the template's string literal and for printf), and each aggregation
  // label is matched to the alert's own value, so on a central ruler it reads the alert's cluster.
  local goLiteral(m) = std.strReplace(std.strReplace(std.strReplace(m, '\\', '\\\\'), '"', '\\"'), '%', '%%'),
  // The first '"' of s that no backslash escapes: the end of the format string.
  local closingQuote(s, i=0) =
    if i >= std.length(s) then error 'mixin: an annotation printf without its closing quote: ' + s
    else if s[i] == '\\' then closingQuote(s, i + 2)
    else if s[i] == '"' then i
    else closingQuote(s, i + 1),
  local templateQuery(part) =
    local q = closingQuote(part);
    local format = std.substr(part, 0, q), rest = std.substr(part, q + 1, std.length(part) - q - 1);
    local pipes = std.findSubstr('|', rest), ends = std.findSubstr('}}', rest);
    local isQuery = pipes != [] && (ends == [] || pipes[0] < ends[0])
                    && std.startsWith(std.stripChars(std.substr(rest, pipes[0] + 1, std.length(rest)), ' '), 'query');
    local verbs = std.length(std.findSubstr('%s', format));
    local labels = cfg.aggregationLabels;
    // Explicit argument indexes, so that the labels' arguments can go last whatever the matchers' place.
    local indexed = if labels == [] then format else std.join('', [
      (if i > 0 then '%[' + i + ']s' else '') + std.split(format, '%s')[i]
      for i in std.range(0, verbs)
    ]);
    local labelMatchers = ["%s='%%[%d]s'" % [labels[j], verbs + 1 + j] for j in std.range(0, std.length(labels) - 1)];
    local all = std.join(',', std.filter(function(m) m != '', [goLiteral(matchers)] + labelMatchers));
    local args = std.join('', [' (index $labels "%s")' % l for l in labels]);
    if !isQuery then 'printf "' + part
    else if std.length(std.findSubstr('%', format)) != verbs + 2 * std.length(std.findSubstr('%%', format)) then
      error 'mixin: an annotation query with a printf verb other than %s: ' + format
    else
      local before = std.substr(rest, 0, pipes[0]);
      'printf "' + promql.rewrite(indexed, all, labels) + '"' + (if labels == [] then before else std.rstripChars(before, ' ') + args + ' ')
      + std.substr(rest, pipes[0], std.length(rest) - pipes[0]),
  local annotation(text) =
    if matchers == '' && cfg.aggregationLabels == [] then text
    else local parts = std.split(text, 'printf "');
    std.join('', [parts[0]] + [templateQuery(p) for p in parts[1:]]),
  local renderRule(r) = r + { expr: ruleExpr(r.expr) } + (
    if std.objectHas(r, 'annotations') then { annotations: std.mapWithKey(function(k, v) annotation(v), r.annotations) }
    else {}
  ),
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
