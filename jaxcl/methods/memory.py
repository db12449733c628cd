"""Replay as a recipe method: a memory of finished tasks' examples mixed into later batches.

The data side lives in :mod:`jaxcl.data.replay` (the reservoir buffer, InsCL quotas, the mixing
op) and :mod:`jaxcl.data.pseudo` (LAMOL's generation); this module declares what the stage loop
does with it: a buffer per stage, the finished task's examples remembered at its end (phase
``memory``) and, for InsCL, the quotas re-split for each new task (phase ``task_start``). A-GEM's
episodic memory uses the same ``memory`` hook.

With ``general`` (TRACE's replay of LIMA, Wang et al., 2023) a general-purpose instruction set
enters the memory at the start of the stage's first task, under the name ``general``, and is
mixed in from then on like a finished task's examples (sharing the capacity by ``quota``).

With ``pseudo`` (LAMOL, Sun et al., 2020) no real example is kept: at a task's end the memory
notes only how to prompt for the task (its prompt prefix and separator), and at the start of
every later task the current model (the one that finished the previous task) generates the
pseudo-examples of all finished tasks afresh, which replace the previous ones in the buffer.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from typing import Any, Literal

import pydantic
from pydantic import Field

from jaxcl.data.pseudo import (
    common_prefix,
    prompt_separator,
    pseudo_counts,
    pseudo_replay,
)
from jaxcl.data.replay import RatioScheduleSpec, ReplayBuffer
from jaxcl.data.spec import DataSpec
from jaxcl.data.tokenize import token_ids
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase
from jaxcl.spec import Strict

#: a replay buffer without a practical bound (pseudo-replay without an explicit capacity)
UNBOUNDED = 2**31 - 1
#: the data kind of the examples each stage kind trains on (pseudo-replay has no preference form)
_DATA_KIND = {
    "pretrain": "text",
    "instruct": "instruction",
    "text": "text",
    "instruction": "instruction",
}


def remember_task(ctx: Context, carry: Carry) -> Carry:
    """Phase ``memory``: the finished task's own examples go into the memory."""
    task = ctx.task
    # the task's rows stream by (read again, never held whole): algorithm R keeps a sample
    carry.buffer.add_task(task.name, task.examples, instructions=list(task.instructions))
    return carry


#: the memory's name for the general data of ``replay.general``
GENERAL = "general"


def remember_general(data: DataSpec) -> Callable[[Context, Carry], Carry]:
    """Phase ``task_start`` (the stage's first task): the general data enters the memory, so
    that it is mixed into every task's batches, the first one's included."""

    def hook(ctx: Context, carry: Carry) -> Carry:
        buf = carry.buffer
        if ctx.task.index != 0 or GENERAL in buf.tasks:  # resumed: already in the memory
            return carry
        src = data.source
        rows = src.examples("train") if src is not None else data.load("train")
        if src is not None and "train_size" in data.model_fields_set:
            rows = rows[: data.train_size]
        prompts = [str(r.get("prompt", r.get("text", ""))) for r in rows]
        buf.add_task(GENERAL, ctx.tools["encode"](rows), instructions=prompts)
        return carry

    return hook


def _inscl_upcoming(ctx: Context, carry: Carry) -> Carry:
    """Phase ``task_start``: InsCL re-splits the capacity by dissimilarity to the new task."""
    if len(carry.buffer):
        carry.buffer.set_upcoming(list(ctx.task.instructions))
    return carry


