"""TRACE's own task metrics (jaxcl.eval.trace_metrics) against hand-computed values, and the
`prompts` keyword of the custom-scorer contract through the generation path."""

from types import SimpleNamespace

import pytest

from jaxcl.eval import HIGHER_IS_BETTER
from jaxcl.eval.scoring import check_metric, load_scorer
from jaxcl.eval.tasks import Generated, prompt_texts, score_strings, takes_prompts
from jaxcl.eval.trace_metrics import (
    accuracy,
    answer_letter,
    edit_similarity,
    fuzz_ratio,
    normalize_13a,
    py150_postprocess,
    sari,
    sari_sentence,
    scienceqa_accuracy,
)

# ------------------------------------------------------------------------------ Py150


def test_fuzz_ratio_closed_form():
    # "return x" vs "return y": difflib matches "return " (M = 7): 2M / T = 14 / 16 -> 87.5 -> 88
    assert fuzz_ratio("return x", "return y") == round(100 * 14 / 16) == 88
    assert fuzz_ratio("abcd", "abcd") == 100
    assert fuzz_ratio("abc", "") == 0 and fuzz_ratio("", "abc") == 0
    assert fuzz_ratio("", "") == 100  # equal strings come first, as in fuzzywuzzy
    assert fuzz_ratio("abc", "xyz") == 0
    # 2M/T = 2/8 = 0.25 -> 25; "ab" vs "ba": M = 1 -> 2/4 -> 50
    assert fuzz_ratio("abcd", "axyz") == 25 and fuzz_ratio("ab", "ba") == 50
    # Python's round half to even: M = 1 of "a" + "bbbbbbb" ... 2/16 = 12.5 -> 12
    assert fuzz_ratio("a", "bbbbbabbbbbbbbb") == 12
    # "abc" vs "cab": the longest block "ab" and nothing around it: M = 2, 4/6 -> 67
    assert fuzz_ratio("abc", "cab") == fuzz_ratio("cab", "abc") == 67


def test_py150_postprocess_literals():
    code = "x = <NUM_LIT> + <NUM_LIT:3> + len(<STR_LIT>) + <STR_LIT:foo> + <CHAR_LIT:a> <EOL>"
    assert py150_postprocess(code) == "x = 0 + 3 + len() + foo + a <EOL>"
    assert py150_postprocess("<STR_LIT:a b>") == "a b"
    assert py150_postprocess("print ( <CHAR_LIT> )") == "print (  )"


