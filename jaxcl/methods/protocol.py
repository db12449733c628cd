"""The task-boundary protocol: what a method declares, and the one order the stage loop runs it in.

A recipe method is a :class:`MethodSpecBase`. Besides its optax transform it declares **hooks**:
small functions of the run's carried state (:class:`Carry`) that the stage loop calls at fixed
points, without knowing which method they belong to. The loop over one task is::

    carry = run(hooks "task_start")                 # frozen copies, pseudo-examples, views
    for k in range(steps):
        carry.state = train_step(carry.state, batch_k)
        carry = run(hooks "step" whose when(k, steps) holds)   # EMA, PackNet's prune
    R[t] = score every task i on eval_view(carry, i)        # PackNet's masks, EMA's average
    estimates = ∪ spec.estimates(ctx, carry)                # Fisher, importance, covariances
    carry.state.opt_state = consolidate(opt_state, params, **estimates)
    carry = run(hooks "fold")      # LoRA folded into W, a fresh adapter drawn
    carry = run(hooks "renew")     # optimizer moments restarted
    carry = run(hooks "memory")    # examples of the finished task kept (replay, A-GEM)
    carry = run(hooks "merge")     # weight averaging, task arithmetic, elastic reset
    checkpoint

Hooks of one phase run in recipe order. Contributors are the stage's methods and the stage's
own features (its objective's frozen trees, LoRA adapters, the optimizer's moments), all through
the same :class:`Hook` type, so adding a method is one spec, its transform and its docs row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import optax
from pydantic import Field, model_validator

from jaxcl.methods.compose import Position
from jaxcl.methods.storage import BUFFER_DTYPES
from jaxcl.objectives.bound import row_inputs
from jaxcl.spec import Strict

Phase = Literal["task_start", "step", "fold", "renew", "memory", "merge"]
#: the order of the phases after a task's last step (estimates and consolidate come first)
END_PHASES: tuple[Phase, ...] = ("fold", "renew", "memory", "merge")
PHASES: tuple[Phase, ...] = ("task_start", "step", *END_PHASES)


class Carry(NamedTuple):
    """What hooks read and replace: the train state (``step``, ``params``, ``opt_state``), the
    named frozen trees (kept in every checkpoint: a DPO reference, a task-start copy, an EMA) and
    the memory of finished tasks (a :class:`jaxcl.data.replay.ReplayBuffer` or None)."""

    state: Any
    frozen: dict[str, Any]
    buffer: Any


@dataclass(frozen=True)
class TaskInfo:
    """The task a hook runs for: its 0-based ``index`` in the stage, name, step budget, its own
    encoded training examples and their prompts (or texts), and every task's name in order."""

    index: int
    name: str
    steps: int
    examples: Sequence[dict[str, Any]]
    instructions: Sequence[str]
    names: Sequence[str] = ()


@dataclass(frozen=True)
class Context:
    """What a hook or an estimator may use besides the carry.

    ``loss_fn(trainable, batch)`` is the stage's objective on the trainable part of the
    parameters (LoRA: the adapters; the fixed rest bound), ``apply(trainable, input_ids)`` the
    model, ``split``/``join`` the trainable/fixed partition of the full tree. ``batches(n)``
    yields ``n`` batches of the task's **own** examples (no replay rows), placed on the mesh, of
    the stage's batch size; ``examples(n)`` the same examples unbatched. ``tools`` holds what a
    stage provides for hooks that need more (``generate``, ``tokenizer``, ``seed``, ``kind``).
    """

    task: TaskInfo
    loss_fn: Callable[[Any, Any], Any]
    apply: Callable[[Any, Any], Any]
    split: Callable[[Any], tuple[Any, Any]]
    join: Callable[[Any, Any], Any]
    batches: Callable[[int], Iterator[Any]]
    tools: dict[str, Any] = field(default_factory=dict)

    def trainable(self, carry: Carry) -> Any:
        return self.split(carry.state.params)[0]


HookFn = Callable[[Context, Carry], Carry]


@dataclass(frozen=True)
class Hook:
    """``fn(ctx, carry) -> carry`` run in ``phase``; a ``step`` hook runs after step ``k`` (0-based)
    of a task of ``steps`` steps when ``when(k, steps)`` holds (every step if None). ``name`` says
    who declared it (logs and errors)."""

    phase: Phase
    fn: HookFn
    name: str = ""
    when: Callable[[int, int], bool] | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"hook {self.name!r}: unknown phase {self.phase!r}; one of {PHASES}")


