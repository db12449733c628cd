"""The memory a train step needs per device, by dtype: estimated from shapes, and measured.

The dry-run plan (:mod:`jaxcl.plan`) adds, for every stage, what a step holds on one device:

* **parameters** (the float32 master weights, or whatever ``param_dtype`` says), and with
  ``model.precision: bf16`` their bfloat16 compute copy;
* **optimizer + CL state**, every buffer named by its state and field (``ScaleByAdamState.mu``,
  ``EwcState.fisher``, ``GpmState.basis``...) with its dtype (:func:`state_buffers`);
* **frozen trees** the objective reads (reference, task-start parameters);
* **gradients** (float32, the trainable parameters' shapes);
* **activations**: what the backward pass keeps of every layer (:func:`activation_bytes`; with
  ``model.remat`` only each layer's input, plus one layer's internals while it is recomputed);
* **logits**: the peak of the loss's ``[rows, seq, vocab]`` float32 logits, or of one
  ``[rows, loss_chunk, vocab]`` chunk with chunked losses; the plan also says what the whole
  logits would add.

:func:`measure_step` compiles the stage's real train step on this host for given shapes (no
training, no parameters allocated) and reads XLA's buffer assignment
(``compiled.memory_analysis()``: arguments + outputs + temporaries − donated aliases); tests
check the estimate against it (within 25%, tests/test_memplan.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2**30


def _itemsize(dtype: Any) -> int:
    return np.dtype(jnp.dtype(dtype)).itemsize


def _shard_bytes(leaf: Any, sharding: Any) -> int:
    shape = sharding.shard_shape(leaf.shape) if hasattr(sharding, "shard_shape") else leaf.shape
    return math.prod(shape) * _itemsize(leaf.dtype)


def bytes_by_dtype(tree: Any, shardings: Any = None) -> dict[str, int]:
    """Per-device bytes of ``tree``'s leaves, summed by dtype name."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    out: dict[str, int] = defaultdict(int)
    for leaf, sharding in zip(leaves, shards):
        out[jnp.dtype(leaf.dtype).name] += _shard_bytes(leaf, sharding)
    return dict(out)


