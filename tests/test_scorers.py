"""Per-task scorers: multiple choice by log-likelihood, ROUGE-L and custom scorers on greedy
generations, the recipe's `metric` fields, and a run whose R matrix uses them."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console

import jaxcl
from jaxcl import checkpoint
from jaxcl.data.benchmarks.scoring import rouge_l
from jaxcl.eval import HIGHER_IS_BETTER, make_batch_scorer
from jaxcl.eval.custom import token_f1
from jaxcl.eval.tasks import Generated, MultipleChoice, task_eval
from jaxcl.models.spec import ModelSpec
from jaxcl.recipe import RecipeError, validate
from jaxcl.train.step import make_apply


def mean_chars(predictions: list[str], references: list[str]) -> float:
    """A custom scorer that reads the generations: their mean length in characters."""
    assert len(predictions) == len(references)
    return sum(len(p) for p in predictions) / len(predictions)


def worse_is_more(predictions, references):
    return 1.0


worse_is_more.higher_is_better = False


@pytest.fixture(scope="module")
def micro():
    graphdef, params, _, tokenizer = ModelSpec(preset="test-micro").build(0)
    apply = jax.jit(make_apply(graphdef))
    ctx = SimpleNamespace(
        graphdef=graphdef, tokenizer=tokenizer, batch=make_batch_scorer(apply), apply=apply
    )
    return ctx, params


WIDTH = 64  # explicit forward passes right-pad to this width (causal: no effect on earlier logits)


def _logprobs(apply, params, ids):
    inputs = np.zeros((1, WIDTH), np.int32)
    inputs[0, : len(ids) - 1] = ids[:-1]
    logits = np.asarray(apply(params, jnp.asarray(inputs)), np.float64)[0, : len(ids) - 1]
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def explicit_logliks(apply, params, tok, prompt, choices):
    """Σ log p(choice tokens | bos + prompt), one unpadded forward pass per choice."""
    out = []
    for choice in choices:
        context = [tok.bos_token_id, *tok.encode(prompt)]
        ids = context + tok.encode(choice)
        logp = _logprobs(apply, params, ids)
        out.append(sum(logp[k - 1, ids[k]] for k in range(len(context), len(ids))))
    return np.array(out)


MC_EXAMPLES = [
    {"prompt": "Capital of France?", "choices": [" Paris", " Rome", " Oslo"]},
    {"prompt": "2 + 2 =", "choices": [" 4", " 5"]},
    {"prompt": "Colour of the sky:", "choices": [" blue", " green", " red", " grey"]},
    {"prompt": "Opposite of hot:", "choices": [" cold", " warm"]},
    {"prompt": "Pick one:", "choices": [" a", " bb", " ccc"]},
]


def test_multiple_choice_matches_explicit_log_softmax_sums(micro):
    ctx, params = micro
    tok = ctx.tokenizer
    # An example where length normalisation changes the answer: a one-byte choice with the
    # lowest log-likelihood among candidates loses per character to a long one, wins in sum.
    long = " the quick brown fox"
    lls = {c: explicit_logliks(ctx.apply, params, tok, "Q:", [c])[0] for c in "xyzqjk"}
    short = min(lls, key=lls.get)
    examples = [dict(e) for e in MC_EXAMPLES] + [{"prompt": "Q:", "choices": [short, long]}]
    for i, e in enumerate(examples):
        e["response"] = e["choices"][i % len(e["choices"])]
    examples[-1]["response"] = long

    picks, picks_norm, expected = [], [], []
    for e in examples:
        ll = explicit_logliks(ctx.apply, params, tok, e["prompt"], e["choices"])
        expected.extend(ll)
        chars = np.array([len(c) for c in e["choices"]], np.float64)
        answer = e["choices"].index(e["response"])
        picks.append(int(np.argmax(ll)) == answer)
        picks_norm.append(int(np.argmax(ll / chars)) == answer)
    assert picks[-1] is False and picks_norm[-1] is True  # normalisation flips this one

    plain = task_eval("multiple_choice", examples, "instruction", tok, 48, 4)
    norm = task_eval("multiple_choice_norm", examples, "instruction", tok, 48, 4)
    assert isinstance(plain, MultipleChoice) and len(plain.batches) == 4  # 16 rows, 1 padding
    got = plain.loglikelihoods(ctx, params)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert plain.score(ctx, params) == pytest.approx(np.mean(picks))
    assert norm.score(ctx, params) == pytest.approx(np.mean(picks_norm))
    print(f"acc {np.mean(picks):.3f}  acc_norm {np.mean(picks_norm):.3f}")


def test_multiple_choice_needs_choices_and_a_listed_response(micro):
    ctx, _ = micro
    bad = [{"prompt": "p", "response": "r"}]
    with pytest.raises(ValueError, match=r"task t: multiple-choice scoring needs .* choices"):
        task_eval("multiple_choice", bad, "instruction", ctx.tokenizer, 32, 4, where="task t")
    bad = [{"prompt": "p", "response": "r", "choices": ["a", "b"]}]
    with pytest.raises(ValueError, match="the response 'r' is not one of its choices"):
        task_eval("multiple_choice", bad, "instruction", ctx.tokenizer, 32, 4)


def test_sources_keep_choices_and_index_them_with_an_integer_label():
    from jaxcl.data.sources import FieldMap, normalize

    fm = FieldMap({"prompt": "question", "choices": "options", "label": "answer"})
    record = {"question": "Q?", "options": ["x", "y", "z"], "answer": 2}
    assert normalize(record, "instruction", fm, "r") == {
        "prompt": "Q?",
        "response": "z",
        "choices": ["x", "y", "z"],
    }
    with pytest.raises(ValueError, match="outside the 3 choices"):
        normalize(dict(record, answer=3), "instruction", fm, "r")
    plain = {"prompt": "Q?", "response": "w", "choices": ["x", "y"]}
    with pytest.raises(ValueError, match="not one of the choices"):
        normalize(plain, "instruction", FieldMap(), "r")


def _generated(ctx, params, prompts, max_new):
    """Greedy decodes with `jaxcl.generate`, one prompt at a time, up to the first eos."""
    from flax import nnx

    model = nnx.merge(ctx.graphdef, params)
    tok = ctx.tokenizer
    out = []
    for prompt in prompts:
        ids = [tok.bos_token_id, *tok.encode(prompt)]
        row = np.asarray(jaxcl.generate(model, [ids], max_new_tokens=max_new))[0].tolist()
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        # test-micro's vocabulary (384) is padded past the byte tokenizer's 259 ids: dropped
        out.append(tok.decode([t for t in row if t < tok.vocab_size]))
    return out


def test_rouge_l_and_custom_scorers_on_greedy_generations(micro):
    ctx, params = micro
    prompts = ["Summarize: cat", "Keywords: water", "Say hi", "x", "Translate: oui"]
    texts = _generated(ctx, params, prompts, 8)  # one prompt at a time
    # Half the references are the model's own generations, so ROUGE-L is not trivially 0.
    refs = [t if i % 2 == 0 else r for i, (t, r) in enumerate(zip(texts, ["", "eau", "", "y", ""]))]
    examples = [{"prompt": p, "response": r} for p, r in zip(prompts, refs)]
    gen = task_eval("rouge_l", examples, "instruction", ctx.tokenizer, 48, 2, max_new_tokens=8)
    assert gen.predictions(ctx, params) == texts  # batched, left-padded, the last batch padded
    expected = np.mean([rouge_l(t, r) for t, r in zip(texts, refs)])
    assert 0 < expected < 1 and gen.score(ctx, params) == pytest.approx(expected)
    custom = task_eval(
        "jaxcl.eval.custom:token_f1",
        examples,
        "instruction",
        ctx.tokenizer,
        48,
        2,
        max_new_tokens=8,
    )
    assert custom.score(ctx, params) == pytest.approx(token_f1(texts, refs))
    print(f"rouge_l {expected:.3f}  token_f1 {token_f1(texts, refs):.3f}")
    # Without eval_max_new_tokens: the longest reference (in tokens) and its eos.
    default = task_eval("rouge_l", examples, "instruction", ctx.tokenizer, 48, 2)
    assert isinstance(default, Generated)
    assert default.max_new_tokens == max(len(r.encode()) for r in refs) + 1


def _recipe(tmp_path=None, **stage):
    def memory(n):
        rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(n)]
        return {"source": {"type": "memory", "kind": "instruction", "train": rows}, "eval_size": 2}

    base = {
        "name": "t",
        "kind": "instruct",
        "steps_per_task": 1,
        "batch_size": 2,
        "seq_len": 16,
        "tasks": [{"name": "a", "data": memory(6)}, {"name": "b", "data": memory(6)}],
    }
    base.update(stage)
    return {"name": "r", "out_dir": str(tmp_path or "/tmp/unused"), "stages": [base]}


@pytest.mark.parametrize(
    "where, metric, expected",
    [
        (
            1,
            "jaxcl.eval.custom:nope",
            r"stages\[0\]\.tasks\[1\]\.metric: custom scorer 'jaxcl.eval.custom:nope': "
            r"'jaxcl.eval.custom' has no attribute 'nope'",
        ),
        (
            0,
            "no_such_package.scorers:f1",
            r"stages\[0\]\.tasks\[0\]\.metric: custom scorer 'no_such_package.scorers:f1': "
            r"cannot import module 'no_such_package.scorers' \(ModuleNotFoundError",
        ),
        (
            1,
            "accuracy",
            r"stages\[0\]\.tasks\[1\]\.metric: unknown metric 'accuracy'; valid choices: "
            r"perplexity, exact_match, pref_accuracy, multiple_choice, multiple_choice_norm, "
            r"rouge_l, or a custom scorer package.module:function",
        ),
        (
            0,
            "pref_accuracy",
            r"stages\[0\]\.tasks\[0\]\.metric: metric 'pref_accuracy' does not apply to "
            r"instruction data; valid choices for instruction data: perplexity, exact_match, "
            r"multiple_choice, multiple_choice_norm, rouge_l, package.module:function",
        ),
        (
            1,
            "perplexity",  # lower is better, beside exact_match
            r"stages\[0\]: tasks\[0\] \(a\) is scored by exact_match \(higher is better\) and "
            r"tasks\[1\] \(b\) by perplexity \(lower is better\)",
        ),
        (
            1,
            "tests.test_scorers:worse_is_more",
            r"tasks\[1\] \(b\) by tests.test_scorers:worse_is_more \(lower is better\)",
        ),
    ],
)
def test_bad_metrics_fail_at_validation_naming_the_field(where, metric, expected):
    raw = _recipe()
    raw["stages"][0]["tasks"][where]["metric"] = metric
    with pytest.raises(RecipeError, match=expected):
        validate(raw)


def test_stage_metric_is_the_default_and_the_stage_level_name():
    recipe = validate(_recipe())
    assert recipe.stages[0].metric == "exact_match"
    assert recipe.stages[0].task_metrics == ["exact_match", "exact_match"]
    assert "metric" not in json.dumps(recipe.model_dump(mode="json"))  # dumps as before

    raw = _recipe(metric="rouge_l")
    raw["stages"][0]["tasks"][1]["metric"] = "jaxcl.eval.custom:token_f1"
    stage = validate(raw).stages[0]
    assert stage.task_metrics == ["rouge_l", "jaxcl.eval.custom:token_f1"]
    assert stage.metric == "rouge_l+jaxcl.eval.custom:token_f1"
    assert HIGHER_IS_BETTER[stage.metric] is True
    again = validate(validate(raw).model_dump(mode="json")).stages[0]  # the dump round-trips
    assert again.task_metrics == stage.task_metrics and again.metric == stage.metric

    lower = validate(_recipe(metric="perplexity")).stages[0]
    assert lower.metric == "perplexity" and HIGHER_IS_BETTER[lower.metric] is False
    assert HIGHER_IS_BETTER["tests.test_scorers:worse_is_more"] is False
    with pytest.raises(RecipeError, match=r"stages\[0\]: metric: metric 'pref_accuracy' does not"):
        validate(_recipe(metric="pref_accuracy"))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.metric: unknown metric 'bleu'"):
        validate(_recipe(metric="bleu"))


def test_a_run_scores_each_task_by_its_metric(tmp_path, micro):
    """One instruct stage: a multiple-choice task and a custom-scored one; R and the baseline
    equal scores recomputed from the checkpoints by explicit log-softmax sums and generate()."""
    from jaxcl.train.runner import run_recipe

    mc_rows = [
        {"prompt": f"Q{i}: pick", "choices": [" yes", " no", " maybe"][: 2 + i % 2]}
        for i in range(10)
    ]
    for i, row in enumerate(mc_rows):
        row["response"] = row["choices"][i % len(row["choices"])]
    gen_rows = [{"prompt": f"Echo {w}:", "response": f" {w}"} for w in "abcdefgh"]

    def memory(rows):
        return {"type": "memory", "kind": "instruction", "train": rows[:6], "eval": rows[6:]}

    raw = _recipe(
        tmp_path / "run",
        steps_per_task=3,
        batch_size=4,
        seq_len=24,
        eval_batch_size=2,
        eval_max_new_tokens=6,
        tasks=[
            {"name": "mc", "data": {"source": memory(mc_rows)}, "metric": "multiple_choice"},
            {
                "name": "gen",
                "data": {"source": memory(gen_rows)},
                "metric": "tests.test_scorers:mean_chars",
            },
        ],
    )
    raw.update(model={"preset": "test-micro"}, probes=False, log_every=1)
    raw["optimizer"] = {"lr": 0.02, "warmup_steps": 0, "schedule": "constant"}
    recipe = validate(raw)
    results = run_recipe(recipe, Console(quiet=True))
    (stage,) = results["stages"]
    assert stage["metric"] == "multiple_choice+tests.test_scorers:mean_chars"

    ctx, start = micro
    tok = ctx.tokenizer

    def expected_scores(params):
        right = []
        for row in mc_rows[6:]:
            ll = explicit_logliks(ctx.apply, params, tok, row["prompt"], row["choices"])
            right.append(int(np.argmax(ll)) == row["choices"].index(row["response"]))
        texts = _generated(ctx, params, [r["prompt"] for r in gen_rows[6:]], 6)
        return [float(np.mean(right)), mean_chars(texts, [r["response"] for r in gen_rows[6:]])]

    stage_dir = tmp_path / "run" / "checkpoints" / "t"
    rows = [expected_scores(checkpoint.restore_params(stage_dir, start, s)) for s in (3, 6)]
    np.testing.assert_allclose(stage["baseline"], expected_scores(start), rtol=1e-6)
    np.testing.assert_allclose(stage["R"], rows, rtol=1e-6)
    print(f"R = {stage['R']}  baseline = {stage['baseline']}")

    # `jaxcl eval` scores a checkpoint the same way, task by task.
    from jaxcl.evaluate import evaluate

    scored = evaluate(recipe, stage_dir / "6", Console(quiet=True))["stages"]["t"]
    assert scored["task_metrics"] == {
        "mc": "multiple_choice",
        "gen": "tests.test_scorers:mean_chars",
    }
    np.testing.assert_allclose(list(scored["scores"].values()), stage["R"][-1], rtol=1e-6)


SHARDED = """
import jax, json, numpy as np
from types import SimpleNamespace
from jaxcl import parallel
from jaxcl.eval import make_batch_scorer
from jaxcl.eval.tasks import task_eval
from jaxcl.models.spec import ModelSpec
from jaxcl.train.step import make_apply

