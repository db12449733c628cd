"""The reproduction recipes (recipes/trace.yaml, olora_standard.yaml, olora_long.yaml,
olora_superni.yaml, ckl.yaml) run for real, shrunk: a tiny stand-in model (test-micro) and a few
steps, on fixture data in each benchmark's own file layout (tests/fixtures/reproduction), through
the documented data overrides and environment variables (tests.test_plan.DATA_OVERRIDES,
DATA_ENV). Everything else (methods, objective terms, LoRA, per-task epochs, learning rates and
metrics, task orders, the `compare:` variants) is the recipe's own."""

import json
import math
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from flax.traverse_util import flatten_dict

from jaxcl import checkpoint
from jaxcl.compare import run_with_variants
from jaxcl.data.layouts import OLORA_ORDERS, SUPERNI_ORDERS, TRACE_ORDER
from jaxcl.recipe import apply_overrides, expand_env, validate
from jaxcl.train.runner import make_context, run_recipe
from tests.test_plan import DATA_ENV, DATA_OVERRIDES, TWIKI_PERIODS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent

# The stand-in: test-micro (byte tokenizer, float32, no probe suites), 2 steps per task of 4
# examples, short generations for the ROUGE-L tasks. test-micro's rotary embedding runs past its
# nominal 256 positions, so the fixtures' longest examples fit whole.
MICRO = [
    "model.preset=test-micro",
    "model.dtype=null",
    "model.param_dtype=null",
    "probes=false",
    "log_every=1",
    "stages.0.batch_size=4",
    "stages.0.grad_accum=1",
    "stages.0.steps_per_task=2",
    "stages.0.eval_batch_size=8",
]


def _recipe(name, out, *extra, tasks=None, variants=()):
    """``recipes/NAME`` with the data overrides and environment, MICRO and ``extra``; its first
    ``tasks`` tasks and only the ``compare:`` ``variants`` named. A variant's own batch size,
    accumulation and task list are shrunk the same way."""
    raw = yaml.safe_load((ROOT / "recipes" / name).read_text())
    overrides = [*DATA_OVERRIDES[name], *MICRO, f"out_dir={out}", *extra]
    raw = apply_overrides(raw, overrides)
    with mock.patch.dict(os.environ, DATA_ENV[name]):
        raw = expand_env(raw, name)
    if tasks is not None:
        raw["stages"][0]["tasks"] = raw["stages"][0]["tasks"][:tasks]
    raw["compare"] = {k: dict(raw.get("compare", {})[k]) for k in variants}
    shrunk = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in (*MICRO, *extra))}
    for variant in raw["compare"].values():
        for key in set(variant) & set(shrunk):
            variant[key] = shrunk[key]
        if tasks is not None and "stages.0.tasks" in variant:
            variant["stages.0.tasks"] = variant["stages.0.tasks"][:tasks]
        for key in [k for k in variant if k.startswith("stages.0.tasks.")]:
            if tasks is not None and int(key.split(".")[3]) >= tasks:
                del variant[key]
    return validate(raw, source=name)


def _results(out):
    return json.loads((Path(out) / "results.json").read_text())["stages"][0]


def _check_run(stage, tasks, lower_is_better=False):
    """R is tasks × tasks of finite scores, the CL metrics finite, every task trained."""
    n = len(tasks)
    assert stage["tasks"] == list(tasks)
    assert np.shape(stage["R"]) == (n, n) and len(stage["baseline"]) == n
    assert np.all(np.isfinite(stage["R"])) and np.all(np.isfinite(stage["baseline"]))
    if lower_is_better:  # perplexity
        assert np.all(np.asarray(stage["R"]) > 1)
    else:
        assert np.all((np.asarray(stage["R"]) >= 0) & (np.asarray(stage["R"]) <= 1))
    for key in ("op", "bwt", "bwt_trace", "fwt", "forgetting"):
        assert math.isfinite(stage["metrics"][key]), key
    trained = {e["task"] for e in stage["losses"]}
    assert trained == set(tasks)  # each task's batches reached the train step
    assert all(math.isfinite(e["loss"]) for e in stage["losses"])


