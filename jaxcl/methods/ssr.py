"""SSR (self-synthesized rehearsal; Huang et al., ACL 2024) as a recipe method.

A memory of finished tasks like ``replay``'s (a :class:`~jaxcl.data.replay.ReplayBuffer` mixed
into later batches at ``ratio``), filled with **synthetic** instances instead of real ones:

- ``task_start`` of the stage's first task keeps the base model, the stage's starting parameters,
  as the frozen tree ``stage_start`` (shared with the weight-space methods that keep it too);
- ``memory`` at each task's end: the base model writes new inputs in context from a few of the
  task's own examples, they are clustered and a diverse subset kept, and the current model (the
  one that just finished the task) writes their outputs
  (:func:`jaxcl.data.synthetic.synthesize`); the pairs enter the memory under the task's name,
  with the counts of every step in ``buffer.notes[task]["ssr"]``.

Both generations run through the stage's batched KV-cache ``generate`` tool. The last task of a
stage synthesizes nothing (no later task would rehearse it).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
from pydantic import Field

from jaxcl.data.replay import RatioScheduleSpec, ReplayBuffer
from jaxcl.data.synthetic import MARKERS, Synthesis, synthesize
from jaxcl.data.tokenize import special_ids, token_ids
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase
from jaxcl.methods.weights import store_stage_start

#: the frozen tree holding the base model (the stage's start)
BASE = "stage_start"
#: a memory without a practical bound (each task keeps its ``keep`` instances)
UNBOUNDED = 2**31 - 1


def _is_hf(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "apply_chat_template")


def demonstrations(ctx: Context, n: int) -> list[tuple[str, str]]:
    """The first ``n`` of the task's own encoded rows (its training order: a seeded shuffle),
    decoded back to ``(prompt, response)`` text: the prompt is the row's leading unmasked tokens
    after bos, the response the trained tokens after it, up to eos."""
    tok = ctx.tools["tokenizer"]
    bos, eos, _ = special_ids(tok)
    keep = {"skip_special_tokens": False} if _is_hf(tok) else {}
    out = []
    for row in itertools.islice(iter(ctx.task.examples), n):
        ids = np.asarray(row["tokens"]).tolist()
        mask = np.asarray(row["loss_mask"]) > 0
        start = 1 if bos is not None and ids and ids[0] == bos else 0
        k = start
        while k < len(ids) and not mask[k]:
            k += 1
        j = k
        while j < len(ids) and mask[j] and ids[j] != eos:
            j += 1
        if k > start:
            out.append((tok.decode(ids[start:k], **keep), tok.decode(ids[k:j], **keep)))
    return out


class Writers(NamedTuple):
    """The base model's in-context writer, the latest model's answerer, and the length checks
    (an in-context prompt the model can take; an input that leaves a row room for a response)."""

    write_inputs: Callable[[list[str]], list[str]]
    write_outputs: Callable[[list[str]], list[str]]
    prompt_fits: Callable[[str], bool]
    input_fits: Callable[[str], bool]
    seed: int


def _seed(base: int, task: int, what: str) -> int:
    """A seed per (run seed, task, step) below 2³⁰ (the generate tool adds its batch index)."""
    return zlib.crc32(f"{base}/ssr/{task}/{what}".encode()) >> 2


class SsrSpec(MethodSpecBase):
    """Self-synthesized rehearsal: after each task the base model writes new inputs in context
    from the task's examples, a K-means-diverse subset is kept, the latest model writes their
    outputs, and the pairs are replayed in later tasks (no real example is kept)."""

    name: Literal["ssr"]
    stage_kinds: ClassVar[tuple[str, ...]] = ("instruct",)  # input/output instances only
    ratio: float = Field(0.2, ge=0, le=1, description="fraction of each batch replayed")
    schedule: RatioScheduleSpec | None = Field(
        None, description="the ratio over each task's steps (replaces ratio)"
    )
    capacity: int | None = Field(
        None, ge=1, description="synthetic instances kept over all tasks (default: keep each)"
    )
    shots: int = Field(2, ge=1, description="demonstrations per in-context prompt (reference: 2)")
    pool: int = Field(
        20, ge=1, description="the task's examples the demonstrations come from (reference: 20)"
    )
    prompts: int | None = Field(
        None,
        ge=1,
        description="in-context prompts per task, a seeded sample of the ordered demonstration "
        "tuples (default: all of them, pool·(pool−1) for 2 shots, as the reference)",
    )
    samples: int = Field(3, ge=1, description="sampled continuations per prompt (reference: 3)")
    temperature: float = Field(0.9, ge=0, description="input sampling temperature (reference: 0.9)")
    top_p: float = Field(0.6, gt=0, le=1, description="input nucleus sampling (reference: 0.6)")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens per in-context continuation (default: seq_len plus the markers)",
    )
    keep: int = Field(200, ge=1, description="synthetic instances kept per task (reference: 200)")
    clusters: int = Field(20, ge=1, description="K-means clusters to select from (reference: 20)")
    select: Literal["kmeans", "random"] = Field(
        "kmeans", description="kmeans (SSR) or random (a seeded uniform sample: an ablation)"
    )
    definition: dict[str, str] = Field(
        {}, description="a task definition heading the in-context prompt, per task name"
    )
    markers: tuple[str, str] = Field(
        MARKERS, description="the demonstrations' input and output markers"
    )
    seed: int | None = Field(None, description="synthesis seed (default: the recipe's)")

    def replay_ratio(self) -> float | Callable[[int], float]:
        return self.schedule.build() if self.schedule else self.ratio

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        return ReplayBuffer(self.capacity or UNBOUNDED, quota="equal", seed=seed)

    def hooks(self) -> list[Hook]:
        return [
            Hook("task_start", _check_kind(store_stage_start), "ssr (base model)"),
            Hook("memory", synthesize_task(self), "ssr"),
        ]

    # -- the memory hook's parts ---------------------------------------------------------------
    def writers(self, ctx: Context, carry: Carry) -> Writers:
        """The two models as text functions over the stage's ``generate`` tool: the base model
        (``carry.frozen["stage_start"]``) sampling continuations of in-context prompts, the
        latest one (``carry.state.params``) answering inputs greedily; and the length checks."""
        tools, task = ctx.tools, ctx.task
        tok, seq_len = tools["tokenizer"], int(tools["seq_len"])
        seed = tools.get("seed", 0) if self.seed is None else self.seed
        inp, out = self.markers
        # one whole instance: a row's worth of tokens plus the format's markers
        width = self.max_new_tokens or seq_len + len(token_ids(tok, [f"{inp} \n{out} \n\n"])[0])
        cfg = tools.get("model_config")
        context = getattr(cfg, "max_position_embeddings", None) or 2**31 - 1
        room = context - width  # the longest in-context prompt (bos included) the model takes
        if room < 1:
            raise ValueError(
                f"ssr: max_new_tokens {width} leaves no room for a prompt in the model's "
                f"{context} positions"
            )
        head = 1 if special_ids(tok)[0] is not None else 0
        n_tokens = lambda text: head + len(token_ids(tok, [text])[0])  # noqa: E731
        base, latest = carry.frozen[BASE], carry.state.params

        def write_inputs(prompts: list[str]) -> list[str]:
            return tools["generate"](
                base,
                prompts,
                max_new_tokens=width,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=_seed(seed, task.index, "inputs"),
                max_prompt_tokens=room,
            )

        def write_outputs(inputs: list[str]) -> list[str]:
            shortest = min(n_tokens(x) for x in inputs)
            return tools["generate"](
                latest,
                inputs,
                max_new_tokens=max(seq_len - shortest - 1, 1),  # the rest of a row, less eos
                temperature=0.0,
                seed=_seed(seed, task.index, "outputs"),
            )

        return Writers(
            write_inputs,
            write_outputs,
            prompt_fits=lambda p: n_tokens(p) <= room,
            input_fits=lambda x: n_tokens(x) < seq_len - 1,  # room for a response and eos
            seed=_seed(seed, task.index, "select"),
        )

    def synthesis(self, ctx: Context, carry: Carry) -> Synthesis:
        """SSR's three steps for the finished task (:func:`jaxcl.data.synthetic.synthesize`)."""
        w = self.writers(ctx, carry)
        return synthesize(
            w.write_inputs,
            w.write_outputs,
            demonstrations(ctx, self.pool),
            shots=self.shots,
            prompts=self.prompts,
            samples=self.samples,
            keep=self.keep,
            clusters=self.clusters,
            select=self.select,
            seed=w.seed,
            definition=self.definition.get(ctx.task.name, ""),
            markers=self.markers,
            prompt_fits=w.prompt_fits,
            input_fits=w.input_fits,
        )


