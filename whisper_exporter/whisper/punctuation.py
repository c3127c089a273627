"""Punctuation Error Rate (PER), as LibriSpeech-PC defines it and NeMo computes it.

Meister et al. 2023 (arXiv 2310.02943) define PER over the punctuation marks of a
reference and a hypothesis; NeMo implements it in
nemo/collections/common/metrics/punct_er.py. This follows that code step by step:

1. Both raw texts (not Whisper's normalisers, which drop punctuation) are split
   into tokens: runs of word characters and apostrophes, and single marks.
   Anything else (spaces, quotes, dashes, colons ...) separates tokens and is
   not counted.
2. Every mark is masked with one token, and the two masked sequences are
   aligned by Levenshtein distance (unit costs). Ties break as NeMo's do:
   equal tokens match; otherwise substitution, then insertion, then deletion;
   the path is traced back from the end.
3. Where the path matches a masked token with a masked token, the two marks
   are compared: the same mark is correct, another is a substitution (counted
   on the reference's mark). Every other reference mark is a deletion and
   every other hypothesis mark an insertion.

PER = (S + D + I) / (C + S + D + I), summed over marks and utterances, so a
corpus PER is a ratio of counts (what the metrics export).

Marks counted: . , ? ! (NeMo's own example set; LibriSpeech-PC's comma,
period and question mark, and the exclamation mark Whisper writes). Before
tokenising, both texts are NFKC-normalised, which turns the full-width
，？！ (and ．) into , ? !, and 。 and 、 (which NFKC keeps) are mapped to . and
, explicitly. Like NeMo, "..." counts as three periods and the point in
"3.5" as one; colons, semicolons, quotes, dashes and the Spanish ¿ ¡ are not
counted.

An utterance whose reference has no counted mark is not scored: the
reference was written without punctuation (LibriSpeech's own transcripts,
a reviewer who typed none), and every mark the server wrote would count as
an insertion. The alignment is quadratic, so a pair above MAX_CELLS is not
scored either (result "too_long").
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

# The counted marks and their metric label values (a label named by a word reads better in PromQL).
MARKS: dict[str, str] = {".": "period", ",": "comma", "?": "question_mark", "!": "exclamation_mark"}
RESULTS = ("correct", "substituted", "deleted", "inserted")
# Utterance outcomes: scored, or why not.
SCORED, NO_REFERENCE_MARKS, TOO_LONG = "scored", "no_reference_marks", "too_long"
OUTCOMES = (SCORED, NO_REFERENCE_MARKS, TOO_LONG)
# Marks NFKC leaves alone: the ideographic full stop and comma.
EXPLICIT = str.maketrans({"\u3002": ".", "\u3001": ","})
# A 1000 x 1000 token alignment takes about half a second here; a longer pair is not scored.
MAX_CELLS = 1_000_000

_MASK = -1  # the masked mark, among token ids that are otherwise >= 0
_TOKEN = re.compile(r"[\w']+|[" + re.escape("".join(MARKS)) + "]")
_COR, _SUB, _INS, _DEL = 0, 1, 2, 3


def normalize(text: str) -> str:
    """NFKC, then the ideographic full stop and comma as . and ,."""
    return unicodedata.normalize("NFKC", text or "").translate(EXPLICIT)


def tokens(text: str) -> list[str]:
    """NeMo's tokens of the normalised text: word runs (with apostrophes) and single marks."""
    return _TOKEN.findall(normalize(text))


def has_marks(text: str) -> bool:
    """Whether the text has a counted mark (after normalisation)."""
    return any(t in MARKS for t in tokens(text))


def _zero() -> dict[str, dict[str, int]]:
    return {name: dict.fromkeys(RESULTS, 0) for name in MARKS.values()}