def _read_every_task(recipe, n_train):
    """What the trainer reads: each task's train and eval examples, from the fixture files."""
    for task in recipe.stages[0].tasks:
        train, evals = task.data.load("train"), task.data.load("eval")
        assert len(train) == n_train and len(evals) > 0, task.name
        assert all(e.get("prompt", e.get("text")) for e in train)


def _final_params(recipe):
    """The run's starting parameters (the seed's initialisation) and its final ones, flat."""
    ctx, start = make_context(recipe, console=None)
    stage = recipe.stages[0].name
    stage_dir = Path(recipe.out_dir) / "checkpoints" / stage
    final = ctx.restore_model(stage_dir / str(checkpoint.latest_step(stage_dir)))
    flat = lambda tree: {k: np.asarray(v) for k, v in flatten_dict(tree).items()}  # noqa: E731
    return flat(start), flat(final)


def _changed_only(recipe, targeted):
    """Bit-exact: the LoRA run changed exactly the kernels its adapters were folded into."""
    before, after = _final_params(recipe)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    want = {k for k in before if len(k) > 1 and targeted(k)}
    assert want and changed == want, sorted(changed ^ want)


# ----------------------------------------------------------------------------- TRACE


def test_trace_eight_tasks_in_the_papers_order_with_lwf(tmp_path):
    """All 8 TRACE tasks, read from the benchmark's layout, trained in the paper's order by the
    recipe's `lwf` variant (the distill term against the previous task's model), each task
    scored by TRACE's metric."""
    base = _recipe(
        "trace.yaml",
        tmp_path / "trace",
        "stages.0.seq_len=384",
        "stages.0.eval_max_new_tokens=6",
        variants=("lwf",),
    )
    recipe = base.variant("lwf")
    assert [t.name for t in recipe.stages[0].terms] == ["lm", "distill"]
    _read_every_task(recipe, n_train=12)
    assert [t.name for t in recipe.stages[0].tasks] == list(TRACE_ORDER)
    run_recipe(recipe)
    stage = _results(recipe.out_dir)
    _check_run(stage, TRACE_ORDER)
    metrics = dict(zip(TRACE_ORDER, stage["task_metrics"]))
    assert metrics["MeetingBank"] == "rouge_l" and metrics["FOMC"] == "exact_match"
    assert metrics["Py150"] == "jaxcl.eval.trace_metrics:edit_similarity"
    assert metrics["20Minuten"] == "jaxcl.eval.trace_metrics:sari"
    # The teacher is the model at the task's start: the KL is 0 at a task's first step and
    # positive once the student has moved.
    distill = [e["terms/distill"] for e in stage["losses"]]
    assert distill[0] == pytest.approx(0.0, abs=1e-6) and max(distill) > 0


def test_trace_variants_seqft_replay_lora_seqft_ewc_o_lora(tmp_path):
    """The recipe's base (SeqFT) and its replay (with LIMA), LoRASeqFT, EWC and O-LoRA variants,
    through `compare:`, on the first three tasks; the LoRA variants change only the q/v kernels
    their adapters fold into."""
    names = ("replay", "lora_seqft", "ewc", "o_lora")
    recipe = _recipe(
        "trace.yaml",
        tmp_path / "trace",
        "stages.0.seq_len=384",
        "stages.0.eval_max_new_tokens=6",
        tasks=3,
        variants=names,
    )
    rows = run_with_variants(recipe)
    assert [r["variant"] for r in rows] == ["base", *names]
    comparison = json.loads((Path(recipe.out_dir) / "comparison.json").read_text())
    assert [r["variant"] for r in comparison["variants"]] == [r["variant"] for r in rows]
    tasks = TRACE_ORDER[:3]
    for name in names:
        variant = recipe.variant(name)
        _check_run(_results(variant.out_dir), tasks)
    _check_run(_results(recipe.out_dir), tasks)
    # Replay kept LIMA (from the first task on) and the finished tasks' examples in its buffer
    # (saved with the last checkpoint).
    replay = recipe.variant("replay")
    stage_dir = Path(replay.out_dir) / "checkpoints" / "trace"
    manifest = checkpoint.read_manifest(stage_dir / str(checkpoint.latest_step(stage_dir)))
    assert manifest["replay"]["tasks"][0] == "general"
    assert set(manifest["replay"]["tasks"]) >= {"general", *tasks[:2]}
    for name in ("lora_seqft", "o_lora"):
        variant = recipe.variant(name)
        assert variant.stages[0].lora.rank == 8 and variant.stages[0].lora.alpha == 32
        assert variant.stages[0].lora.per_task == (name == "o_lora")
        _changed_only(variant, lambda k: k[-2:] in (("attn", "q"), ("attn", "v")))
    assert recipe.variant("o_lora").stages[0].method("o_lora").lam == 0.5