def run_hooks(hooks: Sequence[Hook], phase: Phase, ctx: Context, carry: Carry) -> Carry:
    """Run the hooks of ``phase`` in order, threading the carry."""
    for hook in hooks:
        if hook.phase == phase:
            carry = hook.fn(ctx, carry)
    return carry


def run_step_hooks(hooks: Sequence[Hook], k: int, ctx: Context, carry: Carry) -> Carry:
    """The ``step`` hooks due after step ``k`` of the task."""
    for hook in hooks:
        if hook.phase == "step" and (hook.when is None or hook.when(k, ctx.task.steps)):
            carry = hook.fn(ctx, carry)
    return carry


EvalView = Callable[[Any, Carry, int], Any]


def compose_views(views: Sequence[EvalView]) -> EvalView | None:
    """One view from several (applied in order), None when there are none: ``view(params,
    carry, i)`` gives the parameters task ``i`` is scored with."""
    if not views:
        return None

    def view(params: Any, carry: Carry, i: int) -> Any:
        for v in views:
            params = v(params, carry, i)
        return params

    return view


def compose_eval_apply(methods: Sequence[Any], apply: Callable[..., Any]) -> Callable | None:
    """The scoring function the methods' :meth:`MethodSpecBase.eval_apply` wrap around
    ``apply`` (in recipe order), None when no method supplies one."""
    out = None
    for method in methods:
        wrapped = method.eval_apply(apply if out is None else out)
        out = wrapped if wrapped is not None else out
    return out


def with_state(carry: Carry, **fields: Any) -> Carry:
    """The carry with ``state`` fields (``params``, ``opt_state``) replaced."""
    return carry._replace(state=carry.state._replace(**fields))


def with_frozen(carry: Carry, **trees: Any) -> Carry:
    return carry._replace(frozen={**carry.frozen, **trees})


def copy_tree(tree: Any) -> Any:
    """A separate copy (never donated with the train state)."""
    return jax.tree.map(lambda x: x.copy(), tree)