graphdef, params, names, tok = ModelSpec(preset="test-micro").build(0)
scorer = make_batch_scorer(make_apply(graphdef))
ctx = SimpleNamespace(graphdef=graphdef, tokenizer=tok, batch=scorer)
mc = [{"prompt": f"Q{i}?", "choices": [" yes", " no", " maybe"][: 2 + i % 2]} for i in range(6)]
for e in mc:
    e["response"] = e["choices"][-1]
gen = [{"prompt": f"Echo {w}:", "response": f" {w}"} for w in "abcdef"]
out = []
for spec in (None, {"data": 1, "fsdp": 2, "tensor": 2}):
    p, put = params, (lambda b: b)
    if spec:
        mesh = parallel.make_mesh(spec)
        rules = parallel.DEFAULT_RULES
        p = jax.device_put(params, parallel.tree_shardings(names, params, mesh, rules))
        batch = parallel.batch_sharding(mesh, rules)
        put = lambda b: parallel.put_global(b, batch)
    choice = task_eval("multiple_choice_norm", mc, "instruction", tok, 24, 4).on_devices(put)
    texts = task_eval("rouge_l", gen, "instruction", tok, 24, 4, max_new_tokens=6)
    lls = choice.loglikelihoods(ctx, p).tolist()
    out.append([lls, choice.score(ctx, p), texts.predictions(ctx, p)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_scorers_on_sharded_parameters_match_unsharded():
    """fsdp=2 × tensor=2 on 4 CPU devices: choice log-likelihoods and generations unchanged."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(single[0], sharded[0], rtol=1e-4, atol=1e-4)
    assert single[1] == sharded[1] and single[2] == sharded[2]
