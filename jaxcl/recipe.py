"""Recipes: a YAML file declaring model, mesh, optimizer and the ordered stages.

The recipe is safe-loaded, patched with command-line overrides (``key.path=value``) and
validated by the pydantic schema below before any work starts. Errors name the file, line and
field, and for names (methods, presets, datasets) list the valid choices.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import Field

from jaxcl.data.spec import DataSpec
from jaxcl.eval.scoring import HIGHER_IS_BETTER, check_metric
from jaxcl.methods.specs import MethodSpec, method_names, validate_methods
from jaxcl.models.spec import LoraSpec, ModelSpec
from jaxcl.objectives.chunked import DEFAULT_CHUNK
from jaxcl.objectives.spec import (
    DpoSpec,
    ReferenceSpec,
    TermList,
    check_terms,
    compile_objective,
    term_names,
)
from jaxcl.spec import Strict
from jaxcl.yaml_io import (  # noqa: F401  (part of this module's API)
    RecipeError,
    _e_notation_hint,
    _field_path,
    _line_of,
    apply_overrides,
    check_duplicate_keys,
    expand_env,
    read_yaml,
    set_path,
)

#: Names that become folder names (the run, stages, tasks, ``compare:`` variants): letters,
#: digits, ``_``, ``-`` and ``.``, not starting with ``.`` (no ``/``, ``..``, absolute paths or
#: hidden folders), 1 to 100 characters (docs/recipes.md).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def check_name(value: str) -> str:
    """``value`` if it is a safe folder name (:data:`NAME_PATTERN`), else a ValueError."""
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a usable name: names become folder names, so they take letters, "
            "digits, _, - and . (not first), 1 to 100 characters"
        )
    return value


Name = Annotated[str, pydantic.AfterValidator(check_name)]


class MeshSpec(Strict):
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


class OptimizerSpec(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    rewarm: Literal["stage", "task"] = Field(
        "stage", description="restart warm-up and decay at each stage, or at each task"
    )
    moments: Literal["stage", "task"] = Field(
        "stage",
        description="AdamW's moments start afresh at each stage, or at each task (a fresh "
        "optimizer per task, as O-LoRA's scripts); the schedule and CL state carry on",
    )
    end_lr_factor: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    clip_norm: float | None = Field(1.0, gt=0)


METRIC_HELP = (
    "perplexity, exact_match, pref_accuracy, multiple_choice, multiple_choice_norm, rouge_l, "
    "or a custom scorer package.module:function (docs/metrics.md)"
)


#: what a task's ``optimizer:`` may override (the schedule; the chain itself is the stage's)
TASK_OPTIMIZER_FIELDS = ("lr", "warmup_steps", "schedule", "end_lr_factor")


class TaskSpec(Strict):
    name: Name
    data: DataSpec
    metric: str | None = Field(
        None, description=f"how the task is scored (default: the stage's metric): {METRIC_HELP}"
    )
    steps: int | None = Field(None, ge=1, description="this task's steps (default: the stage's)")
    epochs: float | None = Field(
        None, gt=0, description="train on this many passes over the task's documents"
    )
    tokens: int | None = Field(
        None, ge=1, description="train on this many input tokens (steps × batch × seq_len)"
    )
    optimizer: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the stage's learning-rate schedule for this task: "
        + ", ".join(TASK_OPTIMIZER_FIELDS),
    )

    @pydantic.model_validator(mode="after")
    def _one_budget(self) -> TaskSpec:
        given = [k for k in ("steps", "epochs", "tokens") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of steps, epochs or tokens, got {given}")
        return self

    @pydantic.field_validator("optimizer")
    @classmethod
    def _task_optimizer(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - set(TASK_OPTIMIZER_FIELDS)
        if unknown:
            raise ValueError(
                f"{', '.join(sorted(unknown))} cannot change per task; a task may "
                f"override {', '.join(TASK_OPTIMIZER_FIELDS)} (the rest is the stage's)"
            )
        return _check_optimizer(value)

    @pydantic.field_validator("metric")
    @classmethod
    def _known_metric(cls, value: Any, info: pydantic.ValidationInfo) -> str | None:
        if value is None:
            return None
        data = info.data.get("data")
        return check_metric(value, data.kind if data is not None else None)

    @pydantic.model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in ("metric", "steps", "epochs", "tokens"):  # unset: dumps as before
            if getattr(self, key) is None:
                data.pop(key, None)
        if not self.optimizer:
            data.pop("optimizer", None)
        return data


STAGE_DATA_KIND = {"pretrain": "text", "instruct": "instruction", "align": "preference"}
STAGE_METRIC = {"pretrain": "perplexity", "instruct": "exact_match", "align": "pref_accuracy"}


def _check_optimizer(overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate optimizer overrides; a ValidationError raised here keeps its field's location
    under the ``optimizer`` field (``stages[0].optimizer.lr``)."""
    OptimizerSpec(**overrides)
    return overrides


