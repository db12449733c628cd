"""How a stage sees the model: every weight trained, or low-rank adapters on fixed weights.

A stage trains a *stage tree*. Without ``lora`` it is the model's parameters. With ``lora`` it
also holds one adapter pair per targeted projection, at
``<module>/lora/<proj>/tasks/adapter/{a,b}``, and the projection computes
``x·W + (α/r)·x·A·B`` (:mod:`jaxcl.models.lora`). Only the adapters are *trainable*: the train
step differentiates with respect to them alone (no gradient is formed for a base weight) and the
optimizer, its CL methods included, sees only them (:meth:`StageModel.split`).

Between stages the model travels as plain parameters: :meth:`StageModel.export` folds the
adapter into its kernel, ``W ← W + (α/r)·A·B``, and drops it; :meth:`StageModel.attach` adds a
fresh one (``A ~ N(0, 1/in)``, ``B = 0``, so the function is unchanged). With ``per_task`` the
finished adapter is folded at every task boundary and a fresh one drawn (:meth:`renew`): O-LoRA's
sequence of per-task subspaces, each later task's ``A`` kept orthogonal to the earlier ones by
the ``o_lora`` method, whose history holds the earlier ``A``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxcl import parallel
from jaxcl.models import lora as lora_lib

ADAPTER = "adapter"  # the bank entry every LoRA stage trains
Key = tuple  # a flattened parameter path


@dataclass
class StageModel:
    """The stage's graph, the logical axis names of its tree, and (LoRA) its adapters' layout."""

    graphdef: nnx.GraphDef
    logical_names: dict
    lora: Any = None  # jaxcl.models.spec.LoraSpec
    seed: int = 0
    adapter_shapes: dict[Key, jax.ShapeDtypeStruct] = field(default_factory=dict)
    shardings: Any = None  # of the whole stage tree, once placed on a mesh (:meth:`place`)

    @classmethod
    def build(cls, model_spec: Any, lora: Any, seed: int = 0) -> StageModel:
        """The plain model (``lora=None``) or the model with one adapter per target."""
        model = model_spec.abstract_model()
        if lora is None:
            graphdef, _ = nnx.split(model, nnx.Param)
            return cls(graphdef, parallel.param_logical_names(model))
        lora_lib.add_adapter(model, ADAPTER, lora.config(), rngs=nnx.Rngs(0))
        kinds = nnx.Any(nnx.Param, lora_lib.LoRAParam)
        graphdef, state = nnx.split(model, kinds)
        flat = flatten_dict(nnx.to_pure_dict(state))
        shapes = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items() if _is_adapter(k)
        }
        return cls(graphdef, parallel.param_logical_names(model, kinds), lora, seed, shapes)

    # -- trainable / fixed ---------------------------------------------------------------

    def split(self, params: dict) -> tuple[dict, dict]:
        """``(trainable, fixed)``: the adapters and the rest (all of it trainable without LoRA)."""
        if self.lora is None:
            return params, {}
        flat = flatten_dict(params)
        trainable = {k: v for k, v in flat.items() if _is_adapter(k)}
        fixed = {k: v for k, v in flat.items() if not _is_adapter(k)}
        return unflatten_dict(trainable), unflatten_dict(fixed)

    def join(self, trainable: dict, fixed: dict) -> dict:
        """Inverse of :meth:`split`."""
        if self.lora is None:
            return trainable
        return unflatten_dict({**flatten_dict(fixed), **flatten_dict(trainable)})

    # -- plain parameters <-> stage tree -------------------------------------------------

    @property
    def scale(self) -> float:
        return self.lora.alpha / self.lora.rank

    def pairs(self) -> list[tuple[Key, Key, Key]]:
        """``(kernel, a, b)`` paths of every adapter."""
        out = []
        for key in self.adapter_shapes:
            if key[-1] == "a":
                i = key.index("lora")
                out.append((key[:i] + (key[i + 1],), key, key[:-1] + ("b",)))
        return out

    def fresh_adapters(self, task: int) -> dict[Key, jax.Array]:
        """Adapter ``task`` of the stage: ``A ~ N(0, 1/in)`` seeded by stage and task, ``B = 0``."""
        root = jax.random.fold_in(jax.random.key(self.seed), task)
        out = {}
        for n, (_, a, b) in enumerate(self.pairs()):
            sa, sb = self.adapter_shapes[a], self.adapter_shapes[b]
            fan_in = sa.shape[-2]
            out[a] = (
                jax.random.normal(jax.random.fold_in(root, n), sa.shape) * fan_in**-0.5
            ).astype(sa.dtype)
            out[b] = jnp.zeros(sb.shape, sb.dtype)
        return out

    def attach(self, params: dict, task: int = 0) -> dict:
        """Plain parameters → stage tree (a fresh adapter, so the same function)."""
        if self.lora is None:
            return params
        tree = unflatten_dict({**flatten_dict(params), **self.fresh_adapters(task)})
        return tree if self.shardings is None else jax.device_put(tree, self.shardings)

    def export(self, params: dict) -> dict:
        """Stage tree → plain parameters: ``W ← W + (α/r)·A·B`` for every adapter, dropped."""
        if self.lora is None:
            return params
        return self._fold_jitted(params)

    @functools.cached_property
    def _fold_jitted(self):
        return jax.jit(self._fold)  # one compilation per stage, reused at every task boundary

    def renew(self, params: dict, task: int) -> dict:
        """Fold the adapter into the base weights and draw adapter ``task`` (same function)."""
        if self.lora is None:
            return params
        return self.attach(self.export(params), task)

    def _fold(self, params: dict) -> dict:
        flat = flatten_dict(params)
        for kernel, a, b in self.pairs():
            w = flat[kernel]
            delta = jnp.einsum("...ir,...ro->...io", flat[a], flat[b]) * self.scale
            flat[kernel] = (w + delta.astype(jnp.float32)).astype(w.dtype)
        return unflatten_dict({k: v for k, v in flat.items() if not _is_adapter(k)})

    def place(self, mesh: Any, rules: Any, plain_like: dict) -> Any:
        """Shardings of the whole stage tree on ``mesh``, by the logical axis rules."""
        self.shardings = parallel.tree_shardings(
            self.logical_names, self.like(plain_like), mesh, rules
        )
        return self.shardings

    def like(self, plain_like: dict) -> dict:
        """Shapes of the stage tree, from the plain parameters' (arrays or ShapeDtypeStructs)."""
        flat = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in flatten_dict(plain_like).items()
        }
        flat.update(self.adapter_shapes)
        if self.shardings is not None:
            placed = flatten_dict(self.shardings)
            flat = {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[k])
                for k, v in flat.items()
            }
        return unflatten_dict(flat)

    def describe(self) -> dict[str, Any] | None:
        """What a checkpoint records so any reader can rebuild this tree (manifest ``lora``)."""
        return None if self.lora is None else self.lora.model_dump(mode="json")


def _is_adapter(key: Key) -> bool:
    return "lora" in key
