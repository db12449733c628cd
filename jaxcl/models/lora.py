"""LoRA: low-rank adapters on chosen projections, a bank of per-task adapters, merging.

An adapted projection computes ``y = x·W + b + Σ_t (α_t / r_t) · dropout(x)·A_t·B_t`` with
``A_t [in, r_t]`` (random normal, std ``1/√in``) and ``B_t [r_t, out]`` (zeros, so a fresh
adapter leaves the model unchanged). Each call to :func:`add_adapter` adds one pair per targeted
projection for a new task and freezes the pairs of earlier tasks (kept, as O-LoRA needs them).

Adapter weights are not ``nnx.Param``: the current task's are :class:`LoRAParam`, earlier ones
:class:`FrozenLoRAParam`, so ``nnx.state(model, nnx.Param)`` is still exactly the base weights and
``nnx.split(model, LoRAParam, ...)`` separates what LoRA training updates. Differentiating only
with respect to the :class:`LoRAParam` state never forms a gradient for a base weight: the
backward pass of ``x·W`` with ``W`` held constant computes only ``∂L/∂x``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl.models.llama import PROJECTIONS, Attention, SwiGLU


class LoRAParam(nnx.Variable):
    """Trainable adapter weights (the current task's)."""


class FrozenLoRAParam(nnx.Variable):
    """Adapter weights of earlier tasks: applied, never trained."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``targets``: projection names (``("q", "v")``) or a regular expression searched in the
    parameter path (``"layers/[0-3]/attn/(q|v)$"``; scanned models have no layer index)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | Sequence[str] = ("q", "v")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.targets, str):
            unknown = set(self.targets) - set(PROJECTIONS)
            if unknown:
                raise ValueError(
                    f"LoRA targets {sorted(unknown)} are not projections {list(PROJECTIONS)}"
                )

    @property
    def pattern(self) -> str:
        if isinstance(self.targets, str):
            return self.targets
        return rf"(attn|mlp)/({'|'.join(self.targets)})$"


class LoRAPair(nnx.Module):
    """One task's ``(α/r)·dropout(x)·A·B``; leading axes of ``A``/``B`` follow scanned layers."""

    def __init__(
        self, a: jax.Array, b: jax.Array, names: tuple, scale: float, dropout: float, order: int
    ) -> None:
        lead = names[:-2]
        self.a = LoRAParam(a, out_sharding=(*lead, names[-2], "lora_rank"), eager_sharding=False)
        self.b = LoRAParam(b, out_sharding=(*lead, "lora_rank", names[-1]), eager_sharding=False)
        self.scale = scale
        self.dropout = dropout
        self.order = order  # tasks are numbered in the order they were added

    def __call__(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        if rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        return (x @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype) * self.scale

    def delta(self) -> jax.Array:
        """``(α/r)·A·B``, the change this pair makes to the base kernel."""
        return jnp.einsum("...ir,...ro->...io", self.a[...], self.b[...]) * self.scale

    def freeze(self) -> None:
        for name in ("a", "b"):
            var = getattr(self, name)
            if isinstance(var, LoRAParam):
                setattr(self, name, FrozenLoRAParam(var[...], **var.get_metadata()))


class LoRABank(nnx.Module):
    """The adapters of one projection, one :class:`LoRAPair` per task, summed."""

    def __init__(self) -> None:
        self.tasks = nnx.Dict()

    def __call__(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        out = 0.0
        for i, pair in enumerate(self.tasks.values()):
            out = out + pair(x, None if rng is None else jax.random.fold_in(rng, i))
        return out

    def branch(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        """What the bank adds to its projection (:data:`jaxcl.models.llama.BRANCHES`)."""
        return self(x, rng)


def _targets(model: nnx.Module, pattern: str):
    """``(path, module, projection)`` for every projection whose path matches ``pattern``."""
    regex = re.compile(pattern)
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, Attention | SwiGLU):
            continue
        for proj in PROJECTIONS:
            if hasattr(module, proj) and isinstance(getattr(module, proj), nnx.Param):
                full = "/".join(map(str, (*path, proj)))
                if regex.search(full):
                    yield full, module, proj


def add_adapter(model: nnx.Module, task: str, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Add task ``task``'s adapters (in place) and freeze every earlier task's; returns the
    adapted parameter paths. Raises if nothing matches or the task already has adapters."""
    matched = list(_targets(model, config.pattern))
    if not matched:
        raise ValueError(f"LoRA targets {config.pattern!r} match no projection of the model")
    earlier = adapter_tasks(model)
    if task in earlier:
        raise ValueError(f"LoRA task {task!r} already has adapters (tasks: {earlier})")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRAPair):
            module.freeze()
    for _, module, proj in matched:
        kernel = getattr(module, proj)
        *lead, d_in, d_out = kernel.shape
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        if not hasattr(module, "lora"):
            module.lora = nnx.Dict()
        if proj not in module.lora:
            module.lora[proj] = LoRABank()
        bank = module.lora[proj]
        dtype = kernel.get_value().dtype  # (a ShapeDtypeStruct for an abstract model)
        a = jax.random.normal(rngs.params(), (*lead, d_in, config.rank), dtype) * d_in**-0.5
        b = jnp.zeros((*lead, config.rank, d_out), dtype)
        scale = config.alpha / config.rank
        bank.tasks[task] = LoRAPair(a, b, tuple(names), scale, config.dropout, len(earlier))
    return [path for path, _, _ in matched]


def adapter_tasks(model: nnx.Module) -> list[str]:
    """Task names with adapters, in the order they were added."""
    order: dict[str, int] = {}
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRABank):
            order.update({task: pair.order for task, pair in module.tasks.items()})
    return sorted(order, key=order.__getitem__)


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (``W ← W + Σ_t (α_t/r_t)·A_t·B_t``) and remove
    the adapters, in place; returns the model (now a plain decoder, exportable as is)."""
    for _, module in list(nnx.iter_modules(model)):
        if isinstance(module, Attention | SwiGLU) and hasattr(module, "lora"):
            for proj, bank in module.lora.items():
                kernel = getattr(module, proj)
                delta = sum(pair.delta() for pair in bank.tasks.values())
                kernel[...] = (kernel[...] + delta).astype(kernel[...].dtype)
            del module.lora
    return model


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """``(graphdef, trainable, rest)``: the current task's adapters as a pure dict (what a
    LoRA-only optimizer updates) and everything else (base weights, frozen adapters)."""
    graphdef, trainable, rest = nnx.split(model, LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(trainable), rest


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``apply(trainable, rest, input_ids, **kw) -> logits`` for the pieces of :func:`split`.

    ``rest`` is passed, not closed over, so a jitted step takes it as an (undonated) argument;
    no gradient is formed for it unless asked for.
    """

    def apply(trainable: dict, rest: Any, input_ids: jax.Array, **kwargs: Any) -> jax.Array:
        return nnx.merge(graphdef, trainable, rest)(input_ids, **kwargs)

    return apply


def adapter_state(model: nnx.Module, frozen: bool = True) -> dict:
    """Pure dict of adapter weights: the current task's, plus earlier tasks' when ``frozen``."""
    kinds = (LoRAParam, FrozenLoRAParam) if frozen else (LoRAParam,)
    return nnx.to_pure_dict(nnx.state(model, nnx.Any(*kinds)))