class StageSpec(Strict):
    name: Name
    kind: Literal["pretrain", "instruct", "align"]
    tasks: list[TaskSpec] = Field(min_length=1)
    methods: list[MethodSpec] = []
    steps_per_task: int = Field(ge=1, description="steps of a task that gives no budget")
    packing: Literal["none", "concat", "segments"] | None = Field(
        None,
        description="how documents become rows: concat (joined with eos, cut into rows; no "
        "token dropped; default of pretrain stages), segments (whole documents per row, "
        "attention kept inside each), none (one truncated row per document; default otherwise)",
    )
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=8)
    eval_batch_size: int = Field(64, ge=1)
    metric: str | None = Field(
        None,
        description="the metric of tasks that name none (default: perplexity, exact_match or "
        f"pref_accuracy by kind): {METRIC_HELP}. After validation, `stage.metric` is the "
        "stage-level name: its tasks' metrics, joined by + when they differ",
    )
    eval_max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens generated per eval prompt for rouge_l and custom scorers "
        "(default: the task's longest reference response + 1)",
    )
    _given_metric: str | None = pydantic.PrivateAttr(None)
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per step (batch_size must divide by it)"
    )
    loss_chunk: int = Field(
        DEFAULT_CHUNK,
        ge=0,
        description="sequence positions per logits chunk in the losses (the [batch, chunk, "
        "vocab] logits are computed, and recomputed in the backward pass, one chunk at a "
        "time); 0: the whole [batch, seq_len, vocab] logits at once",
    )
    optimizer: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the recipe's optimizer for this stage"
    )
    dpo: DpoSpec = DpoSpec()
    terms: TermList = Field(
        default_factory=list,
        description="the objective as weighted terms (lm, dpo, orpo, cppo, kl, distill); "
        "default: lm, or dpo (from `dpo`) in align stages",
    )
    reference: ReferenceSpec = ReferenceSpec()
    lora: LoraSpec | None = Field(
        None, description="train low-rank adapters on fixed base weights (see docs/methods.md)"
    )

    @pydantic.model_validator(mode="after")
    def _objective(self) -> StageSpec:
        check_terms(
            self.kind,
            list(self.terms),
            self.reference,
            "dpo" in self.model_fields_set,
            self.methods,
        )
        return self

    @pydantic.field_validator("optimizer")
    @classmethod
    def _stage_optimizer(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_optimizer(value)  # an unknown or mistyped override fails here

    def build_objective(self, apply: Any) -> Any:
        """The stage's :class:`~jaxcl.objectives.bound.Objective` for model ``apply``."""
        return compile_objective(
            self.kind,
            self.terms,
            self.reference,
            self.dpo,
            apply,
            self.methods,
            self.loss_chunk,
        )

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"grad_accum ({self.grad_accum})"
            )
        want = STAGE_DATA_KIND[self.kind]
        for i, task in enumerate(self.tasks):
            got = task.data.kind
            if got != want:
                raise ValueError(
                    f"tasks[{i}] ({task.name}): its dataset holds {got} "
                    f"examples, but a {self.kind} stage needs {want} examples"
                )
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique within a stage, got {names}")
        validate_methods(self.methods)
        for i, method in enumerate(self.methods):
            kinds = method.stage_kinds
            if kinds is not None and self.kind not in kinds:
                raise ValueError(
                    f"methods[{i}] ({method.name}): serves stages of kind {' or '.join(kinds)}, "
                    f"this stage is {self.kind}"
                )
            try:
                method.check_stage(n_tasks=len(self.tasks), lora=self.lora)
            except ValueError as err:
                raise ValueError(f"methods[{i}] ({method.name}): {err}") from None
        if self.kind == "align" and self.packing not in (None, "none"):
            raise ValueError(
                f"packing: {self.packing} packs documents; preference pairs (align stages) "
                "take packing: none"
            )
        return self

    @property
    def row_packing(self) -> str:
        """The packing in force: the given one, else concat for pretraining, else none."""
        return self.packing or ("concat" if self.kind == "pretrain" else "none")

    @pydantic.field_validator("metric")
    @classmethod
    def _known_metric(cls, value: Any) -> str | None:
        return None if value is None else check_metric(value)

    @property
    def task_metrics(self) -> list[str]:
        """Each task's metric: its own, else the stage's ``metric``, else the kind's default."""
        default = self._given_metric or STAGE_METRIC[self.kind]
        return [task.metric or default for task in self.tasks]

    @pydantic.model_validator(mode="after")
    def _metrics(self) -> StageSpec:
        given = self.metric
        if given is not None:
            try:
                check_metric(given, STAGE_DATA_KIND[self.kind])
            except ValueError as err:
                raise ValueError(f"metric: {err}") from None
        self._given_metric = given
        metrics = self.task_metrics
        higher = [HIGHER_IS_BETTER[m] for m in metrics]
        if len(set(higher)) > 1:
            i, j = higher.index(True), higher.index(False)
            raise ValueError(
                f"tasks[{i}] ({self.tasks[i].name}) is scored by {metrics[i]} (higher is better) "
                f"and tasks[{j}] ({self.tasks[j].name}) by {metrics[j]} (lower is better); the "
                "R matrix of one stage needs one direction: put them in separate stages"
            )
        # The stage-level name (results, report): its tasks' metrics, + joined when they differ.
        object.__setattr__(self, "metric", "+".join(dict.fromkeys(metrics)))
        return self

    @pydantic.model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        data.pop("metric", None)  # the stage-level name; the recipe holds what was given
        if self._given_metric is not None:
            data["metric"] = self._given_metric
        if self.eval_max_new_tokens is None:
            data.pop("eval_max_new_tokens", None)
        if "dpo" not in self.model_fields_set:  # a default `dpo:` must not read as given (terms)
            data.pop("dpo", None)
        if self.lora is None:
            data.pop("lora", None)
        if self.packing is None:
            data.pop("packing", None)
        return data

    def method(self, name: str) -> Any:
        return next((m for m in self.methods if m.name == name), None)


