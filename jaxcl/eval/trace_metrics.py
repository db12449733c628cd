"""TRACE's own task metrics as custom scorers (``metric: jaxcl.eval.trace_metrics:NAME``).

TRACE (Wang et al., 2023, arXiv:2310.06762) scores its tasks with ``metrics.py`` and
``evaluations/eval_<Task>.py`` of its repository (github.com/BeyonderXX/TRACE). Each scorer here
follows that code on the greedy generations, without its dependencies (fuzzywuzzy, the
``sari`` metric of Hugging Face ``datasets``/``evaluate``, sacrebleu), and returns TRACE's value
divided by 100 where TRACE prints a percentage, so that every score lies in [0, 1] like
``exact_match`` and ``rouge_l``:

=====================  ==========================  ==============================================
scorer                 TRACE task (TRACE's name)   value
=====================  ==========================  ==============================================
``edit_similarity``    Py150 ("similarity")        mean fuzzywuzzy ``fuzz.ratio`` / 100
``scienceqa_accuracy`` ScienceQA ("accuracy")      answer letter after ``"Answer: "`` matches
``accuracy``           C-STANCE, FOMC, NumGLUE     ``prediction == reference`` (non-empty)
``sari``               20Minuten ("sari")          mean sentence SARI / 100, source = the prompt
=====================  ==========================  ==============================================

TRACE's ``caculate_*`` functions skip a pair whose prediction or reference is empty (after its
post-processing) but still divide by the number of pairs: such a pair scores 0 here too.
``accuracy`` is what ``exact_match`` computes in one forward pass (see docs/metrics.md), so the
recipe keeps ``exact_match`` for C-STANCE, FOMC and NumGLUE.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "accuracy",
    "answer_letter",
    "edit_similarity",
    "fuzz_ratio",
    "normalize_13a",
    "py150_postprocess",
    "sari",
    "sari_sentence",
    "scienceqa_accuracy",
]


def _pairs(predictions: Sequence[str], references: Sequence[str]) -> list[tuple[str, str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return list(zip(predictions, references))


# ---------------------------------------------------------------------------------------------
# Accuracy (C-STANCE, FOMC, NumGLUE-cm, NumGLUE-ds): metrics.py caculate_accuracy


def accuracy(predictions: list[str], references: list[str]) -> float:
    """TRACE's ``caculate_accuracy``: the fraction of pairs whose prediction equals the
    reference exactly (no stripping, no number or label extraction); an empty prediction or
    reference counts as wrong."""
    pairs = _pairs(predictions, references)
    hits = sum(1 for p, r in pairs if p != "" and r != "" and p == r)
    return hits / len(pairs) if pairs else 0.0


accuracy.higher_is_better = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# ScienceQA: evaluations/eval_ScienceQA.py resolve() + caculate_accuracy


def answer_letter(text: str) -> str:
    """The one character after the first ``"Answer: "`` in ``text`` (TRACE's ``resolve``), or
    ``""`` when there is none (no ``"Answer: "``, or nothing after it)."""
    at = text.find("Answer: ")
    return "" if at == -1 else text[at + 8 : at + 9]


def scienceqa_accuracy(predictions: list[str], references: list[str]) -> float:
    """TRACE's ScienceQA accuracy: the fraction of pairs whose :func:`answer_letter` is the same
    in the prediction and the reference (``"Answer: B\\nBecause ..."``); a pair where either has
    no answer letter counts as wrong."""
    pairs = _pairs(predictions, references)
    return accuracy([answer_letter(p) for p, _ in pairs], [answer_letter(r) for _, r in pairs])


scienceqa_accuracy.higher_is_better = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Py150: evaluations/eval_Py150.py postprocess() + metrics.py caculate_fuzz (fuzz.ratio)

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_postprocess(code: str) -> str:
    """TRACE's Py150 ``postprocess``: ``<NUM_LIT>`` -> ``0``, ``<STR_LIT>`` and ``<CHAR_LIT>``
    removed, ``<STR_LIT:x>`` / ``<NUM_LIT:x>`` / ``<CHAR_LIT:x>`` -> ``x`` (``<EOL>`` kept)."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, text in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{text}>", text)
    return code


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio(a, b)`` as installed from TRACE's requirements.txt (fuzzywuzzy
    without python-Levenshtein, so its ``SequenceMatcher`` is :mod:`difflib`'s): 100 when the
    strings are equal, 0 when one is empty, else ``round(100 * 2M / (len(a) + len(b)))`` with
    ``M`` the characters in ``difflib.SequenceMatcher(None, a, b)``'s matching blocks
    (Ratcliff-Obershelp; its default autojunk heuristic included) and Python's round half to
    even."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def edit_similarity(predictions: list[str], references: list[str]) -> float:
    """TRACE's Py150 "similarity" / 100: the mean over pairs of
    ``fuzz_ratio(post(prediction), post(reference)) / 100``, ``post`` being
    :func:`py150_postprocess`; a pair empty after post-processing scores 0."""
    pairs = [
        (py150_postprocess(p), py150_postprocess(r)) for p, r in _pairs(predictions, references)
    ]
    total = sum(fuzz_ratio(p, r) for p, r in pairs if p != "" and r != "")
    return total / (100 * len(pairs)) if pairs else 0.0


