"""Every method, as a recipe entry, forgets less than plain fine-tuning.

Two tasks for a small next-token model (a token embedding, one hidden layer, an output head):
each task is a Markov chain whose next token is a task-specific permutation of the current one,
so learning the second overwrites the first. Each method is driven exactly as the stage loop
drives it (jaxcl/train/stage.py, the order of jaxcl.methods.protocol): its recipe spec compiles
into the chain with AdamW (``build_chain``), the jitted train step (``make_train_step``) runs
with A-GEM's memory gradients, step hooks run after each step, the first task is scored on the
method's eval view, its estimates feed one ``consolidate``, then the fold/renew/memory/merge
hooks. BWT = score on task A after task B − score after task A, the score being −NLL (nats).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.data.pipeline import batched_stream
from jaxcl.methods import consolidate
from jaxcl.methods.protocol import (
    END_PHASES,
    Carry,
    Context,
    TaskInfo,
    compose_views,
    run_hooks,
    run_step_hooks,
)
from jaxcl.methods.specs import compile_methods
from jaxcl.objectives.bound import lm_objective
from jaxcl.recipe import OptimizerSpec, validate
from jaxcl.train.optim import build_chain
from jaxcl.train.stage import unmasked
from jaxcl.train.step import TrainState, make_train_step

VOCAB, EMBED, HIDDEN, SEQ, N, BATCH = 16, 16, 32, 17, 64, 16
STEPS, LR = 150, 1e-2
MARGIN = 0.4  # BWT must improve on plain fine-tuning by at least 40% of its forgetting


def _task(seed, first):
    """Sequences over the tokens ``first..first+VOCAB/2-1`` whose next token is a permutation
    of the current one (90%) or uniform noise (10%): each task has its own half of the vocabulary
    (so its own input rows and representations) and shares the output head."""
    rng = np.random.default_rng(seed)
    half = VOCAB // 2
    perm = rng.permutation(half)
    tokens = np.zeros((N, SEQ), np.int32)
    tokens[:, 0] = rng.integers(half, size=N)
    for t in range(1, SEQ):
        noise = rng.random(N) < 0.1
        tokens[:, t] = np.where(noise, rng.integers(half, size=N), perm[tokens[:, t - 1]])
    rows = tokens + first
    return [{"tokens": row, "loss_mask": np.ones(SEQ, np.float32)} for row in rows]


TASKS = [_task(1, 0), _task(2, VOCAB // 2)]


def apply(params, tokens):
    h = jnp.tanh(params["embed"][tokens] @ params["mlp"]["w1"] + params["mlp"]["b1"])
    return h @ params["head"]


OBJECTIVE = lm_objective(apply)


def _init():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "embed": jax.random.normal(k[0], (VOCAB, EMBED)),
        "mlp": {
            "w1": jax.random.normal(k[1], (EMBED, HIDDEN)) / np.sqrt(EMBED),
            "b1": jnp.zeros(HIDDEN),
        },
        "head": jax.random.normal(k[2], (HIDDEN, VOCAB)) / np.sqrt(HIDDEN),
    }


def _batch(examples):
    return {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}


def nll(params, examples):
    return float(OBJECTIVE.scalar({})(params, _batch(examples)))


def _specs(methods):
    stage = {
        "name": "s",
        "kind": "pretrain",
        "steps_per_task": STEPS,
        "batch_size": BATCH,
        "seq_len": SEQ - 1,
        "tasks": [{"name": n, "data": {"bundled": "cpt/recipes"}} for n in ("a", "b")],
        "methods": methods,
    }
    raw = {"name": "f", "out_dir": "unused", "model": {"preset": "test-micro"}, "stages": [stage]}
    return validate(raw).stages[0].methods


def two_tasks(methods):
    """Train task A then task B as the stage loop would; returns (R[0][0], R[1][0])."""
    specs = _specs(methods)
    optimizer = OptimizerSpec(lr=LR, warmup_steps=0, schedule="constant", clip_norm=None)
    tx, compiled = build_chain(optimizer, 2 * STEPS, specs, STEPS)
    step = make_train_step(
        OBJECTIVE.loss_fn,
        tx,
        memory_grads=compiled.needs_memory_grads,
        memory_per_task=compiled.memory_grads_per_task,
    )
    view = compose_views([v for v in (m.eval_view() for m in specs) if v is not None])
    memories = [s.new_memory(seed=0, n_tasks=2) for s in specs]
    memory = next((m for m in memories if m is not None), None)
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)))  # no aliases
    carry = Carry(init(_init()), {}, memory)
    ratio = next((s.replay_ratio() for s, m in zip(specs, memories) if m is not None), 0.0)
    scores = []
    for t, task in enumerate(TASKS):

        def batches(n, task=task, t=t):
            stream = batched_stream(task, batch_size=BATCH, num_batches=n, seed=100 + t)
            return (jax.tree.map(jnp.asarray, stream[i]) for i in range(n))

        ctx = Context(
            TaskInfo(t, "ab"[t], STEPS, task, ["" for _ in task], ("a", "b")),
            OBJECTIVE.scalar({}),
            apply,
            lambda p: (p, {}),
            lambda p, _: p,
            batches,
        )
        carry = run_hooks(compiled.hooks, "task_start", ctx, carry)
        pool = carry.buffer.examples() if carry.buffer is not None and len(carry.buffer) else []
        stream = batched_stream(
            task, batch_size=BATCH, num_batches=STEPS, seed=t, replay=pool, replay_ratio=ratio
        )
        mem_stream = (
            batched_stream(pool, batch_size=BATCH, num_batches=STEPS, seed=9) if pool else None
        )
        for k in range(STEPS):
            batch = stream[k]
            mem = mem_stream[k] if mem_stream is not None else unmasked(batch)
            if compiled.memory_grads_per_task:  # GEM: one batch per earlier task (here one)
                mem = jax.tree.map(lambda x: np.asarray(x)[None], mem)
            state, _ = step(carry.state, jax.tree.map(jnp.asarray, batch), {}, mem)
            carry = run_step_hooks(compiled.hooks, k, ctx, carry._replace(state=state))
        params = carry.state.params
        scored = view(params, carry, 0) if view else params
        scores.append(-nll(scored, TASKS[0]))
        learned = nll(view(params, carry, t) if view else params, task)
        assert learned < 0.8 * nll(_init(), task), f"task {t} was not learned ({learned:.3f})"
        estimates = {}
        for spec in specs:
            estimates.update(spec.estimates(ctx, carry))
        opt_state = consolidate(carry.state.opt_state, params=params, **estimates)
        carry = carry._replace(state=carry.state._replace(opt_state=opt_state))
        for phase in END_PHASES:
            carry = run_hooks(compiled.hooks, phase, ctx, carry)
    return scores


METHODS = {
    "l2_anchor": {"name": "l2_anchor", "lam": 1.0},
    "ewc": {"name": "ewc", "lam": 10.0, "fisher_examples": 64},
    "mas": {"name": "mas", "lam": 1.0, "importance_examples": 64},
    "si": {"name": "si", "lam": 1.0, "damping": 0.1},
    "recadam": {"name": "recadam", "coef": 10.0, "k": 0.1, "t0": 100},
    "agem": {"name": "agem", "per_task": 64},
    "gem": {"name": "gem", "per_task": 64},
    "ogd": {"name": "ogd", "per_task": 64, "max_directions": 64, "output": "logit"},  # GTL
    "gpm": {"name": "gpm", "threshold": 0.99},
    "packnet": {"name": "packnet", "prune": 0.5},
    "replay": {"name": "replay", "ratio": 0.25, "capacity": 64},
    "average": {"name": "average", "mode": "interpolate", "alpha": 0.5},
}


@pytest.fixture(scope="module")
def plain_bwt():
    first, after = two_tasks([])
    assert after < first - 0.5, "plain fine-tuning must forget for the test to mean anything"
    return after - first


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_forgets_less_than_plain_fine_tuning(name, plain_bwt):
    first, after = two_tasks([METHODS[name]])
    bwt = after - first
    print(f"{name}: bwt {bwt:.4f} nats vs plain {plain_bwt:.4f}")
    assert bwt > plain_bwt * (1 - MARGIN), (name, bwt, plain_bwt)


def test_compiled_chain_is_the_trainers():
    """The harness compiles what the trainer compiles: the same transforms on the same sides."""
    specs = _specs([METHODS["ewc"], METHODS["packnet"]])
    compiled = compile_methods(specs, learning_rate=LR)
    assert len(compiled.front) == 1 and len(compiled.behind) == 1
    assert [h.phase for h in compiled.hooks] == ["step"]