class PseudoSpec(Strict):
    """LAMOL's pseudo-replay: at the start of every task after the first, the model generates
    ``⌈ratio · |new task|⌉`` examples of the finished tasks (split equally among them) from each
    task's prompt prefix, with top-k sampling; they replace the memory (no real data is kept)."""

    ratio: float = Field(
        0.2, gt=0, description="LAMOL's γ: pseudo-examples per example of the new task"
    )
    per_task: int | None = Field(
        None, ge=1, description="pseudo-examples per finished task, instead of the γ split"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens per generation (default: what seq_len leaves the prefix)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature (LAMOL: 1)")
    top_k: int = Field(20, ge=0, description="top-k sampling (LAMOL: 20; 0 = the whole vocab)")
    prefix: dict[str, str] = Field(
        {}, description="generation prefix per task name (default: its prompts' common prefix)"
    )
    separator: str | None = Field(
        None,
        description="where a generated instruction example splits into prompt and response "
        "(default: the common end of the task's prompts, e.g. '\\nA:')",
    )


def _data_kind(ctx: Context) -> str:
    kind = ctx.tools.get("kind", "instruct")
    if kind not in _DATA_KIND:
        raise ValueError(
            f"replay.pseudo: a {kind} stage has no pseudo-replay (it generates text or "
            "prompt/response examples, not preference pairs)"
        )
    return _DATA_KIND[kind]


def _seed(ctx: Context, call: int) -> int:
    """A sampling seed per (run seed, new task, generation call), below 2³⁰ (the stage's
    ``generate`` tool adds its batch index to it)."""
    key = f"{ctx.tools.get('seed', 0)}/pseudo/{ctx.task.index}/{call}"
    return zlib.crc32(key.encode()) >> 2


def note_task(spec: PseudoSpec) -> Callable[[Context, Carry], Carry]:
    """Phase ``memory`` with pseudo-replay: the finished task enters the memory with no example;
    its notes say how to prompt for it (prefix) and how to parse what comes back (separator)."""

    def hook(ctx: Context, carry: Carry) -> Carry:
        task, kind = ctx.task, _data_kind(ctx)
        prompts = [str(x) for x in task.instructions]
        prefix = spec.prefix.get(task.name)
        if prefix is None:
            prefix = common_prefix(prompts) if prompts else ""
        note: dict[str, Any] = {"prefix": prefix}
        if kind == "instruction":
            try:
                note["separator"] = spec.separator or prompt_separator(prompts)
            except ValueError as err:
                raise ValueError(f"replay.pseudo, task {task.name!r}: {err}") from None
        carry.buffer.add_task(task.name, [])
        carry.buffer.notes[task.name] = note
        return carry

    return hook


def generate_pseudo(spec: PseudoSpec) -> Callable[[Context, Carry], Carry]:
    """Phase ``task_start`` (every task after the first): the current model writes the
    finished tasks' pseudo-examples (:func:`jaxcl.data.pseudo.pseudo_replay`), encoded by the
    stage's ``encode`` tool, in place of the memory's previous ones."""

    def hook(ctx: Context, carry: Carry) -> Carry:
        buf = carry.buffer
        names = [n for n in buf.tasks if "prefix" in buf.notes.get(n, {})]
        if not names:
            return carry
        kind, tools = _data_kind(ctx), ctx.tools
        counts = pseudo_counts(
            len(ctx.task.examples),
            len(names),
            ratio=spec.ratio,
            per_task=spec.per_task,
            capacity=buf.capacity,
        )
        calls, params = itertools.count(), carry.state.params

        def generate_fn(prompts: list[str]) -> list[str]:
            budget = spec.max_new_tokens
            if budget is None:  # the rest of an encoded row: bos + prefix + continuation + eos
                used = len(token_ids(tools["tokenizer"], prompts[:1])[0])
                budget = max(int(tools["seq_len"]) - used - 1, 1)
            return tools["generate"](
                params,
                prompts,
                max_new_tokens=budget,
                temperature=spec.temperature,
                top_k=spec.top_k,
                seed=_seed(ctx, next(calls)),
            )

        made = pseudo_replay(
            generate_fn,
            {n: buf.notes[n]["prefix"] for n in names},
            per_task=dict(zip(names, counts)),
            kind=kind,  # type: ignore[arg-type]
            separator={n: buf.notes[n].get("separator", "") for n in names},
            batch_size=max(max(counts), 1),
        )
        encoded = {n: tools["encode"](made.examples[n]) if made.examples[n] else [] for n in names}
        buf.replace_examples(encoded)
        for n in names:
            buf.notes[n]["generated"] = {**made.stats[n], "for_task": ctx.task.name}
        return carry

    return hook


class ReplaySpec(MethodSpecBase):
    """Experience replay as a data op: a reservoir buffer of finished tasks' examples
    (:class:`jaxcl.data.replay.ReplayBuffer`) mixed into each later task's batches; with
    ``pseudo``, LAMOL's generated examples instead of stored ones."""

    name: Literal["replay"]
    ratio: float = Field(
        0.2,
        ge=0,
        le=1,
        description="fraction of each batch replayed (with pseudo, default γ/(1+γ): LAMOL's "
        "share of pseudo-examples in the union it trains on)",
    )
    capacity: int = Field(
        512,
        ge=1,
        description="examples kept across all finished tasks (with pseudo, default unbounded)",
    )
    quota: Literal["equal", "proportional", "inscl"] = Field(
        "equal", description="how the capacity is shared between tasks"
    )
    schedule: RatioScheduleSpec | None = Field(
        None, description="the ratio over each task's steps (replaces ratio)"
    )
    pseudo: PseudoSpec | None = Field(
        None, description="LAMOL pseudo-replay: generated examples, no real data kept"
    )
    general: DataSpec | None = Field(
        None,
        description="general data (e.g. LIMA, as TRACE replays it) put in the memory at the "
        "stage's start and mixed in from the first task on (its whole training split, or "
        "train_size examples when given)",
    )

    @pydantic.model_validator(mode="after")
    def _pseudo_quota(self) -> ReplaySpec:
        if self.pseudo is not None and self.quota != "equal":
            raise ValueError(
                "replay.pseudo splits the generated examples equally among finished tasks "
                f"(LAMOL); quota must be 'equal', got {self.quota!r}"
            )
        if self.general is not None and self.pseudo is not None:
            raise ValueError("replay.general keeps real examples; pseudo-replay keeps none")
        if self.general is not None and self.general.kind == "preference":
            raise ValueError("replay.general: preference pairs are not replayed")
        return self

    def replay_ratio(self) -> float | Callable[[int], float]:
        if self.schedule:
            return self.schedule.build()
        pseudo = self.pseudo
        if pseudo is not None and "ratio" not in self.model_fields_set and pseudo.per_task is None:
            return pseudo.ratio / (1 + pseudo.ratio)
        return self.ratio

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        bounded = self.pseudo is None or "capacity" in self.model_fields_set
        return ReplayBuffer(self.capacity if bounded else UNBOUNDED, quota=self.quota, seed=seed)

    def hooks(self) -> list[Hook]:
        if self.pseudo is not None:
            return [
                Hook("task_start", generate_pseudo(self.pseudo), "replay (pseudo)"),
                Hook("memory", note_task(self.pseudo), "replay (pseudo)"),
            ]
        hooks = [Hook("memory", remember_task, "replay")]
        if self.quota == "inscl":
            hooks.insert(0, Hook("task_start", _inscl_upcoming, "replay (inscl)"))
        if self.general is not None:  # before inscl's re-split, which weighs it too
            hooks.insert(0, Hook("task_start", remember_general(self.general), "replay (general)"))
        return hooks
