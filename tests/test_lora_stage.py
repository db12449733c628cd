"""LoRA stages: only the adapters train, O-LoRA's per-task adapters are folded into the base
weights at every task boundary, checkpoints describe their adapters, resume is exact and any
checkpoint reads back as a plain model."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from jaxcl import checkpoint
from jaxcl.evaluate import evaluate
from jaxcl.models.spec import LoraSpec, ModelSpec
from jaxcl.recipe import RecipeError, load_recipe
from jaxcl.train.adapters import StageModel
from jaxcl.train.runner import make_context, run_recipe
from jaxcl.train.step import make_apply
from tests.test_resume import MICRO, QUICKSTART

LORA_CIT = [
    "stages.1.steps_per_task=8",
    "stages.1.optimizer={lr: 1.0e-2, moments: task}",
    "stages.1.lora={rank: 4, alpha: 8, targets: [q, v]}",
    "stages.1.methods=[{name: replay, ratio: 0.25, capacity: 64}, {name: o_lora, lam: 0.5}]",
]


def _recipe(out, *extra):
    return load_recipe(QUICKSTART, [*MICRO, f"out_dir={out}", *LORA_CIT, *extra])


def _final(out: Path, stage: str) -> Path:
    stage_dir = out / "checkpoints" / stage
    return stage_dir / str(checkpoint.latest_step(stage_dir))


def _flat_host(tree):
    return {k: np.asarray(v) for k, v in flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    recipe = _recipe(out)
    return recipe, out, run_recipe(recipe)


@pytest.mark.slow
def test_lora_stage_changes_only_the_targeted_kernels(lora_run):
    recipe, out, results = lora_run
    ctx, _ = make_context(recipe, console=None)
    before = _flat_host(ctx.restore_model(_final(out, "cpt")))
    after = _flat_host(ctx.restore_model(_final(out, "cit")))
    assert before.keys() == after.keys()  # plain parameters again, adapters folded in
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    targeted = sorted(k for k in before if k[-2:] in (("attn", "q"), ("attn", "v")))
    print(f"\nkernels changed by the LoRA stage: {len(changed)} (targeted {len(targeted)})")
    assert changed == targeted  # every other weight bit-identical: no gradient reached it
    cit = results["stages"][1]
    assert cit["start_params_sha256"] == results["stages"][0]["final_params_sha256"]
    manifest = checkpoint.read_manifest(_final(out, "cit"))
    assert manifest["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["q", "v"], "per_task": True}


@pytest.mark.slow
def test_o_lora_history_holds_one_subspace_per_task(lora_run):
    recipe, out, _ = lora_run
    raw = json.loads((out / "results.json").read_text())
    assert len(raw["stages"][1]["R"]) == 3
    ctx, params = make_context(recipe, console=None)
    sctx = ctx.for_stage(recipe.stages[1])
    like = sctx.model.like(params)
    from jaxcl.train.stage import compile_stage

    program = compile_stage(sctx, recipe.stages[1], like, 24)
    abstract = jax.eval_shape(program.tx.init, sctx.model.split(like)[0])
    step_dir = _final(out, "cit")
    _, opt_state, *_ = checkpoint.restore_checkpoint(
        step_dir.parent, int(step_dir.name), like, abstract
    )
    from jaxcl.methods.project import OLoraState

    (state,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, OLoraState))
        if isinstance(s, OLoraState)
    ]
    assert int(state.tasks) == 3
    # `moments: task`: each task ends with AdamW's moments restarted for the next adapter.
    (adam,) = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert int(adam.count) == 0 and not any(np.any(m) for m in jax.tree.leaves(adam.mu))
    for h in jax.tree.leaves(state.history):
        h = np.asarray(h)
        used, unused = h[..., : 3 * 4], h[..., 3 * 4 :]
        assert np.all(np.abs(used).sum(axis=-2) > 0)  # every stored A column is non-zero
        assert not unused.any()


@pytest.mark.slow
def test_eval_of_a_lora_checkpoint_reproduces_the_run(lora_run):
    recipe, out, results = lora_run
    scores = evaluate(recipe, _final(out, "cit"))["stages"]["cit"]["scores"]
    assert list(scores.values()) == results["stages"][1]["R"][-1]


@pytest.mark.slow
def test_resume_inside_a_lora_stage_is_exact(lora_run, tmp_path):
    recipe, out, results = lora_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    stage_dir = copy / "checkpoints" / "cit"
    first_task_end = checkpoint.all_steps(stage_dir)[0]
    checkpoint.delete_steps(stage_dir, checkpoint.all_steps(stage_dir)[1:])
    shutil.rmtree(copy / "checkpoints" / "align")
    resumed = run_recipe(_recipe(copy))
    print(f"\nresumed after cit step {first_task_end}")
    for a, b in zip(results["stages"], resumed["stages"]):
        assert a["final_params_sha256"] == b["final_params_sha256"], a["name"]
        assert a["R"] == b["R"]


def test_one_adapter_per_stage_is_folded_at_the_end(tmp_path):
    """``per_task: false``: the final checkpoint keeps the trained adapter, and the plain model
    read back is ``W + (α/r)·A·B`` (checked in float64)."""
    recipe = _recipe(
        tmp_path / "run",
        "stages.1.lora={rank: 2, alpha: 6, targets: [q, down], per_task: false}",
        "stages.1.methods=[]",
        "stages.1.steps_per_task=3",
        "probes=false",
    )
    results = run_recipe(recipe)
    ctx, params = make_context(recipe, console=None)
    model = ctx.for_stage(recipe.stages[1]).model
    step_dir = _final(Path(recipe.out_dir), "cit")
    raw = _flat_host(
        checkpoint.restore_params(step_dir.parent, model.like(params), int(step_dir.name))
    )
    plain = _flat_host(ctx.restore_model(step_dir))
    pairs = model.pairs()
    assert len(pairs) == 2 * 2  # q and down in both layers of test-micro
    for kernel, a, b in pairs:
        assert np.abs(raw[b]).max() > 0  # trained
        want = raw[kernel].astype(np.float64) + 3.0 * raw[a].astype(np.float64) @ raw[b]
        np.testing.assert_allclose(plain[kernel], want, rtol=0, atol=1e-6)
    assert np.shape(results["stages"][1]["R"]) == (3, 3)  # every task scored after each


def test_attach_renew_export_keep_the_function():
    spec = ModelSpec(preset="test-micro")
    graphdef, params, _, _ = spec.build(0)
    model = StageModel.build(spec, LoraSpec(rank=4, alpha=8, targets=["q", "v", "up"]), seed=3)
    plain_apply, stage_apply = make_apply(graphdef), make_apply(model.graphdef)
    ids = np.arange(14, dtype=np.int32).reshape(2, 7) % 50
    reference = plain_apply(params, ids)
    attached = model.attach(params)
    np.testing.assert_array_equal(stage_apply(attached, ids), reference)  # B = 0
    trainable, fixed = model.split(attached)
    assert all("lora" in k for k in flatten_dict(trainable))
    assert not any("lora" in k for k in flatten_dict(fixed))
    trained = model.join(jax.tree.map(lambda x: x + 0.05, trainable), fixed)
    logits = stage_apply(trained, ids)
    assert np.abs(logits - reference).max() > 1e-3
    np.testing.assert_allclose(plain_apply(model.export(trained), ids), logits, atol=2e-5)
    renewed = model.renew(trained, task=1)
    np.testing.assert_allclose(stage_apply(renewed, ids), logits, atol=2e-5)
    a0, a1 = model.fresh_adapters(0), model.fresh_adapters(1)
    assert all(not np.array_equal(a0[k], a1[k]) for k in a0 if k[-1] == "a")


def test_o_lora_without_adapters_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"methods\[0\] \(o_lora\): needs LoRA adapters"):
        load_recipe(
            QUICKSTART,
            [f"out_dir={tmp_path}", "stages.1.methods=[{name: o_lora}]"],
        )
    with pytest.raises(RecipeError, match="max_tasks"):
        load_recipe(
            QUICKSTART,
            [
                f"out_dir={tmp_path}",
                "stages.1.lora={rank: 2}",
                "stages.1.methods=[{name: o_lora, max_tasks: 2}]",
            ],
        )
    for method in ("ewc", "gpm", "packnet"):  # their state would describe a replaced adapter
        with pytest.raises(RecipeError, match=rf"\({method}\): keeps anchors.*lora.per_task"):
            load_recipe(
                QUICKSTART,
                [
                    f"out_dir={tmp_path}",
                    "stages.1.lora={rank: 2, per_task: true}",
                    f"stages.1.methods=[{{name: {method}}}]",
                ],
            )
    with pytest.raises(RecipeError, match=r"\(average\): merges whole weight trees"):
        load_recipe(
            QUICKSTART,
            [
                f"out_dir={tmp_path}",
                "stages.1.lora={rank: 2}",
                "stages.1.methods=[{name: average}]",
            ],
        )
    with pytest.raises(RecipeError, match="unknown projections"):
        load_recipe(QUICKSTART, [f"out_dir={tmp_path}", "stages.1.lora={targets: [qq]}"])
