// Rewrites a PromQL expression for the mixin's _config: adds label matchers to every selector of
// a series the rules and dashboards read (whisper_*, recorded series with a ':' in their name, the
// exporter's own process_*, and Prometheus' up, scrape_* and ALERTS) and labels to
// every by (...) and on (...), so that aggregations and joins keep a cluster or namespace apart.
// Strings, label matchers and [ranges] are copied as they are; nothing changes when both are empty.
local isAlpha(c) = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
local isWord(c) = isAlpha(c) || (c >= '0' && c <= '9');
local isMetric(t) =
  std.startsWith(t, 'whisper_') || std.member(t, ':') || std.startsWith(t, 'process_') || std.startsWith(t, 'scrape_')
  || t == 'up' || t == 'ALERTS';
local isSpace(c) = c == ' ' || c == '\n' || c == '\t';

local rewrite(expr, matchers, labels) =
  local lead = std.join(', ', labels);
  // One character in code, brace (label matchers), bracket (range) or str (a quoted string) mode.
  local plain(s, c) =
    if s.mode == 'str' then
      s { out+: c, esc: c == '\\' && !s.esc, mode: if c == s.q && !s.esc then s.ret else 'str' }
    else if c == '"' || c == "'" || c == '`' then
      s { out+: c, mode: 'str', q: c, ret: s.mode, esc: false }
    else if s.mode == 'brace' then
      s { out+: c, mode: if c == '}' then 'code' else 'brace' }
    else if s.mode == 'bracket' then
      s { out+: c, mode: if c == ']' then 'code' else 'bracket' }
    else if c == '{' then s { out+: c, mode: 'brace' }
    else if c == '[' then s { out+: c, mode: 'bracket' }
    else if isAlpha(c) then s { tok: c }
    else s { out+: c };
  // After by or on: the labels go first in the list that opens next.
  local wanting(s, c) =
    if c == '(' then s { want: false, out+: '(' + lead, comma: ', ' }
    else if isSpace(c) then s { want: true, out+: c }
    else plain(s { want: false }, c);
  // The character c that follows a finished word: the metric's matchers, or by/on's labels, go first.
  local afterWord(s, c) =
    local t = s.tok;
    local t0 = s { tok: '', out+: t };
    if isMetric(t) && matchers != '' then
      if c == '{' then t0 { out+: '{' + matchers, comma: ',', mode: 'brace' }
      else plain(t0 { out+: '{' + matchers + '}' }, c)
    else if (t == 'by' || t == 'on') && lead != '' then
      wanting(t0, c)
    else plain(t0, c);
  local step(s0, c) =
    // A comma between what was added and what was there, unless the list was empty.
    local s = if s0.comma == '' then s0
    else if c == '}' || c == ')' then s0 { comma: '' }
    else s0 { comma: '', out+: s0.comma };
    if s.mode == 'code' && s.tok != '' then
      if isWord(c) then s { tok+: c } else afterWord(s, c)
    else if s.mode == 'code' && s.want then wanting(s, c)
    else plain(s, c);
  local init = { out: '', mode: 'code', tok: '', comma: '', want: false, q: '', ret: 'code', esc: false };
  // A flat copy at each step, its fields evaluated now: a chain of extended objects, or of lazy
  // fields, would make every lookup walk it (seconds per dashboard, then too deep a stack).
  local flat(s) =
    local out = s.out, mode = s.mode, tok = s.tok, comma = s.comma, want = s.want, q = s.q, ret = s.ret, esc = s.esc;
    // The condition forces each local once (object fields would be evaluated again at each lookup).
    if std.length(out + mode + tok + comma + q + ret) >= 0 && std.isBoolean(want) && std.isBoolean(esc) then
      { out: out, mode: mode, tok: tok, comma: comma, want: want, q: q, ret: ret, esc: esc }
    else error 'unreachable';
  local end = std.foldl(function(s, c) flat(step(s, c)), std.stringChars(expr), init);
  if matchers == '' && lead == '' then expr
  else if end.tok != '' && isMetric(end.tok) && matchers != '' then end.out + end.tok + '{' + matchers + '}'
  else end.out + end.tok;

{
  rewrite:: rewrite,
}