def test_edit_similarity_mean_over_all_pairs():
    preds = ["return x", "<NUM_LIT:1>", "", "abcd"]
    refs = ["return y", "1", "pass", "<STR_LIT>"]
    # 88, equal after post-processing -> 100, empty prediction -> 0, empty reference -> 0
    assert edit_similarity(preds, refs) == pytest.approx((88 + 100 + 0 + 0) / 400)
    assert edit_similarity([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        edit_similarity(["a", "b"], ["a"])


# ------------------------------------------------------------------------------ ScienceQA


def test_answer_letter():
    assert answer_letter("Answer: B\nBecause it is.") == "B"
    assert answer_letter("I think... Answer: C") == "C"
    assert answer_letter("Answer: A, no wait Answer: B") == "A"  # the first one
    assert answer_letter("Answer:B") == ""  # TRACE looks for "Answer: " with the space
    assert answer_letter("Answer: ") == ""  # nothing after it
    assert answer_letter("B") == "" and answer_letter("") == ""
    assert answer_letter("Answer: (B)") == "("  # one character, whatever it is


def test_scienceqa_accuracy():
    refs = ["Answer: A\nBecause x.", "Answer: B\nBecause y.", "Answer: C\nBecause z.", "Answer: D"]
    preds = ["Answer: A\nBecause nothing.", "Answer: C\nBecause y.", "C", ""]
    # right letter (reasoning ignored), wrong letter, no "Answer: " found, empty prediction
    assert scienceqa_accuracy(preds, refs) == 0.25
    assert scienceqa_accuracy(refs, refs) == 1.0
    # a reference without a letter cannot be matched, even by an identical prediction
    assert scienceqa_accuracy(["no letter"], ["no letter"]) == 0.0
    assert scienceqa_accuracy([], []) == 0.0


# ------------------------------------------------------------------------------ accuracy


def test_accuracy_is_exact_string_equality():
    preds = ["hawkish", "hawkish ", "42", "", "Dovish"]
    refs = ["hawkish", "hawkish", "42.0", "", "dovish"]
    # only the first: no stripping, no number parsing, no case folding; empty pairs count 0
    assert accuracy(preds, refs) == 0.2
    assert accuracy([], []) == 0.0


# ------------------------------------------------------------------------------ SARI


def test_normalize_13a():
    assert normalize_13a("Der Hund, der (laut) bellt.") == "der hund , der ( laut ) bellt ."
    assert normalize_13a("3.5 und 1,000 aber x.y") == "3.5 und 1,000 aber x . y"
    assert normalize_13a("a &amp; b\nc 2-3") == "a & b c 2 - 3"
    assert normalize_13a("  ") == ""


def test_sari_hand_worked():
    """S = "a b c", O = "a b d", R = "a d" (one reference), by the definition:

    n=1: keep K = {a, b}, K & R = {a}: P = (1 + 0) / 2, R = 1/1 -> F = 2/3;
         delete D = {c}, none in R: P = 1; add A = {d} = R - S: P = R = 1 -> F = 1.
    n=2: keep {"a b"} not in R: P = 0, S & R empty: R = 1 (0/0) -> F = 0;
         delete {"b c"}: P = 1; add A = {"b d"}, R - S = {"a d"}: P = R = 0 -> F = 0.
    n=3: keep empty: P = R = 1 -> F = 1; delete {"a b c"}: P = 1;
         add A = {"a b d"}, R has no 3-grams: P = 0, R = 1 (0/0) -> F = 0.
    n=4: nothing anywhere: F_keep = P_del = F_add = 1.
    SARI = ((2/3 + 0 + 1 + 1)/4 + (1 + 1 + 1 + 1)/4 + (1 + 0 + 0 + 1)/4) / 3 = 13/18.
    """
    assert sari_sentence("a b c", "a b d", ["a d"]) == pytest.approx(13 / 18)


def test_sari_counts_and_identity():
    # an output equal to its reference (no repeated n-grams) scores 1
    assert sari_sentence("ganz anderer Satz", "Ein Satz .", ["Ein Satz ."]) == pytest.approx(1.0)
    # S = "a a b", O = "a a", R = "a": n=1 keep K = {a: 2}, K & R = {a: 1}: P = 1/2,
    # |K & R| / |S & R| = 1/1 -> F = 2/3; delete {b}: P = 1; add none, R - S empty: F = 1.
    # n=2: S = {"a a", "a b"}, O = {"a a"}, R none: keep P = 0/1, R = 1 (0/0) -> F = 0;
    # delete {"a b"}: P = 1; add: F = 1. n=3: keep none (P = R = 1), delete {"a a b"}: 1, add 1.
    # n=4: all 1. SARI = ((2/3 + 0 + 1 + 1)/4 + 1 + 1) / 3 = 8/9.
    assert sari_sentence("a a b", "a a", ["a"]) == pytest.approx(8 / 9)


def test_sari_published_example():
    """The example in the `sari` metric's documentation (three references): 26.9536..."""
    refs = [
        "About 95 species are currently known .",
        "About 95 species are now accepted .",
        "95 species are now accepted .",
    ]
    value = sari_sentence(
        "About 95 species are currently accepted .", "About 95 you now get in .", refs
    )
    assert 100 * value == pytest.approx(26.953601953601954, abs=1e-12)


def test_sari_corpus_mean_and_edges():
    prompts = ["a b c", "x y"]
    assert sari(["a b d", "x y"], ["a d", "x y"], prompts) == pytest.approx((13 / 18 + 1) / 2)
    # an empty prediction: normalised and split on " " it is one empty token "" (as in the
    # `sari` metric), which counts as an added 1-gram that no reference has.
    # n=1: keep K empty: P = 1, S & R = {a}: R = 0 -> F = 0; delete {a, b}, only b good: P = 1/2;
    # add {""}: P = 0, R - S empty: R = 1 -> F = 0. n=2: keep 1 (0/0), delete {"a b"}: 1, add 1.
    # n>=3: all 1. SARI = ((0 + 1 + 1 + 1)/4 + (1/2 + 1 + 1 + 1)/4 + (0 + 1 + 1 + 1)/4) / 3 = 19/24
    assert sari([""], ["a"], ["a b"]) == pytest.approx(19 / 24)
    assert sari([], [], []) == 0.0
    with pytest.raises(ValueError, match="1 prompts for 2 predictions"):
        sari(["a", "b"], ["a", "b"], ["a"])


# ------------------------------------------------------------------------------ loading


NAMES = ("edit_similarity", "scienceqa_accuracy", "accuracy", "sari")


@pytest.mark.parametrize("name", NAMES)
def test_trace_scorers_load_as_metrics(name):
    path = f"jaxcl.eval.trace_metrics:{name}"
    fn = load_scorer(path)
    assert fn.higher_is_better is True and HIGHER_IS_BETTER[path] is True
    assert check_metric(path, "instruction") == path
    assert takes_prompts(fn) == (name == "sari")
    # a stage mixing them with the built-in higher-is-better metrics is consistent
    assert HIGHER_IS_BETTER[f"exact_match+rouge_l+{path}"] is True


def test_prompts_reach_a_scorer_by_keyword_only_when_asked():
    def with_prompts(predictions, references, prompts):
        return 1.0

    def keyword_only(predictions, references, *, prompts=None):
        return float(prompts == ["p"])

    assert takes_prompts(with_prompts) and takes_prompts(keyword_only)
    assert not takes_prompts(lambda predictions, references: 0.0)
    assert not takes_prompts(lambda predictions, references, *prompts: 0.0)
    assert not takes_prompts(len)  # a builtin without the parameter


def test_score_strings_passes_prompts(monkeypatch):
    import jaxcl.eval.tasks as tasks

    got = []

    def scorer(predictions, references, prompts):
        got.append(prompts)
        return 0.5

    monkeypatch.setattr(tasks, "load_scorer", lambda name: scorer)
    assert score_strings("m:f", ["a"], ["b"], prompts=["p"]) == 0.5 and got == [["p"]]
    with pytest.raises(ValueError, match="takes prompts, but none were given"):
        score_strings("m:f", ["a"], ["b"])
    with pytest.raises(ValueError, match="2 prompts for 1 predictions"):
        score_strings("m:f", ["a"], ["b"], prompts=["p", "q"])
    # the two-argument contract is unchanged: prompts are not passed to it
    monkeypatch.setattr(tasks, "load_scorer", lambda name: lambda p, r: float(len(p)))
    assert score_strings("m:f", ["a"], ["b"], prompts=["p"]) == 1.0


def test_prompt_texts_plain_and_chat():
    plain = {"prompt": "Vereinfache: Der Satz.", "response": "Satz."}
    chat = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "two"},
        ]
    }
    assert prompt_texts([plain, chat]) == ["Vereinfache: Der Satz.", "second"]


