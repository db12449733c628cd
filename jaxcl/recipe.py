"""Recipes: a YAML file declaring model, mesh, optimizer and the ordered stages.

The recipe is safe-loaded, patched with command-line overrides (``key.path=value``) and
validated by the pydantic schema below before any work starts. Errors name the file, line and
field, and for names (methods, presets, datasets) list the valid choices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import optax
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from jaxcl.data.benchmarks import GENERATORS
from jaxcl.data.benchmarks import kind_of as bundled_kind
from jaxcl.methods import ewc, l2_anchor
from jaxcl.models.config import PRESETS
from jaxcl.objectives import DPO_KINDS


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the culprit."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- methods


class EwcSpec(_Strict):
    name: Literal["ewc"]
    lam: float = Field(100.0, ge=0)
    decay: float = Field(1.0, ge=0, le=1)
    fisher_batches: int = Field(8, ge=1, description="batches of the task for the Fisher")

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return ewc(self.lam, decay=self.decay)


class L2AnchorSpec(_Strict):
    name: Literal["l2_anchor"]
    lam: float = Field(1.0, ge=0)

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return l2_anchor(self.lam)


class ReplaySpec(_Strict):
    name: Literal["replay"]
    ratio: float = Field(0.2, ge=0, le=1, description="fraction of each batch replayed")
    per_task: int = Field(256, ge=1, description="examples kept from each finished task")

    def transform(self) -> None:
        return None


MethodSpec = Annotated[EwcSpec | L2AnchorSpec | ReplaySpec, Field(discriminator="name")]


# ----------------------------------------------------------------------------- the rest


class ModelSpec(_Strict):
    preset: str = "tiny"

    @pydantic.field_validator("preset")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; valid choices: {', '.join(PRESETS)}")
        return value


class MeshSpec(_Strict):
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


class OptimizerSpec(_Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    end_lr_factor: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    clip_norm: float | None = Field(1.0, gt=0)


class DataSpec(_Strict):
    bundled: str
    train_size: int = Field(512, ge=1)
    eval_size: int = Field(64, ge=1)
    seed: int = 0

    @pydantic.field_validator("bundled")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in GENERATORS:
            raise ValueError(
                f"unknown bundled dataset {value!r}; valid choices: {', '.join(GENERATORS)}"
            )
        return value


class TaskSpec(_Strict):
    name: str
    data: DataSpec


class DpoSpec(_Strict):
    beta: float = Field(0.1, gt=0)
    kind: Literal[DPO_KINDS] = "sigmoid"  # type: ignore[valid-type]
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


STAGE_DATA_KIND = {"pretrain": "text", "instruct": "instruction", "align": "preference"}
STAGE_METRIC = {"pretrain": "perplexity", "instruct": "exact_match", "align": "pref_accuracy"}


class StageSpec(_Strict):
    name: str
    kind: Literal["pretrain", "instruct", "align"]
    tasks: list[TaskSpec] = Field(min_length=1)
    methods: list[MethodSpec] = []
    steps_per_task: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=8)
    eval_batch_size: int = Field(64, ge=1)
    optimizer: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the recipe's optimizer for this stage"
    )
    dpo: DpoSpec = DpoSpec()

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        want = STAGE_DATA_KIND[self.kind]
        for i, task in enumerate(self.tasks):
            got = bundled_kind(task.data.bundled)
            if got != want:
                raise ValueError(
                    f"tasks[{i}] ({task.name}): dataset {task.data.bundled!r} holds {got} "
                    f"examples, but a {self.kind} stage needs {want} examples"
                )
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique within a stage, got {names}")
        methods = [m.name for m in self.methods]
        if len(set(methods)) != len(methods):
            raise ValueError(f"a method may appear once per stage, got {methods}")
        OptimizerSpec(**self.optimizer)  # an unknown or mistyped override fails here
        return self

    @property
    def metric(self) -> str:
        return STAGE_METRIC[self.kind]

    def method(self, name: str) -> Any:
        return next((m for m in self.methods if m.name == name), None)


class Recipe(_Strict):
    name: str
    out_dir: str
    seed: int = 0
    model: ModelSpec = ModelSpec()
    mesh: MeshSpec = MeshSpec()
    rules: list[tuple[str, str | list[str] | None]] | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    log_every: int = Field(10, ge=1)
    stages: list[StageSpec] = Field(min_length=1)

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

    def fingerprint(self) -> str:
        """sha256 of the validated recipe (overrides applied), for checkpoint manifests."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# ----------------------------------------------------------------------------- loading


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.path=value`` pairs (values parsed as YAML; list indices as numbers)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key.path=value")
        path, text = item.split("=", 1)
        keys = path.split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({err})") from None
        node: Any = raw
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(
                        f"override {item!r}: {'.'.join(keys[:depth]) or 'recipe'} is a list of "
                        f"{len(node)}; {key!r} is not an index of it"
                    )
                key = int(key)
            elif not isinstance(node, dict):
                raise RecipeError(
                    f"override {item!r}: {'.'.join(keys[:depth])} is not a mapping or list"
                )
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                node = node[key]
    return raw


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (the field, or its parent)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or "recipe"


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
    methods = {"ewc", "l2_anchor", "replay"}
    loc = tuple(k for k in loc if k not in methods)
    message = error["msg"].removeprefix("Value error, ")
    return loc, message


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
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    return validate(raw, source=str(path), yaml_root=root)