class MethodSpecBase(Strict):
    """A recipe method. Subclass it with a ``name: Literal[...]`` field, implement what applies,
    and list it in :data:`jaxcl.methods.specs.METHOD_SPECS` and its union."""

    name: str
    buffer_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="dtype the method's buffers (anchors, importances, masks) are stored in "
        "between steps; its arithmetic runs in its own dtypes (None: those)",
    )
    #: the storage dtypes ``buffer_dtype`` may name for this method
    buffer_dtypes: ClassVar[tuple[str, ...]] = BUFFER_DTYPES
    #: why a storage dtype is refused (said in the error)
    buffer_dtype_reason: ClassVar[str] = ""
    #: where the transform stands: in front of the base optimizer (gradients) or behind it
    position: ClassVar[Position] = "front"
    #: whether its state describes the trained tree itself (anchors, importances, bases, masks):
    #: such a method has no meaning on per-task LoRA adapters, which are folded and replaced
    describes_weights: ClassVar[bool] = False
    #: whether it merges whole weight trees (a linear merge of LoRA's A and B is not a merge of
    #: the effective weights W + A·B): refused on LoRA stages
    needs_full_weights: ClassVar[bool] = False
    #: the stage kinds (``pretrain``, ``instruct``, ``align``) it serves; None: every kind
    stage_kinds: ClassVar[tuple[str, ...] | None] = None

    @model_validator(mode="after")
    def _storable(self) -> MethodSpecBase:
        if self.buffer_dtype is not None and self.buffer_dtype not in self.buffer_dtypes:
            raise ValueError(
                f"buffer_dtype {self.buffer_dtype!r}: {self.name} keeps its buffers in "
                f"{' or '.join(self.buffer_dtypes)} only"
                + (f" ({self.buffer_dtype_reason})" if self.buffer_dtype_reason else "")
            )
        return self

    def place(self) -> Position:
        """Where the transform stands (an option may move it; default: :attr:`position`)."""
        return self.position

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        """Refuse, with a ``ValueError`` naming the field, a stage this method cannot serve
        (``n_tasks`` tasks; ``lora`` the stage's adapter spec or None). Run at validation;
        overrides call this one too."""
        if lora is not None and self.needs_full_weights:
            raise ValueError(
                "merges whole weight trees, but this stage trains LoRA adapters (a merge of A "
                f"and B is not a merge of W + A·B): drop lora or {self.name}"
            )
        if lora is not None and lora.per_task and self.describes_weights:
            raise ValueError(
                "keeps anchors, importances, bases or masks of the trained tree, but "
                "lora.per_task folds each task's adapter into the base and draws a fresh one, so "
                f"that state would describe an adapter that no longer exists: drop lora.per_task "
                f"or {self.name}"
            )

    def transform(
        self,
        *,
        learning_rate: optax.ScalarOrSchedule | None = None,
        weight_decay: float = 0.0,
    ) -> optax.GradientTransformationExtraArgs | None:
        """The gradient-side transform; ``learning_rate`` and ``weight_decay`` are the base
        optimizer's (AdamW's schedule and decoupled decay)."""
        return None

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        """Keyword arguments for :func:`jaxcl.methods.consolidate` at the end of a task."""
        return {}

    def hooks(self) -> list[Hook]:
        """What it does at task starts, steps and task ends, besides consolidate."""
        return []

    def eval_view(self) -> EvalView | None:
        """``view(params, carry, i)``: the parameters task ``i`` is scored with (None: as is)."""
        return None

    def eval_apply(self, apply: Callable[..., Any]) -> Callable[..., Any] | None:
        """The function teacher-forced scores are computed with, wrapped around the model's
        ``apply(params, inputs) -> logits``: ``f(params, inputs) -> [B, T, V]`` logits or
        log-probabilities (e.g. a mixture over experts); params come from the eval view.
        None: the model's own."""
        return None

    def objective_terms(self, reference: Any) -> list[Any]:
        """Weighted terms (:class:`jaxcl.objectives.terms.Term`) it adds to the stage's
        objective, given the stage's ``ReferenceSpec``; a stage whose methods add terms and
        that lists no ``terms`` of its own trains those alone (no default ``lm``/``dpo``)."""
        return []

    def new_memory(self, *, seed: int, n_tasks: int) -> Any:
        """The memory of finished tasks this method fills (a ReplayBuffer), or None."""
        return None

    def replay_ratio(self) -> float | Callable[[int], float]:
        """Share of each training batch drawn from the memory (0: none mixed in)."""
        return 0.0

    @property
    def needs_memory_grads(self) -> bool:
        """Whether the chain needs ``memory_grads`` (the gradient on a memory batch) each step."""
        return False

    @property
    def memory_grads_per_task(self) -> bool:
        """With :attr:`needs_memory_grads`: one memory gradient per earlier task (leaves
        stacked ``[tasks, *leaf.shape]``, each from a batch of that task's memory) instead of
        one on a batch of the whole memory."""
        return False


# ----------------------------------------------------------------------------- helpers


def model_inputs(batch: dict[str, Any]) -> Any:
    """The token ids a batch feeds the model (LM: ``tokens[:, :-1]``; preference: both
    responses)."""
    if "tokens" in batch:
        return row_inputs(batch)
    if "chosen_tokens" in batch:
        tokens = jax.numpy.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
        return tokens[:, :-1]
    raise ValueError(f"cannot find model inputs in a batch with keys {sorted(batch)}")


def output_fn(ctx: Context) -> Callable[[Any, Any], Any]:
    """``f(trainable, batch)``: the model's logits on a batch."""
    return lambda params, batch: ctx.apply(params, model_inputs(batch))


def kernel_select(include: str | None, exclude: str | None) -> Callable[[str, Any], bool]:
    """Kernels (``ndim >= 2``) whose path matches ``include`` (all if None) and not ``exclude``."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None

    def select(path: str, leaf: Any) -> bool:
        if getattr(leaf, "ndim", 0) < 2:
            return False
        return (inc is None or bool(inc.search(path))) and not (exc and exc.search(path))

    return select


__all__ = [
    "END_PHASES",
    "PHASES",
    "Carry",
    "Context",
    "EvalView",
    "Hook",
    "MethodSpecBase",
    "TaskInfo",
    "compose_eval_apply",
    "compose_views",
    "copy_tree",
    "kernel_select",
    "model_inputs",
    "output_fn",
    "run_hooks",
    "run_step_hooks",
    "with_frozen",
    "with_state",
]
