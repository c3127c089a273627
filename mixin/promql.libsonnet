// Rewrites a PromQL expression for the mixin's _config: adds label matchers to every selector of
// a whisper metric (whisper_*, recorded series with a ':' in their name, and up) and labels to
// every by (...) and on (...), so that aggregations and joins keep a cluster or namespace apart.
// Strings, label matchers and [ranges] are copied as they are; nothing changes when both are empty.
local isAlpha(c) = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
local isWord(c) = isAlpha(c) || (c >= '0' && c <= '9');
local isMetric(t) = std.startsWith(t, 'whisper_') || std.member(t, ':') || t == 'up';
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
  local end = std.foldl(step, std.stringChars(expr), init);
  if matchers == '' && lead == '' then expr
  else if end.tok != '' && isMetric(end.tok) && matchers != '' then end.out + end.tok + '{' + matchers + '}'
  else end.out + end.tok;

{
  rewrite:: rewrite,
}