edit_similarity.higher_is_better = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# 20Minuten: metrics.py caculate_sari = the `sari` metric of HF datasets (load_metric("sari"))

_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period, comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period, comma unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
)


def normalize_13a(sentence: str) -> str:
    """Lower-cased and tokenised as the ``sari`` metric does before splitting on spaces: the
    13a tokenizer of sacrebleu (mteval-v13a.pl: ``<skipped>`` and ``-\\n`` removed, newlines to
    spaces, the four HTML entities unescaped, punctuation and symbols split off, periods and
    commas split off unless between digits), tokens joined by single spaces."""
    line = sentence.lower()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision > 0 or recall > 0 else 0.0


def _sari_ngram(
    source: list[tuple[str, ...]], output: list[tuple[str, ...]], refs: list[list[tuple[str, ...]]]
) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) of one n-gram order."""
    k = len(refs)
    ref = Counter(g for r in refs for g in r)
    src = Counter({g: c * k for g, c in Counter(source).items()})
    out = Counter({g: c * k for g, c in Counter(output).items()})
    # keep: n-grams of the source kept in the output, good where the references keep them too
    keep = src & out
    keep_good = keep & ref
    keep_all = src & ref
    keep_p = sum(keep_good[g] / keep[g] for g in keep) / len(keep) if keep else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    # delete: n-grams of the source left out, good where the references leave them out too
    delete = src - out
    delete_good = delete - ref
    del_p = sum(delete_good[g] / delete[g] for g in delete) / len(delete) if delete else 1.0
    # add: n-grams new in the output (types, not counts), good where a reference has them
    add = set(out) - set(src)
    add_good = add & set(ref)
    add_all = set(ref) - set(src)
    add_p = len(add_good) / len(add) if add else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI (Xu et al., 2016) of one output in [0, 1], as the ``sari`` metric of Hugging Face
    ``datasets``/``evaluate`` computes it (after tensor2tensor's ``sari_hook``).

    All three texts are :func:`normalize_13a`-ed and split on single spaces. For each n in 1..4,
    with S, O, R the n-gram multisets of source, output and references (source and output counts
    times the number of references, R pooled over references), ``&``/``-`` multiset
    intersection/difference and ``avg_g`` the mean over the distinct n-grams g of a multiset:

    * keep: K = S & O; P_keep = avg_g (K & R)[g] / K[g]; R_keep = |K & R| / |S & R|;
      F_keep their harmonic mean;
    * delete: D = S - O; P_del = avg_g (D - R)[g] / D[g] (no recall: SARI uses the precision);
    * add (sets of n-gram types): A = O \\ S; P_add = |A ∩ R| / |A|;
      R_add = |A ∩ R| / |R \\ S|; F_add their harmonic mean;

    a ratio 0/0 is 1 (so an output equal to its reference scores 1), an F of P = R = 0 is 0.
    SARI = (mean_n F_keep + mean_n P_del + mean_n F_add) / 3.
    """
    refs = [normalize_13a(r).split(" ") for r in references]
    src, out = normalize_13a(source).split(" "), normalize_13a(prediction).split(" ")
    keep = delete = add = 0.0
    for n in range(1, 5):
        k, d, a = _sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(r, n) for r in refs])
        keep, delete, add = keep + k, delete + d, add + a
    return (keep / 4 + delete / 4 + add / 4) / 3


def sari(predictions: list[str], references: list[str], prompts: list[str]) -> float:
    """TRACE's 20Minuten SARI / 100: the mean of :func:`sari_sentence` over examples, with one
    reference each and, as TRACE's source, the example's whole prompt text (TRACE passes its
    collator's ``sources``, the instruction included)."""
    if len(prompts) != len(predictions):
        raise ValueError(f"{len(prompts)} prompts for {len(predictions)} predictions")
    pairs = _pairs(predictions, references)
    total = sum(sari_sentence(s, p, [r]) for s, (p, r) in zip(prompts, pairs))
    return total / len(pairs) if pairs else 0.0


sari.higher_is_better = True  # type: ignore[attr-defined]