def _check_kind(fn: Callable[[Context, Carry], Carry]) -> Callable[[Context, Carry], Carry]:
    def hook(ctx: Context, carry: Carry) -> Carry:
        kind = ctx.tools.get("kind", "instruct")
        if kind != "instruct":
            raise ValueError(
                f"ssr: a stage of kind {kind!r} has no input/output instances to synthesize "
                "(SSR rehearses instruction tasks: kind instruct)"
            )
        return fn(ctx, carry)

    return hook


def synthesize_task(spec: SsrSpec) -> Callable[[Context, Carry], Carry]:
    """Phase ``memory``: the finished task's synthetic instances, encoded by the stage's
    ``encode`` tool, enter the memory (nothing for the stage's last task)."""

    def hook(ctx: Context, carry: Carry) -> Carry:
        task, buf = ctx.task, carry.buffer
        if task.names and task.index == len(task.names) - 1:
            buf.add_task(task.name, [])
            buf.notes[task.name] = {"ssr": {"skipped": "the stage's last task"}}
            return carry
        made = spec.synthesis(ctx, carry)
        rows = ctx.tools["encode"](made.examples) if made.examples else []
        buf.add_task(task.name, rows)
        buf.notes[task.name] = {"ssr": dict(made.stats)}
        return carry

    return hook
