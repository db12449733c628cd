"""Training without signal does not end in success: a gradient norm of zero for
``stall_steps`` consecutive steps stops the run like a NaN does, naming the step."""

from pathlib import Path

import numpy as np
import pytest

from jaxcl.data.stream import TaskStream
from jaxcl.recipe import load_recipe
from jaxcl.train.runner import run_recipe
from jaxcl.train.stage import TrainingStalled

ROOT = Path(__file__).parent.parent
MICRO = [
    "compare={}",
    "model.preset=test-micro",
    "probes=false",
    "log_every=1",
    "stages.0.steps_per_task=8",
    "stages.0.batch_size=4",
    "stages.0.eval_batch_size=16",
    "stages.0.methods=[]",
]


def _recipe(tmp_path, *extra):
    recipe = load_recipe(
        ROOT / "recipes/quickstart.yaml",
        [f"out_dir={tmp_path / 'run'}", *MICRO, *extra],
    )
    return recipe.model_copy(update={"stages": recipe.stages[:1]})


def _masked_from(step: int):
    """TaskStream.next_batch with every loss mask zeroed from the task's step ``step`` on."""
    original = TaskStream.next_batch

    def masked(self):
        k = self.step
        batch = original(self)
        if k >= step:
            batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
        return batch

    return masked


def test_a_zero_gradient_for_stall_steps_stops_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(TaskStream, "next_batch", _masked_from(2))
    recipe = _recipe(tmp_path, "stall_steps=3")
    # steps 3, 4 and 5 of the task (k = 2, 3, 4) have no trained token
    with pytest.raises(TrainingStalled, match=r"task 'recipes', step 5 of the task") as err:
        run_recipe(recipe)
    assert "0 for 3 consecutive steps" in str(err.value)


def test_fewer_zero_steps_than_stall_steps_train_on(tmp_path, monkeypatch):
    monkeypatch.setattr(TaskStream, "next_batch", _masked_from(6))  # 2 zero steps of 8
    results = run_recipe(_recipe(tmp_path, "stall_steps=3"))
    steps = [e for e in results["stages"][0]["losses"] if e["task"] == "recipes"]
    assert [e["grad_norm"] == 0.0 for e in steps] == [False] * 6 + [True] * 2


def test_stall_steps_zero_turns_the_check_off(tmp_path, monkeypatch):
    monkeypatch.setattr(TaskStream, "next_batch", _masked_from(0))
    results = run_recipe(_recipe(tmp_path, "stall_steps=0"))
    assert all(e["grad_norm"] == 0.0 for e in results["stages"][0]["losses"])


def _watch(stall: int, vocab: int = 384):
    from types import SimpleNamespace

    from jaxcl.train.guards import StepWatch

    named = SimpleNamespace(name="x")
    return StepWatch(named, named, lambda: "ckpt", stall, uniform=float(np.log(vocab)))


def test_a_loss_stuck_at_ln_vocab_for_stall_steps_stops_even_with_a_gradient():
    """A saturated model predicting uniformly: loss ln 384 = 5.9506 while the gradient is not
    zero (the issue's lr=1e6 run); three such steps of three stop it, one nearby loss does not."""
    watch = _watch(3)
    ln_v = float(np.log(384))
    watch((0, {"loss": np.float32(ln_v * (1 + 5e-3)), "grad_norm": np.float32(0.3)}))  # off
    watch((1, {"loss": np.float32(ln_v), "grad_norm": np.float32(0.3)}))
    watch((2, {"loss": np.float32(ln_v * (1 - 5e-4)), "grad_norm": np.float32(0.3)}))
    with pytest.raises(TrainingStalled, match=r"ln V = 5\.9506 .* for 3 consecutive steps"):
        watch((3, {"loss": np.float32(ln_v), "grad_norm": np.float32(0.3)}))
    fresh = _watch(3)  # a step that moves off ln V resets the count
    for k, loss in enumerate([ln_v, ln_v, ln_v * 0.99, ln_v, ln_v]):
        fresh((k, {"loss": np.float32(loss), "grad_norm": np.float32(0.3)}))