def _is_state(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _has_state(node: Any) -> bool:
    return any(_is_state(n) for n in jax.tree.leaves(node, is_leaf=_is_state))


def state_buffers(state: Any, shardings: Any = None) -> list[dict[str, Any]]:
    """Every buffer of an optimizer + CL state (an optax chain's): ``{"buffer":
    "StateName.field", "dtype", "bytes"}`` per device, one row per (buffer, dtype), in chain
    order (a buffer appearing twice in a chain is listed twice). Scalars and counters count
    too (a few bytes)."""
    rows: list[dict[str, Any]] = []

    def walk(node: Any, shard: Any, label: str) -> None:
        if _is_state(node):
            for field in node._fields:
                sub, sub_sh = getattr(node, field), getattr(shard, field, None)
                name = f"{type(node).__name__}.{field}"
                walk(sub, sub_sh, name)
            return
        if _has_state(node):
            children = node.values() if isinstance(node, dict) else node
            shards = shard.values() if isinstance(shard, dict) else (shard or [None] * len(node))
            for child, child_sh in zip(children, shards):
                walk(child, child_sh, label)
            return
        for dtype, n in bytes_by_dtype(node, shard).items():
            if label:
                rows.append({"buffer": label, "dtype": dtype, "bytes": n})

    walk(state, shardings, "")
    return rows


def activation_bytes(
    cfg: Any,
    rows: int,
    seq: int,
    *,
    chunk: int,
    trees: int = 1,
) -> dict[str, int]:
    """Estimated activation and logits peaks of one train step on ``rows`` sequences of ``seq``
    tokens on one device (per micro-batch), for model config ``cfg``.

    Per layer the backward pass keeps (``s`` the compute dtype's bytes, ``h`` = head dim,
    ``H``/``K`` query/key-value heads, ``F`` the MLP width) ``rows·seq·s·(4D + (H + 2K)·h +
    2F)``: the layer input and the normed inputs, q/k/v after rope, the attention output and
    the gate and up projections (the backward rules recompute everything else from these,
    ``jaxcl.models.matmul``). One layer's attention scores, probabilities and their gradient,
    ``3·rows·H·seq²`` in float32, live at a time. With ``remat`` only each layer's input
    ``rows·seq·D·s`` is kept, plus one layer's internals during its recomputation. The logits
    peak is four ``[rows, seq, V]`` float32 buffers (the logits, their softmax, their gradient
    and a temporary), or with chunked losses three ``[rows, loss_chunk, V]`` buffers plus the
    hidden states the chunks read (the coefficients measured on XLA CPU, docs/performance.md);
    each frozen tree the objective reads (``trees − 1`` of them) adds its own logits and hidden
    states, without gradient. Returns ``activations``, ``logits`` and ``logits_unchunked``.
    """
    s = _itemsize(cfg.dtype)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    h, k = cfg.num_heads, cfg.num_kv_heads
    tokens = rows * seq
    kept = tokens * s * (4 * d + (h + 2 * k) * hd + 2 * f)  # per layer, until its backward
    attention = 3 * rows * h * seq * seq * 4  # one layer's float32 scores at a time
    if cfg.remat:
        layers = cfg.num_layers * tokens * d * s + kept + attention
    else:
        layers = cfg.num_layers * kept + attention
    v = cfg.vocab_size
    whole = 4 * tokens * v * 4 + (trees - 1) * tokens * v * 4
    n = seq if chunk <= 0 or seq <= chunk else chunk
    if n < seq:
        logits = 3 * rows * n * v * 4 + (trees - 1) * rows * n * v * 4
        logits += 2 * trees * tokens * d * s  # the hidden states each chunk reads, padded
    else:
        logits = whole
    return {"activations": layers, "logits": logits, "logits_unchunked": whole}


def measure_step(recipe: Any, stage_index: int = 0) -> dict[str, int]:
    """Compile stage ``stage_index``'s train step on this host's first device for the recipe's
    shapes (abstract inputs: nothing trained or allocated) and read XLA's buffer assignment:
    ``{"arguments", "outputs", "temporaries", "aliased", "peak"}`` in bytes, ``peak = arguments
    + outputs + temporaries − aliased`` (the donated state's outputs reuse its buffers)."""
    from jaxcl.objectives.chunked import ModelApply
    from jaxcl.objectives.spec import stage_objective
    from jaxcl.train.optim import build_chain
    from jaxcl.train.step import TrainState, make_train_step

    stage = recipe.stages[stage_index]
    if stage.lora is not None:
        raise ValueError("measure_step measures full-parameter stages (this one has lora:)")
    graphdef, params, _ = recipe.model.build_abstract()
    tx, compiled = build_chain(recipe.stage_optimizer(stage), 10, stage.methods)
    objective = stage_objective(stage, ModelApply(graphdef))
    step = make_train_step(
        objective.loss_fn,
        tx,
        memory_grads=compiled.needs_memory_grads,
        accum_steps=stage.grad_accum,
        compute_dtype=recipe.model.compute_cast,
    )
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), params)
    b, t = stage.batch_size, stage.seq_len + 1
    tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
    if stage.kind == "align":
        batch = {
            k: tok for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")
        }
    else:
        batch = {"tokens": tok, "loss_mask": tok}
    frozen = {name: params for name in objective.frozen}
    memory = batch if compiled.needs_memory_grads else None
    analysis = step.lower(state, batch, frozen, memory).compile().memory_analysis()
    out = {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def stage_memory(
    recipe: Any,
    stage: Any,
    tree: Any,
    tree_sh: Any,
    trainable: Any,
    trainable_sh: Any,
    opt: Any,
    opt_sh: Any,
    frozen: int,
    mesh_shape: dict[str, int],
    *,
    step_trees: int | None = None,
) -> dict[str, Any]:
    """One stage's per-device memory plan (bytes), by dtype: see the module docstring.

    ``tree`` the stage's parameters (adapters included), ``trainable`` what is trained,
    ``opt`` the optimizer + CL state (abstract), each with its shardings; ``frozen`` the number
    of frozen trees the objective holds, ``step_trees`` how many of them each step runs
    (default all; precomputed references run outside the step). ``peak`` sums every part;
    ``logits_unchunked_extra`` is what the whole ``[rows, seq, vocab]`` logits would add.
    """
    cfg = recipe.model.abstract_model().config
    dp = max(1, mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1))
    pairs = 2 if stage.kind == "align" else 1
    rows = max(1, stage.batch_size // stage.grad_accum // dp) * pairs
    params = bytes_by_dtype(tree, tree_sh)
    parts: dict[str, dict[str, int]] = {"parameters": params}
    cast = recipe.model.compute_cast
    if cast is not None:
        n = sum(b // _itemsize(dt) for dt, b in params.items() if "float" in dt)
        parts["compute copy"] = {cast: n * _itemsize(cast)}
    buffers = state_buffers(opt, opt_sh)
    state: dict[str, int] = defaultdict(int)
    for row in buffers:
        state[row["dtype"]] += row["bytes"]
    parts["optimizer + CL state"] = dict(state)
    if frozen:
        parts["frozen trees"] = {k: frozen * v for k, v in params.items()}
    parts["gradients"] = bytes_by_dtype(trainable, trainable_sh)
    runs = frozen if step_trees is None else step_trees
    act = activation_bytes(cfg, rows, stage.seq_len, chunk=stage.loss_chunk, trees=1 + runs)
    parts["activations"] = {jnp.dtype(cfg.dtype).name: act["activations"]}
    parts["logits"] = {"float32": act["logits"]}
    parts["batch"] = {"int32": 2 * rows * (stage.seq_len + 1) * 4}
    peak = sum(sum(p.values()) for p in parts.values())
    by_dtype: dict[str, int] = defaultdict(int)
    for p in parts.values():
        for dt, b in p.items():
            by_dtype[dt] += b
    return {
        "rows_per_device": rows,
        "parts": parts,
        "buffers": buffers,
        "by_dtype": dict(by_dtype),
        "peak": peak,
        "loss_chunk": stage.loss_chunk,
        "logits_unchunked_extra": act["logits_unchunked"] - act["logits"],
    }


def format_memory(stages: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each stage's per-device memory by part and dtype, its CL buffers, and
    what unchunked logits would add."""
    gib = lambda b: f"{b / GIB:.3f}"  # noqa: E731
    lines = ["", "| stage | part | dtype | GiB/dev |", "|---|---|---|---|"]
    for s in stages:
        mem = s["memory"]
        for part, by in mem["parts"].items():
            for dt, b in sorted(by.items()):
                lines.append(f"| {s['name']} | {part} | {dt} | {gib(b)} |")
        for row in mem["buffers"]:
            if row["bytes"] >= 1024:  # counters and scalars left out of the listing
                lines.append(
                    f"| {s['name']} | - {row['buffer']} | {row['dtype']} | {gib(row['bytes'])} |"
                )
        lines.append(f"| {s['name']} | **peak (estimate)** | all | **{gib(mem['peak'])}** |")
    lines.append("")
    for s in stages:
        mem = s["memory"]
        if mem["loss_chunk"] > 0 and mem["logits_unchunked_extra"] > 0:
            lines.append(
                f"stage {s['name']}: chunked losses (loss_chunk {mem['loss_chunk']}); without "
                f"them (loss_chunk: 0) the logits would need {gib(mem['logits_unchunked_extra'])}"
                " GiB/dev more"
            )
        else:
            lines.append(f"stage {s['name']}: the whole logits are held (no chunking applies)")
    return lines
