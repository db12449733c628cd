"""Example custom scorers for ``metric: package.module:function`` (see docs/metrics.md).

A custom scorer receives the greedy generations of a task's eval prompts and the reference
responses, as decoded strings in the same order, and returns one number::

    def my_scorer(predictions: list[str], references: list[str]) -> float: ...
    my_scorer.higher_is_better = False  # optional; True when absent

Recipes name it by import path, e.g. ``metric: jaxcl.eval.custom:token_f1``; it is imported when
the recipe is validated, so a typo fails before any training.
"""

from __future__ import annotations

from collections import Counter

from jaxcl.data.benchmarks.scoring import tokens


def token_f1(predictions: list[str], references: list[str]) -> float:
    """Mean SQuAD-style token F1: the harmonic mean of the precision and recall of the
    prediction's lower-cased word tokens against the reference's (bags of words; 1.0 when both
    are empty, 0.0 when one is)."""
    total = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        p, r = tokens(prediction), tokens(reference)
        if not p or not r:
            total += float(p == r)
            continue
        common = sum((Counter(p) & Counter(r)).values())
        if common:
            precision, recall = common / len(p), common / len(r)
            total += 2 * precision * recall / (precision + recall)
    return total / max(len(references), 1)


token_f1.higher_is_better = True  # type: ignore[attr-defined]


def length_error(predictions: list[str], references: list[str]) -> float:
    """Mean absolute difference in word count between prediction and reference (lower is
    better): an example of a scorer whose direction is set by ``higher_is_better = False``."""
    gaps = [
        abs(len(tokens(p)) - len(tokens(r))) for p, r in zip(predictions, references, strict=True)
    ]
    return sum(gaps) / max(len(gaps), 1)


length_error.higher_is_better = False  # type: ignore[attr-defined]