# ----------------------------------------------------------------------------- O-LoRA orders


def test_olora_task_orders(tmp_path):
    """The recipe's three orders are O-LoRA's (jaxcl.data.layouts.OLORA_ORDERS); order 1 (the
    base) and order 3 (a `compare:` variant with its own task list) run, each training and
    scoring its tasks in the declared order."""
    every = _recipe("olora_standard.yaml", tmp_path / "all", variants=("order2", "order3"))
    for order, declared in ((1, every), (2, every.variant("order2")), (3, every.variant("order3"))):
        tasks = declared.stages[0].tasks
        names = [t.name for t in tasks]
        assert names == [t.data.source.task for t in tasks] == list(OLORA_ORDERS[order])
    recipe = _recipe(
        "olora_standard.yaml", tmp_path / "olora", "stages.0.seq_len=512", variants=("order3",)
    )
    _read_every_task(recipe, n_train=12)
    _read_every_task(recipe.variant("order3"), n_train=12)
    rows = run_with_variants(recipe)
    assert [r["variant"] for r in rows] == ["base", "order3"]
    for out, order in ((recipe.out_dir, 1), (recipe.variant("order3").out_dir, 3)):
        stage = _results(out)
        _check_run(stage, OLORA_ORDERS[order])
        seen = list(dict.fromkeys(e["task"] for e in stage["losses"]))
        assert seen == list(OLORA_ORDERS[order])  # trained in that order, too


def test_olora_long_benchmark_orders_4_to_6(tmp_path):
    """The 15-task benchmark in O-LoRA's layout: orders 4-6 as declared, every task read
    (COPA without instruction or options, the rest with their category's), and order 4 run
    through all 15 tasks, MNLI for its two epochs."""
    recipe = _recipe(
        "olora_long.yaml", tmp_path / "long", "stages.0.seq_len=512", variants=("order5", "order6")
    )
    orders = {4: recipe, 5: recipe.variant("order5"), 6: recipe.variant("order6")}
    for order, declared in orders.items():
        tasks = declared.stages[0].tasks
        assert [t.name for t in tasks] == [t.data.source.task for t in tasks]
        assert [t.name for t in tasks] == list(OLORA_ORDERS[order])
        _read_every_task(declared, n_train=12)
    prompts = {t.name: t.data.load("train")[0]["prompt"] for t in recipe.stages[0].tasks}
    assert prompts["COPA"].startswith("Task:COPA\nDataset:COPA\nWhich sentence")
    assert prompts["WiC"].startswith("Task:WiC\nDataset:WiC\nGiven a word")
    assert "Option: neutral, entailment, contradiction \n" in prompts["MNLI"]
    recipe = recipe.model_copy(update={"compare": {}})
    run_recipe(recipe)
    stage = _results(recipe.out_dir)
    _check_run(stage, OLORA_ORDERS[4])
    steps = {t: sum(e["task"] == t for e in stage["losses"]) for t in ("MNLI", "CB")}
    assert steps == {"MNLI": 6, "CB": 3}  # 2 and 1 epochs of 12 examples at batch 4