class LmEvalProbes(Strict):
    """lm-evaluation-harness tasks standing for the survey's three probe suites: each suite's
    score R^G / R^I / R^S is the mean of its tasks' main metric (the first of ``metrics``
    that the task reports), scored before the first stage and after every stage."""

    general: list[str] = Field(default_factory=list, description="tasks for R^G")
    instruction: list[str] = Field(default_factory=list, description="tasks for R^I")
    safety: list[str] = Field(default_factory=list, description="tasks for R^S")
    limit: int | None = Field(None, ge=1, description="documents per task (all when null)")
    include_path: str | None = Field(None, description="a folder of local task YAMLs")
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    metrics: list[str] = Field(
        default_factory=lambda: ["acc_norm", "acc", "exact_match", "rouge_l", "f1"],
        min_length=1,
        description="the metric each task is scored by: the first of these it reports",
    )

    @pydantic.model_validator(mode="after")
    def _some_task(self) -> LmEvalProbes:
        if not (self.general or self.instruction or self.safety):
            raise ValueError("lm_eval probes name no task: give general, instruction or safety")
        return self

    def suites(self) -> dict[str, list[str]]:
        named = {"general": self.general, "instruction": self.instruction, "safety": self.safety}
        return {suite: tasks for suite, tasks in named.items() if tasks}


