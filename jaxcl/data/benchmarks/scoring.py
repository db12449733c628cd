"""String scorers of the offline benchmarks: exact match and ROUGE-L.

``rouge_l`` is the sentence-level ROUGE-L F1 of Lin (2004): with ``m`` the length of the longest
common subsequence of the token lists, ``P = m / |prediction|``, ``R = m / |reference|`` and
``F1 = 2PR / (P + R)`` (0 when either side has no tokens). Tokens are the lower-cased ``\\w+``
runs of the text, so accented French and German words count as words (``rouge_score``'s default
tokenizer keeps ASCII letters and digits only; on ASCII text the two agree, without stemming).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Sentence-level ROUGE-L F1 between ``prediction`` and ``reference`` (in [0, 1])."""
    p, r = tokens(prediction), tokens(reference)
    m = lcs_length(p, r)
    if m == 0:
        return 0.0
    precision, recall = m / len(p), m / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False) -> float:
    """1.0 when the texts agree after trimming and collapsing whitespace, else 0.0."""
    norm = (
        (lambda s: " ".join(s.split()).lower()) if ignore_case else (lambda s: " ".join(s.split()))
    )
    return float(norm(prediction) == norm(reference))


SCORERS = {"exact_match": exact_match, "rouge_l": rouge_l}


def score(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of scorer ``name`` (``exact_match`` or ``rouge_l``) over aligned pairs."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {', '.join(SCORERS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")
    fn = SCORERS[name]
    return sum(fn(p, r) for p, r in zip(predictions, references)) / len(references)