def test_olora_superni_layout_scored_by_rouge_l(tmp_path):
    """SuperNI's 15 tasks in SAPT's layout, in orders 1 (run) and 2 (declared), every task
    scored by ROUGE-L of its generations."""
    recipe = _recipe(
        "olora_superni.yaml",
        tmp_path / "superni",
        "stages.0.seq_len=256",
        "stages.0.eval_max_new_tokens=6",
        variants=("order2",),
    )
    for order, declared in ((1, recipe), (2, recipe.variant("order2"))):
        assert [t.name for t in declared.stages[0].tasks] == list(SUPERNI_ORDERS[order])
        _read_every_task(declared, n_train=12)
    first = recipe.stages[0].tasks[0].data.load("eval")[0]
    assert first["prompt"].startswith("Definition: ") and first["prompt"].endswith("\nOutput: ")
    recipe = recipe.model_copy(update={"compare": {}})
    run_recipe(recipe)
    stage = _results(recipe.out_dir)
    _check_run(stage, SUPERNI_ORDERS[1])
    assert set(stage["task_metrics"]) == {"rouge_l"}


# ----------------------------------------------------------------------------- CKL


def test_ckl_periods_with_lora_and_replay(tmp_path):
    """TemporalWiki-style continual pretraining over five periods, scored by perplexity on each
    period's probes: the plain run and the replay and LoRA variants; the LoRA variant (one
    adapter on every projection, merged at the stage's end) changes exactly those kernels."""
    recipe = _recipe(
        "ckl.yaml",
        tmp_path / "ckl",
        "stages.0.seq_len=128",
        "optimizer.warmup_steps=1",
        variants=("replay", "lora"),
    )
    _read_every_task(recipe, n_train=12)
    rows = run_with_variants(recipe)
    assert [r["variant"] for r in rows] == ["base", "replay", "lora"]
    for out in (recipe.out_dir, *(recipe.variant(v).out_dir for v in ("replay", "lora"))):
        stage = _results(out)
        assert stage["metric"] == "perplexity"
        _check_run(stage, TWIKI_PERIODS, lower_is_better=True)
    projections = ("q", "k", "v", "o", "gate", "up", "down")
    _changed_only(
        recipe.variant("lora"), lambda k: k[-2] in ("attn", "mlp") and k[-1] in projections
    )


# ----------------------------------------------------------------------------- SmolLM2 on a CPU


def test_smollm2_compare_runs_every_variant_with_lm_eval_probes(tmp_path):
    """recipes/smollm2_compare.yaml (docs/reproducing.md's five-method table) on the micro
    stand-in: the base (SeqFT) and its replay, EWC, LwF and O-LoRA variants each train the three
    bundled instruction tasks, and the lm-eval probe suites are scored before and after."""
    raw = yaml.safe_load((ROOT / "recipes/smollm2_compare.yaml").read_text())
    micro = [o for o in MICRO if not o.startswith("probes")]
    shrink = [
        "model.source=null",
        "probes.lm_eval.limit=2",
        "stages.0.seq_len=48",  # byte tokens: the sentiment prompts are longer than BPE ones
        *(f"stages.0.tasks.{i}.data.{k}=8" for i in range(3) for k in ("train_size", "eval_size")),
    ]
    raw = apply_overrides(raw, [*micro, *shrink, f"out_dir={tmp_path / 'smol'}"])
    variants = ("replay", "ewc", "lwf", "o_lora")
    assert set(raw["compare"]) == set(variants)
    recipe = validate(raw, source="smollm2_compare.yaml")
    rows = run_with_variants(recipe)
    assert [r["variant"] for r in rows] == ["base", *variants]
    for out in (recipe.out_dir, *(recipe.variant(v).out_dir for v in variants)):
        _check_run(_results(out), ("sentiment", "capitals", "antonyms"))
        probes = json.loads((Path(out) / "results.json").read_text())["probes"]
        tasks = probes["scores"][-1]["tasks"]
        assert {"lm_eval/jaxcl_general_mc", "lm_eval/jaxcl_safety_mc"} <= set(tasks), tasks
