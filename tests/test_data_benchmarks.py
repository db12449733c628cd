"""Offline benchmarks (CKL-style stream, TRACE-style sequence), scorers, pipeline throughput."""

import json

import pytest

from jaxcl.data import pipeline_throughput
from jaxcl.data.benchmarks import BUNDLED, GENERATORS, ckl, generate, kind_of, trace
from jaxcl.data.benchmarks.scoring import exact_match, lcs_length, rouge_l, score
from jaxcl.data.layouts import read_trace, trace_tasks
from jaxcl.data.spec import DataSpec
from jaxcl.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_registry_keeps_the_quickstart_set_and_is_deterministic():
    assert set(GENERATORS) <= set(BUNDLED)
    # The quickstart's outputs are pinned: recipes/quickstart.yaml depends on them.
    assert generate("cit/capitals", "train", 2) == [
        {"prompt": "Q: capital of Markovia?\nA:", "response": " Elsbeth"},
        {"prompt": "Q: capital of Zembla?\nA:", "response": " Ostrova"},
    ]
    assert generate("cpt/recipes", "eval", 1) == [
        {"text": "To make pie, mix 1 cups of lentils with sugar, bake and cook for 59 minutes."}
    ]
    for name in BUNDLED:
        assert generate(name, "train", 5, seed=3) == generate(name, "train", 5, seed=3)
        assert kind_of(name) in ("text", "instruction", "preference")
    assert DataSpec(bundled="ckl/t1/new").kind == "instruction"


def test_ckl_stream_has_invariant_updated_and_new_facts():
    w = ckl.WORLD
    assert len(w["invariant"]) == ckl.INVARIANT and ckl.PERIODS >= 3
    corpus0 = " ".join(e["text"] for e in generate("ckl/t0", "train", 400))
    for k in range(1, ckl.PERIODS):
        stale, updated, new = w[f"stale/{k}"], w[f"updated/{k}"], w[f"new/{k}"]
        assert [(r, s) for r, s, _ in stale] == [(r, s) for r, s, _ in updated]
        assert all(a[2] != b[2] for a, b in zip(stale, updated))  # the value changed
        assert not any(s in corpus0 for _, s, _ in new)  # new subjects are unseen before k
        text = " ".join(e["text"] for e in generate(f"ckl/t{k}", "train", 300))
        assert all(o in text for _, _, o in updated) and all(s in text for _, s, _ in new)
        assert not any(s in text for _, s, _ in w["invariant"])  # invariants: period 0 only
    probes = ckl.probe_set("updated/1")
    assert len(probes) == ckl.UPDATED and probes[0]["prompt"].startswith("Q: ")
    assert all(s in corpus0 for _, s, _ in w["invariant"])


def test_trace_sequence_has_distinct_formats_and_scorers():
    assert len(trace.TASKS) >= 6
    heads = {generate(n, "train", 1)[0]["prompt"].split("\n")[0][:12] for n in trace.TASKS}
    assert len(heads) == len(trace.TASKS)
    assert {"exact_match", "rouge_l"} == set(trace.SCORER.values())
    for name in trace.TASKS:
        rows = generate(name, "train", 50)
        assert len({r["prompt"] for r in rows}) > 5  # not one memorisable example
        assert all(len(TOK.encode(r["prompt"] + r["response"])) < 256 for r in rows)


def test_trace_layout_round_trip(tmp_path):
    trace.write_trace_layout(tmp_path, generate, tasks=trace.TASKS[:6], sizes={"train": 20})
    assert trace_tasks(tmp_path) == sorted(n.split("/")[1] for n in trace.TASKS[:6])
    rows = read_trace(tmp_path, "policy", "train")
    assert rows == generate("trace/policy", "train", 20)
    assert json.loads((tmp_path / "policy" / "test.json").read_text())[0].keys() == {
        "prompt",
        "answer",
    }


def test_rouge_l_and_exact_match():
    assert lcs_length("a b c d".split(), "a c d b".split()) == 3
    # LCS = 4: P = 4/4, R = 4/5 -> F1 = 2PR/(P+R) = 8/9
    assert rouge_l("the cat sat down", "the cat was sat down") == pytest.approx(8 / 9)
    assert rouge_l("the cat sat down", "down the cat") == pytest.approx(
        2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    )
    assert rouge_l("Motion carried 8 to 1.", "motion carried 8 to 1") == 1.0
    assert rouge_l("", "x") == 0.0 and rouge_l("abc", "xyz") == 0.0
    assert rouge_l("eau, santé, Québec", "santé, eau, Québec") == pytest.approx(2 / 3)
    assert exact_match(" hawkish ", "hawkish") == 1.0 and exact_match("Hawkish", "hawkish") == 0.0
    assert exact_match("Hawkish", "hawkish", ignore_case=True) == 1.0
    assert score("rouge_l", ["a b", "c"], ["a b", "d"]) == 0.5
    with pytest.raises(ValueError, match="valid scorers"):
        score("bleu", ["a"], ["a"])


def test_pipeline_throughput_reports_tokens_per_second():
    spec = DataSpec(bundled="cpt/recipes", train_size=256)
    out = pipeline_throughput(spec, TOK, seq_len=256, batch_size=8, num_batches=20)
    assert out["tokens"] == 8 * 256 * 20 and out["tokens_per_s"] > 0
    assert 0 < out["real_tokens_per_s"] < out["tokens_per_s"]
    packed = pipeline_throughput(spec, TOK, seq_len=256, batch_size=8, num_batches=20, pack=True)
    assert packed["real_tokens_per_s"] / packed["tokens_per_s"] > (
        out["real_tokens_per_s"] / out["tokens_per_s"]
    )  # packing fills the slots