class ProbeSpec(Strict):
    """Which probes score the model around every stage: the built-in suites (``builtin``),
    and lm-eval tasks that replace the built-in score of the suites they name."""

    builtin: bool = True
    lm_eval: LmEvalProbes | None = None

    @pydantic.model_validator(mode="after")
    def _scores_something(self) -> ProbeSpec:
        if not self.builtin and self.lm_eval is None:
            raise ValueError(
                "probes score nothing (builtin: false, no lm_eval); write probes: false"
            )
        return self


class Recipe(Strict):
    name: Name
    out_dir: str
    seed: int = 0
    model: ModelSpec = ModelSpec()
    mesh: MeshSpec = MeshSpec()
    rules: list[tuple[str, str | list[str] | None]] | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    log_every: int = Field(10, ge=1)
    stall_steps: int = Field(
        25,
        ge=0,
        description="stop the run when, for this many consecutive steps of a task, the "
        "gradient norm is zero or a token loss stays at ln V (no signal); 0 turns it off",
    )
    probes: bool | ProbeSpec = Field(
        True,
        description="score the general/instruction/safety probe suites around every stage: "
        "true (the built-in suites), false, or a mapping with lm-eval suites",
    )
    peak_flops_per_device: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device, to log model FLOPs utilisation"
    )
    compile_cache: bool | str = Field(
        True,
        description="persistent XLA compilation cache: true (the user's cache dir, "
        "~/.cache/jaxcl/xla or $JAXCL_CACHE_DIR/xla), 'run' (the run folder's xla_cache), "
        "a folder, or false",
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N steps inside tasks (for resumption)"
    )
    stages: list[StageSpec] = Field(min_length=1)
    compare: dict[Name, dict[str, Any]] = Field(
        default_factory=dict,
        description="variants run after this recipe: name -> {key.path: value} overrides",
    )

    @pydantic.model_validator(mode="after")
    def _variants_validate(self) -> Recipe:
        for name in self.compare:
            try:
                self.variant(name)
            except RecipeError as err:
                raise ValueError(str(err).replace("invalid recipe\n  ", "")) from None
        return self

    def variant(self, name: str) -> Recipe:
        """The recipe with variant ``name``'s overrides applied, run into ``OUT/compare/NAME``."""
        raw = self.model_dump(mode="json", exclude={"compare"})
        raw["out_dir"] = str(Path(self.out_dir) / "compare" / name)
        for path, value in self.compare[name].items():
            set_path(raw, path, value, f"compare.{name}.{path}")
        return validate(raw, source=f"compare.{name}")

    @pydantic.model_validator(mode="after")
    def _bind_model(self) -> Recipe:
        """Methods that depend on the model's shape (``bind_model``) read it from ``model``."""
        for i, stage in enumerate(self.stages):
            for j, method in enumerate(stage.methods):
                bind = getattr(method, "bind_model", None)
                if bind is None:
                    continue
                try:
                    stage.methods[j] = bind(self.model)
                    # checked again once bound: a stage may not fit the model (sapt's blocks)
                    stage.methods[j].check_stage(n_tasks=len(stage.tasks), lora=stage.lora)
                except ValueError as err:
                    raise ValueError(f"stages[{i}].methods[{j}] ({method.name}): {err}") from None
        return self

    @pydantic.model_validator(mode="after")
    def _prompts_fit(self) -> Recipe:
        """A model with soft prompts (``model.prompts``): its stages, lengths and metrics fit."""
        if self.model.prompts is not None:
            from jaxcl.methods.prompts import check_recipe

            check_recipe(self)
        return self

    @pydantic.model_validator(mode="after")
    def _unique_stages(self) -> Recipe:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def stage_optimizer(self, stage: StageSpec) -> OptimizerSpec:
        return self.optimizer.model_copy(
            update=OptimizerSpec(**stage.optimizer).model_dump(include=set(stage.optimizer))
        )

    def task_optimizer(self, stage: StageSpec, task: TaskSpec) -> OptimizerSpec:
        """The stage's optimizer with ``task``'s schedule overrides."""
        base = self.stage_optimizer(stage)
        return base.model_copy(
            update=OptimizerSpec(**task.optimizer).model_dump(include=set(task.optimizer))
        )

    def fingerprint(self, stages: int | None = None) -> str:
        """sha256 of what determines the run's results: the validated recipe (overrides applied)
        without where it is stored and how it is laid out on devices (``out_dir``, ``mesh``,
        ``rules``, ``checkpoint_every``), so a run can resume on another mesh or folder.
        ``stages=k``: of the run's first ``k`` stages only (what two recipes share)."""
        placement = {
            *("out_dir", "mesh", "rules", "checkpoint_every", "stall_steps", "compare"),
            "compile_cache",  # where compiled programs are kept changes no result
        }
        raw = self.model_dump(mode="json", exclude=placement)
        if stages is not None:
            raw["stages"] = raw["stages"][:stages]
        canonical = json.dumps(raw, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def shared_stages(self, other: Recipe) -> int:
        """How many leading stages ``other`` runs exactly as this recipe does."""
        k = 0
        while k < min(len(self.stages), len(other.stages)) and self.fingerprint(
            k + 1
        ) == other.fingerprint(k + 1):
            k += 1
        return k


# ----------------------------------------------------------------------------- loading


def _describe(error: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """Field location (the discriminator tag of unions dropped) and a message for one error."""
    loc = tuple(error["loc"])
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "union_tag_invalid":
        return loc + ("name",), (
            f"unknown method {ctx['tag']!r}; valid choices: {ctx['expected_tags']}".replace("'", "")
        )
    if kind == "union_tag_not_found":
        return loc, "a method needs a 'name'"
    if loc and loc[-1] == "[key]":  # a mapping key (a compare: variant's name): its mapping
        loc = loc[:-2]
    if kind == "int_parsing" and isinstance(error.get("input"), str):
        hint = _e_notation_hint(error["input"])
        if hint:
            return _drop_tags(loc), hint
    message = error["msg"].removeprefix("Value error, ")
    return _drop_tags(loc), message


def _drop_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Discriminated unions add their tag to the location (methods[0].ewc.lam,
    data.source.jsonl.train): drop it, so the path reads like the YAML."""
    tags = set(method_names()) | set(term_names())
    return tuple(  # a tag follows a list index (model.sapt.tasks is a field path, kept)
        k
        for i, k in enumerate(loc)
        if not (k in tags and i and isinstance(loc[i - 1], int))
        and not (i and loc[i - 1] == "source")
    )


def validate(raw: Any, *, source: str = "<recipe>", yaml_root: yaml.Node | None = None) -> Recipe:
    """Validate a raw mapping; every problem is reported with its field (and line)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except pydantic.ValidationError as err:
        lines = []
        for error in err.errors():
            loc, message = _describe(error)
            line = _line_of(yaml_root, loc)
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: {_field_path(loc)}: {message}")
        raise RecipeError("invalid recipe\n  " + "\n  ".join(lines)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Safe-load ``path``, apply ``overrides`` and validate."""
    path = Path(path)
    raw, root = read_yaml(path, what="recipe", error=RecipeError)
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
        raw = expand_env(raw, str(path))
    return validate(raw, source=str(path), yaml_root=root)
