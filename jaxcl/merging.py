"""``jaxcl merge CONFIG``: merge HF directories and jaxcl checkpoints one tensor at a time.

The config (YAML, safe-loaded, validated; errors name the field)::

    method: ties                 # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp
    base: /models/base           # HF directory or checkpoint step folder (all but linear)
    models:
      - {source: /models/math, weight: 1.0}
      - {source: /models/code, weight: 1.0}
    parameters: {density: 0.2, lam: 1.0}
    seed: 0                      # DARE's masks
    out: /models/merged          # an HF directory (format: hf) or a run-like folder (checkpoint)
    dtype: bfloat16              # of the written tensors (default: each tensor's base dtype)
    mesh: {data: 1, fsdp: 4, tensor: 2}   # optional: shard every tensor as a recipe would

:func:`merge_sources` reads the tensors' shapes from every input's metadata, refuses inputs of
other shapes or other tokenizers before reading any weight, then, tensor by tensor, reads that
tensor from each input (``safetensors.safe_open``; an Orbax partial restore of that one leaf for
a checkpoint), places it (with a ``mesh``: sharded by its parameter's logical axis names and the
``rules``), merges it with :func:`jaxcl.methods.merge.merge_leaf` and keeps it, gathered to the
host, until its output shard is written. TIES with ``scope: model`` (the default, the paper's)
first reads each model's task vector once, tensor by tensor, into one float32 buffer of its
magnitudes to find that task's threshold (:func:`jaxcl.merge_io.model_cuts`), then trims every
tensor against it. Peak host memory: one output shard (``shard_gb``, 5 GB by default; the whole
model for ``format: checkpoint``) plus, per input, one tensor (a checkpoint saved with
``scan_layers``: one stacked ``[L, ...]`` tensor), and for TIES' first pass one float32 copy of
the model; per device, one tensor (its shard, on a mesh) per input and the merged one.
Everything is written into a temporary folder beside ``out`` and renamed to ``out`` when
complete. Reading, checking, placing and writing live in
:mod:`jaxcl.merge_io`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import Field

from jaxcl.merge_io import (
    MergeError,
    Placement,
    Streamer,
    check_shapes,
    check_tokenizers,
    entries,
    model_cuts,
    open_input,
    write_checkpoint,
    write_hf,
)
from jaxcl.methods.merge import NEEDS_BASE, MergeMethod
from jaxcl.parallel import MESH_AXES, resolve_mesh_shape
from jaxcl.recipe import MeshSpec
from jaxcl.spec import Strict
from jaxcl.yaml_io import _field_path, _line_of, read_yaml

__all__ = [
    "MergeConfig",
    "MergeError",
    "load_config",
    "merge_main",
    "merge_sources",
    "validate_config",
]


# ----------------------------------------------------------------------------- config


class ModelEntry(Strict):
    source: str = Field(description="an HF directory or a jaxcl checkpoint step folder")
    weight: float = Field(1.0, description="w_i (mergekit's weight)")


class LinearParams(Strict):
    normalize: bool = Field(True, description="divide by Σ w_i")


class TaskArithmeticParams(Strict):
    lam: float = Field(1.0, description="λ in θ_b + λ Σ w_i τ_i")
    normalize: bool = Field(False, description="divide by Σ w_i")


class TiesParams(Strict):
    density: float = Field(0.2, gt=0, le=1, description="share of each τ_i kept")
    lam: float = Field(1.0, description="λ in θ_b + λ τ_m")
    normalize: bool = Field(True, description="disjoint mean (true) or sum")
    consensus: Literal["sum", "count"] = "sum"
    scope: Literal["model", "leaf"] = Field(
        "model", description="trim each whole τ_i (the paper's) or each tensor (mergekit's)"
    )


class DareParams(Strict):
    drop: float = Field(0.9, ge=0, lt=1, description="p, the drop rate (mergekit: 1 − density)")
    lam: float = Field(1.0, description="λ scaling the merged vector")
    normalize: bool = Field(False, description="divide by the (agreeing) weights' sum")


class DareTiesParams(DareParams):
    consensus: Literal["sum", "count"] = "sum"


class SlerpParams(Strict):
    t: float = Field(ge=0, le=1, description="0: the base, 1: the model")


PARAMS: dict[str, type[Strict]] = {
    "linear": LinearParams,
    "task_arithmetic": TaskArithmeticParams,
    "ties": TiesParams,
    "dare_linear": DareParams,
    "dare_ties": DareTiesParams,
    "slerp": SlerpParams,
}


class MergeConfig(Strict):
    method: MergeMethod
    base: str | None = Field(None, description="the base model (linear: config and tokenizer)")
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    out: str
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    format: Literal["hf", "checkpoint"] = "hf"
    model: str | None = Field(
        None, description="checkpoint inputs: their architecture, a preset or an HF directory"
    )
    shard_gb: float = Field(5.0, gt=0, description="largest safetensors file written")
    overwrite: bool = False
    mesh: MeshSpec | None = Field(
        None, description="shard every tensor over a (data, fsdp, tensor) mesh, as a recipe"
    )
    rules: list[tuple[str, str | list[str] | None]] | None = Field(
        None, description="logical axis rules (default: jaxcl.parallel.DEFAULT_RULES)"
    )

    @pydantic.model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.rules is not None and self.mesh is None:
            raise ValueError("rules: logical rules place tensors on a mesh: give `mesh:` too")
        for name, target in self.rules or []:
            axes = [target] if isinstance(target, str) else list(target or [])
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown:
                raise ValueError(
                    f"rules: {name!r} maps to {unknown[0]!r}, not a mesh axis "
                    f"({', '.join(MESH_AXES)})"
                )
        if self.method in NEEDS_BASE and self.base is None:
            raise ValueError(f"base: method {self.method} merges task vectors of a base: give one")
        if self.method == "slerp" and len(self.models) != 1:
            raise ValueError(
                f"models: slerp interpolates between base and one model, got {len(self.models)}"
            )
        return self

    def params(self) -> dict[str, Any]:
        return PARAMS[self.method].model_validate(self.parameters).model_dump()


def validate_config(
    raw: Any, source: str = "<merge config>", yaml_root: yaml.Node | None = None
) -> MergeConfig:
    """A :class:`MergeConfig` from a mapping; every problem reported as ``source:line: field:
    why``, as recipes report theirs."""
    if not isinstance(raw, dict):
        raise MergeError(f"{source}: a merge config must be a YAML mapping")
    problems: list[tuple[tuple[Any, ...], str]] = []
    try:
        cfg = MergeConfig.model_validate(raw)
        try:
            cfg.params()
        except pydantic.ValidationError as err:
            for e in err.errors():
                problems.append((("parameters", *e["loc"]), f"{e['msg']} (method {cfg.method})"))
    except pydantic.ValidationError as err:
        for e in err.errors():
            message, loc = e["msg"].removeprefix("Value error, "), tuple(e["loc"])
            if not loc and ": " in message:  # the cross-field checks name their field
                field, message = message.split(": ", 1)
                loc = (field,)
            problems.append((loc, message))
    if not problems:
        return cfg
    lines = []
    for loc, message in problems:
        line = _line_of(yaml_root, loc)
        lines.append(f"{source}{f':{line}' if line else ''}: {_field_path(loc)}: {message}")
    raise MergeError("invalid merge config\n  " + "\n  ".join(lines))


def load_config(path: str | Path) -> MergeConfig:
    """Safe-load (a key given twice refused) and validate a merge config file."""
    path = Path(path)
    raw, root = read_yaml(path, what="merge config", error=MergeError)
    return validate_config(raw, str(path), root)


def merge_sources(
    config: MergeConfig | dict[str, Any] | str | Path, *, report: dict[str, Any] | None = None
) -> Path:
    """Merge the config's inputs into ``out`` (see the module's docstring); returns ``out``.
    Inputs of other shapes or tokenizers, a bad field, an unreadable input or a mesh the devices
    cannot form raise a :class:`MergeError` before anything is written; a failure while writing
    leaves no output. With a ``mesh``, ``report`` (a dict, when given) receives, per tensor
    (``layers/0/mlp/gate``...), the sharding spec its inputs were placed with (``input``), the
    merged tensor's (``output``), the number of devices holding it (``devices``) and whether it
    is split (``split``: not replicated)."""
    if isinstance(config, str | Path):
        config = load_config(config)
    elif isinstance(config, dict):
        config = validate_config(config)
    cfg, params = config, config.params()
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise MergeError(f"out: {out} exists; remove it or set overwrite: true")
    if out.exists() and not (out / "jaxcl_merge.json").is_file():
        raise MergeError(
            f"out: {out} exists and is not the output of an earlier jaxcl merge (no "
            "jaxcl_merge.json): overwrite replaces only a merge's own output; choose another out"
        )
    with ExitStack() as stack:
        models = [open_input(m.source, cfg.model, stack) for m in cfg.models]
        base = open_input(cfg.base, cfg.model, stack) if cfg.base else None
        ref = base or models[0]
        plan = entries(ref.config)
        check_shapes(ref, [m for m in [base, *models] if m is not None and m is not ref], plan)
        check_tokenizers([ref, *(m for m in [base, *models] if m is not None and m is not ref)])
        mesh = cfg.mesh.model_dump() if cfg.mesh is not None else None
        placement = Placement.build(mesh, cfg.rules, ref.config)
        stream = Streamer(cfg, params, base, models, placement)
        if cfg.method == "ties" and params["scope"] == "model":
            stream.cuts = model_cuts(base, models, plan, params["density"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        try:
            if cfg.format == "hf":
                write_hf(stream, plan, ref, tmp)
            else:
                write_checkpoint(stream, plan, tmp)
            (tmp / "jaxcl_merge.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if report is not None:
        report.update(placement.report)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out``; an existing ``out`` (``overwrite``) removed only after."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def merge_main(path: str, *, overwrite: bool = False) -> int:
    """``jaxcl merge CONFIG``: 0 on success; a :class:`MergeError` (exit 2 in the CLI)
    otherwise."""
    import time

    start = time.perf_counter()
    cfg = load_config(path)
    if overwrite:
        cfg = cfg.model_copy(update={"overwrite": True})
    report: dict[str, Any] = {}
    out = merge_sources(cfg, report=report)
    where = ""
    if cfg.mesh is not None:
        import jax

        shape = resolve_mesh_shape(cfg.mesh.model_dump(), jax.device_count())
        sizes = " ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape))
        split = sum(1 for r in report.values() if r["split"])
        where = f"; mesh {sizes}, {split} of {len(report)} tensors sharded"
    elapsed = time.perf_counter() - start
    print(f"{cfg.method}: {len(cfg.models)} model(s) -> {out} ({elapsed:.1f}s{where})")
    return 0
