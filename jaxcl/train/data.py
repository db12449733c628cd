"""What a stage reads of its tasks' data: streams of batches, budgets, eval sets.

Each task's training split stays on disk: :meth:`~jaxcl.data.spec.DataSpec.documents` reads and
tokenizes it row by row, :func:`~jaxcl.data.budget.task_budget` turns its ``steps`` /
``epochs`` / ``tokens`` into steps, and :func:`~jaxcl.data.stream.make_task_stream` packs it
into this process's rows of every batch (:mod:`jaxcl.data.stream`). The eval sets are small and
held in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcl.data.budget import Budget, task_budget
from jaxcl.data.pipeline import encode_all
from jaxcl.data.prepare import source_fingerprint, tokenizer_fingerprint
from jaxcl.data.sources import BadRowError
from jaxcl.data.spec import DataSpec
from jaxcl.data.stream import TaskRows, TaskStream, make_task_stream
from jaxcl.data.tokenize import special_ids
from jaxcl.eval.tasks import task_eval
from jaxcl.recipe import StageSpec, TaskSpec

#: examples whose prompts (or texts) stand for a task's instructions (InsCL's memory split)
INSTRUCTION_SAMPLE = 1000
#: the first training examples of every task validated before a run's first step
CHECK_SAMPLE = 16


class DataError(ValueError):
    """A task's data cannot be read; the message names the task, file and line."""


@dataclass
class TaskData:
    name: str
    docs: Any  # jaxcl.data.stream.DocumentSource: the training split, read lazily
    eval: Any  # jaxcl.eval.tasks.TaskEval: the task's eval set, scored by its metric
    instructions: list[str]  # prompts (or texts) of the first examples, for InsCL's memory split
    budget: Budget
    seed: int  # the seed of the task's document order and replay draws


def task_seed(recipe: Any, t: int) -> int:
    return recipe.seed * 1_000_003 + t


def shard() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def _instructions(task: TaskSpec) -> list[str]:
    try:
        rows = task.data.sample(INSTRUCTION_SAMPLE)
    except BadRowError:  # a bad row among the first: the rows before it stand for the task
        rows = []
    return [str(e.get("prompt", e.get("text", ""))) for e in rows]