@dataclass
class Punctuation:
    """Per-mark counts of one utterance (or a sum of them), and whether it was scored."""

    outcome: str = SCORED
    counts: dict[str, dict[str, int]] = field(default_factory=_zero)  # mark name -> result -> n
    substitutions: dict[tuple[str, str], int] = field(default_factory=dict)  # (reference, hypothesis) -> n

    @property
    def scored(self) -> bool:
        return self.outcome == SCORED

    def total(self, result: str) -> int:
        return sum(c[result] for c in self.counts.values())

    @property
    def errors(self) -> int:
        return self.total("substituted") + self.total("deleted") + self.total("inserted")

    @property
    def operations(self) -> int:
        return self.errors + self.total("correct")

    @property
    def error_rate(self) -> float | None:
        """(S + D + I) / (C + S + D + I); None when no mark was in either text."""
        return self.errors / self.operations if self.operations else None

    def add(self, other: "Punctuation") -> None:
        """Add a scored utterance's counts to these."""
        for mark, results in other.counts.items():
            for result, n in results.items():
                self.counts[mark][result] += n
        for pair, n in other.substitutions.items():
            self.substitutions[pair] = self.substitutions.get(pair, 0) + n

    def to_dict(self) -> dict[str, object]:
        return {"outcome": self.outcome, "error_rate": self.error_rate,
                "marks": {m: dict(c) for m, c in self.counts.items()},
                "substitutions": [{"reference": r, "hypothesis": h, "count": n}
                                  for (r, h), n in sorted(self.substitutions.items())]}


def count(reference: str, hypothesis: str) -> Punctuation:
    """NeMo's per-mark counts for one pair, whether or not the reference has marks."""
    ref, hyp = tokens(reference), tokens(hypothesis)
    out = Punctuation()
    if not any(t in MARKS for t in ref) and not any(t in MARKS for t in hyp):
        return out
    if (len(ref) + 1) * (len(hyp) + 1) > MAX_CELLS:
        out.outcome = TOO_LONG
        return out
    ids: dict[str, int] = {}  # tokens as small ints: the inner loop compares ints

    def masked(seq: list[str]) -> list[int]:
        return [_MASK if t in MARKS else ids.setdefault(t, len(ids)) for t in seq]

    r, h = masked(ref), masked(hyp)
    n, m = len(r), len(h)
    # Costs one row at a time; the back-pointers of every cell, one byte each.
    back = [bytearray([_INS]) * (m + 1)]
    prev = list(range(m + 1))
    for i in range(1, n + 1):
        row = bytearray(m + 1)
        row[0] = _DEL
        cur = [i] * (m + 1)
        ri = r[i - 1]
        for j in range(1, m + 1):
            if ri == h[j - 1]:
                cur[j] = prev[j - 1]
                continue  # _COR is 0, the bytearray's default
            sub, ins, dele = prev[j - 1] + 1, cur[j - 1] + 1, prev[j] + 1
            best = min(sub, ins, dele)
            cur[j] = best
            row[j] = _SUB if best == sub else _INS if best == ins else _DEL
        back.append(row)
        prev = cur
    i, j = n, m
    while i > 0 or j > 0:
        step = back[i][j]
        if step == _COR and i > 0 and j > 0:
            if r[i - 1] == _MASK:
                a, b = ref[i - 1], hyp[j - 1]
                if a == b:
                    out.counts[MARKS[a]]["correct"] += 1
                else:
                    out.counts[MARKS[a]]["substituted"] += 1
                    out.substitutions[(MARKS[a], MARKS[b])] = out.substitutions.get((MARKS[a], MARKS[b]), 0) + 1
            i, j = i - 1, j - 1
        elif step == _SUB:
            i, j = i - 1, j - 1
        elif step == _INS:
            j -= 1
        else:
            i -= 1
    # What the path did not match: deletions of the reference's marks, insertions of the hypothesis'.
    for char, mark in MARKS.items():
        c = out.counts[mark]
        into = sum(k for (_, b), k in out.substitutions.items() if b == mark)
        c["deleted"] = ref.count(char) - c["correct"] - c["substituted"]
        c["inserted"] = hyp.count(char) - c["correct"] - into
    return out


def score(reference: str, hypothesis: str) -> Punctuation:
    """The counts of one utterance, or why it is not scored (a reference without marks, too long)."""
    if not has_marks(reference):
        return Punctuation(outcome=NO_REFERENCE_MARKS)
    return count(reference, hypothesis)