# ------------------------------------------------------------------------------ generation path

SEEN: dict = {}


def record_prompts(predictions: list[str], references: list[str], prompts: list[str]) -> float:
    """A custom scorer that takes `prompts` (the test below reads what it got)."""
    SEEN.update(predictions=predictions, references=references, prompts=prompts)
    return sari(predictions, references, prompts)


def test_prompts_reach_scorer_through_generated_on_test_micro():
    from jaxcl.eval.tasks import task_eval
    from jaxcl.models.spec import ModelSpec

    graphdef, params, _, tokenizer = ModelSpec(preset="test-micro").build(0)
    ctx = SimpleNamespace(graphdef=graphdef, tokenizer=tokenizer)
    examples = [
        {"prompt": "Vereinfache: Der grosse Hund bellt laut.", "response": "Der Hund bellt."},
        {"prompt": "Vereinfache: Es regnet heute sehr stark.", "response": "Es regnet."},
        {"prompt": "Vereinfache: Wir gehen morgen ins Kino.", "response": "Wir gehen ins Kino."},
    ]
    task = task_eval(
        "tests.test_trace_scorers:record_prompts",
        examples,
        "instruction",
        tokenizer,
        64,
        2,
        max_new_tokens=4,
    )
    assert isinstance(task, Generated)
    value = task.score(ctx, params)
    assert SEEN["prompts"] == [e["prompt"] for e in examples]
    assert SEEN["references"] == [e["response"] for e in examples]
    assert len(SEEN["predictions"]) == 3
    assert value == pytest.approx(sari(SEEN["predictions"], SEEN["references"], SEEN["prompts"]))
    assert 0.0 <= value <= 1.0