def lengths_cache(recipe: Any, data: DataSpec, tokenizer: Any, seq_len: int) -> Path | None:
    """Where the token counts of ``data``'s training documents are kept in the run folder:
    ``OUT_DIR/cache/lengths-<sha256>.npy``, the hash taken over the data spec, the source
    files' sizes and mtimes, the tokenizer and ``seq_len`` (so any change counts again).
    ``None`` for data generated or held in memory (counted in no time)."""
    if data.source is None or data.source.type == "memory":
        return None
    key = {
        "data": data.model_dump(mode="json"),
        "files": source_fingerprint(data)["files"],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(recipe.out_dir) / "cache" / f"lengths-{digest[:32]}.npy"


def documents_and_budget(
    recipe: Any, stage: StageSpec, t: int, tokenizer: Any, *, process_count: int = 1
) -> tuple[Any, Budget]:
    """Task ``t``'s training documents (read lazily) and its budget in steps."""
    task = stage.tasks[t]
    docs = task.data.documents(tokenizer, stage.seq_len)
    cache = None
    if task.epochs is not None and stage.row_packing != "none":  # a count of packed rows
        cache = lengths_cache(recipe, task.data, tokenizer, stage.seq_len)
    budget = task_budget(
        task,
        stage.steps_per_task,
        docs=docs,
        packing=stage.row_packing,
        batch_size=stage.batch_size,
        seq_len=stage.seq_len,
        seed=task_seed(recipe, t),
        process_count=process_count,
        lengths_cache=cache,
    )
    return docs, budget


def first_trained(example_rows: list[dict[str, np.ndarray]]) -> list[int]:
    """The smallest ``seq_len`` at which each encoded whole example keeps a trained token (0
    when it has none). A row at ``seq_len`` L holds L + 1 tokens (the inputs and the shifted
    targets), so a first loss-masked token at position ``f`` is kept from L = ``f`` on; a
    preference pair needs one on both sides."""
    out = []
    for row in example_rows:
        masks = [v for k, v in row.items() if k.endswith("mask")]
        firsts = [int(np.argmax(m)) if m.any() else 0 for m in masks]
        out.append(max(firsts) if all(firsts) else 0)
    return out


def check_stage_data(stage: StageSpec, tokenizer: Any, warn: Callable[[str], None] = print) -> None:
    """Validate what every task of ``stage`` will read before any stage trains: the schema
    and the first :data:`CHECK_SAMPLE` training rows of each source, its eval split, and
    that rows cut at ``seq_len`` (``packing: none``) keep a trained token. Raises
    :class:`DataError` naming the stage, task, file and line; warns when only some of the
    sampled rows would train nothing."""
    for task in stage.tasks:
        where = f"stage {stage.name}, task {task.name}"
        try:
            examples = task.data.sample(CHECK_SAMPLE, skip_bad=task.data.on_bad_row == "skip")
            task.data.load("eval")
            encoded = encode_all(examples, task.data.kind, tokenizer, None)
        except (BadRowError, ValueError) as err:
            raise DataError(f"{where}: {err}") from None
        if not examples:
            raise DataError(f"{where}: the training split has no examples")
        if stage.row_packing != "none":
            continue  # packed rows keep every token: a long document goes on in the next row
        needs = first_trained(encoded)
        empty = sum(1 for n in needs if n == 0 or n > stage.seq_len)
        longest = max(needs)
        if empty == len(needs):
            raise DataError(
                f"{where}: none of the first {len(needs)} examples keeps a trained token at "
                f"seq_len {stage.seq_len} (the prompt fills the row, or no token is trained); "
                f"training would see no signal. seq_len {longest} keeps one in each of them"
            )
        if empty:
            warn(
                f"{where}: {empty} of the first {len(needs)} examples keep no trained token "
                f"at seq_len {stage.seq_len} (seq_len {longest} keeps one in each)"
            )


def task_data(ctx: Any, stage: StageSpec) -> list[TaskData]:
    """Every task's documents, budget and eval set (read, tokenized and budgeted up front only
    as far as an ``epochs`` budget needs the documents' lengths)."""
    out = []
    for t, (task, metric) in enumerate(zip(stage.tasks, stage.task_metrics)):
        where = f"stage {stage.name}, task {task.name}"
        try:
            evaluation = task_eval(
                metric,
                task.data.load("eval"),
                task.data.kind,
                ctx.tokenizer,
                stage.seq_len,
                stage.eval_batch_size,
                max_new_tokens=stage.eval_max_new_tokens,
                where=where,
            )
            docs, budget = documents_and_budget(
                ctx.recipe, stage, t, ctx.tokenizer, process_count=shard()[1]
            )
        except BadRowError as err:
            raise DataError(f"{where}: {err}") from None
        out.append(
            TaskData(
                task.name, docs, evaluation, _instructions(task), budget, task_seed(ctx.recipe, t)
            )
        )
    return out


def stream_for(
    ctx: Any,
    stage: StageSpec,
    task: TaskData,
    *,
    seed_offset: int = 0,
    pool: list | None = None,
    ratio: Any = 0.0,
    annotate: Any = None,
    budget: Budget | None = None,
    process: tuple[int, int] | None = None,
) -> TaskStream:
    """Task ``task``'s batches on this process (its block of every global batch), or on
    ``process`` when given (``(0, 1)``: the global row sequence)."""
    _, _, pad = special_ids(ctx.tokenizer)
    return make_task_stream(
        task.docs,
        packing=stage.row_packing,
        seq_len=stage.seq_len,
        batch_size=stage.batch_size,
        seed=task.seed + seed_offset,
        pad_id=pad,
        budget=budget if budget is not None else task.budget,
        shard=process or shard(),
        pool=pool,
        ratio=ratio,
        annotate=annotate,
    )


def task_rows(ctx: Any, stage: StageSpec, task: TaskData) -> TaskRows:
    """The task's own rows in training order, lazily (what hooks see as ``ctx.task.examples``,
    and what the memory samples at the task's end): one epoch when its size is known, else
    the rows its budget trained. Every process reads the same global rows, so that every
    process keeps the same memory."""
    budget, single = task.budget, shard()[1] == 1
    if stage.row_packing == "none":
        length = len(task.docs)
    elif single and budget.epoch_rows:
        length = budget.epoch_rows
    else:
        length = budget.steps * stage.batch_size
    endless = Budget(0, 0)
    rows = lambda: stream_for(ctx, stage, task, budget=endless, process=(0, 1)).rows  # noqa: E731
    return TaskRows(rows, length)
