"""The task-boundary protocol: hooks run by phase in the documented order, and the stage loop
names no method."""

import re
from pathlib import Path

import numpy as np
import pytest

from jaxcl.methods import protocol
from jaxcl.methods.protocol import Carry, Context, Hook, TaskInfo, run_hooks, run_step_hooks
from jaxcl.recipe import validate
from jaxcl.train import stage as stage_module
from jaxcl.train.runner import run_recipe

ROOT = Path(__file__).parent.parent


def _ctx(steps=5):
    task = TaskInfo(0, "a", steps, [], [])
    return Context(task, None, None, lambda p: (p, {}), lambda t, f: t, lambda n: iter(()))


def _appender(label):
    return lambda ctx, carry: carry._replace(
        frozen={**carry.frozen, "log": [*carry.frozen["log"], label]}
    )


def test_hooks_run_by_phase_in_declared_order_and_step_hooks_when_due():
    hooks = [
        Hook("memory", _appender("m1")),
        Hook("fold", _appender("f1")),
        Hook("memory", _appender("m2")),
        Hook("step", _appender("every")),
        Hook("step", _appender("third"), when=lambda k, steps: k == 2),
    ]
    carry = Carry(None, {"log": []}, None)
    ctx = _ctx()
    for phase in protocol.END_PHASES:
        carry = run_hooks(hooks, phase, ctx, carry)
    assert carry.frozen["log"] == ["f1", "m1", "m2"]  # fold before memory, recipe order within
    carry = Carry(None, {"log": []}, None)
    for k in range(5):
        carry = run_step_hooks(hooks, k, ctx, carry)
    assert carry.frozen["log"] == ["every"] * 3 + ["third"] + ["every"] * 2
    with pytest.raises(ValueError, match="unknown phase"):
        Hook("after_lunch", _appender("x"))


def test_stage_loop_names_no_method():
    source = (ROOT / "jaxcl/train/stage.py").read_text()
    from jaxcl.methods.specs import method_names

    # a method named in a comparison, a lookup or a membership test
    pattern = r"(==|!=|\bin|method\()\s*[\"']{}[\"']"
    named = [n for n in method_names() if re.search(pattern.format(n), source)]
    assert not named, f"the stage loop names methods {named}"
    assert "quota" not in source and '"reference"' not in source


STAGE = {
    "name": "cit",
    "kind": "instruct",
    "seq_len": 48,  # the sentiment prompts fill 32 positions: no trained token
    "batch_size": 8,
    "eval_batch_size": 16,
    "steps_per_task": 3,
    "optimizer": {"lr": 1e-2, "moments": "task"},
    "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"], "per_task": True},
    "methods": [{"name": "replay", "ratio": 0.25, "capacity": 16}, {"name": "o_lora"}],
    "tasks": [
        {"name": n, "data": {"bundled": f"cit/{n}", "train_size": 16, "eval_size": 8}}
        for n in ("sentiment", "capitals")
    ],
}


@pytest.mark.slow
def test_the_loop_runs_each_boundary_in_the_documented_order(tmp_path, monkeypatch):
    """Per task: task_start hooks, the steps, scoring, estimates + consolidate, then fold
    (per-task LoRA), renew (moments), memory (replay) and merge, then the checkpoint."""
    events = []
    real_run_hooks, real_consolidate = stage_module.run_hooks, stage_module.consolidate
    real_save = stage_module.StageRun.save

    def run_hooks_logged(hooks, phase, ctx, carry):
        names = [h.name for h in hooks if h.phase == phase]
        events.append((phase, ctx.task.index, tuple(names)))
        return real_run_hooks(hooks, phase, ctx, carry)

    def consolidate_logged(opt_state, **kw):
        events.append(("consolidate",))
        return real_consolidate(opt_state, **kw)

    def save_logged(self, t, k, done):
        events.append(("save", t, done))
        return real_save(self, t, k, done)

    monkeypatch.setattr(stage_module, "run_hooks", run_hooks_logged)
    monkeypatch.setattr(stage_module, "consolidate", consolidate_logged)
    monkeypatch.setattr(stage_module.StageRun, "save", save_logged)
    recipe = validate(
        {
            "name": "protocol",
            "out_dir": str(tmp_path / "run"),
            "model": {"preset": "test-micro"},
            "stages": [STAGE],
        }
    )
    results = run_recipe(recipe)
    per_task = [
        ("task_start", ()),
        ("consolidate",),
        ("fold", ("lora: per-task adapter",)),
        ("renew", ("optimizer: moments per task",)),
        ("memory", ("replay",)),
        ("merge", ()),
        ("save", True),
    ]
    expected = []
    for t in range(2):
        for event in per_task:
            if event[0] in ("consolidate",):
                expected.append(event)
            elif event[0] == "save":
                expected.append(("save", t, True))
            else:
                expected.append((event[0], t, event[1]))
    assert events == expected
    r = np.asarray(results["stages"][0]["R"])
    assert r.shape == (2, 2)
