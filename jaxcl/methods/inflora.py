"""InfLoRA (Liang & Li, CVPR 2024, "InfLoRA: Interference-Free Low-Rank Adaptation for
Continual Learning"; reference code liangyanshuo/InfLoRA, ``methods/inflora.py``).

Each task t trains a LoRA branch ``W + A_t B_t`` (jaxcl's layout: ``y = x W + (α/r) x A_t B_t``,
``A_t [in, r]``) whose down-projection A_t is **designed before the task and fixed**; only B_t
trains. Then the change to W, ``ΔW = (α/r) A_t B_t``, has its input side in ``span(A_t)``:
fine-tuning B_t is fine-tuning W inside that subspace. InfLoRA chooses the subspace so that it
(a) lies in the span of the new task's inputs (where its gradients live) and (b) is orthogonal to
``M``, the input subspace of the earlier tasks, so the outputs on earlier inputs x ∈ span(M) do
not move (``x ΔW = 0``)::

    H_t = the task's inputs to the projection (rows x),   C_t = (1/n) H_tᵀ H_t
    A_t = top-r eigenvectors of (I − M Mᵀ) C_t (I − M Mᵀ)          (scaled by a_scale)

After the task (its branch folded into W by the LoRA stage's ``per_task`` renewal), M grows by
the DualGPM rule on the task's inputs through the trained model: with ``P = M Mᵀ``, energy
``E = tr C``, captured ``E_M = tr(P C)``, the eigenvectors of ``(I − P) C (I − P)`` are added in
order of eigenvalue while the captured energy stays below ``ε_t E``, with the threshold rising
linearly over the stage's T tasks, ``ε_t = λ_b + (λ_e − λ_b) t / T`` (the reference's
``lamb``/``lame``). DualGPM keeps either M or its complement, whichever is smaller; both
updates are the same subspace operation, and jaxcl keeps an ``[in, in]`` basis holding M (so it
needs no switch).

Here: a mask behind the optimizer zeroes the final update of every ``A`` (AdamW's decay
included), a ``task_start`` hook designs A_t from the task's own batches, and ``consolidate``
(estimate ``inflora_covariance``) grows M. The inputs are found by
:func:`jaxcl.methods.activations.activation_covariance` on the adapters' ``A`` (the same x the
base projection sees).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxcl.methods._tree import SKIP, is_skip, path_str, skipped
from jaxcl.methods.activations import activation_covariance
from jaxcl.methods.compose import Behind, Position, behind
from jaxcl.methods.consolidate import register_consolidator
from jaxcl.methods.gpm import gpm_expand
from jaxcl.methods.isolate import find_state
from jaxcl.methods.protocol import Carry, Context, Hook, MethodSpecBase, output_fn, with_state

log = logging.getLogger(__name__)

#: the reference code's scale of the designed rows (``U[:, :r].T / sqrt(3)``)
REFERENCE_SCALE = 1 / math.sqrt(3)


def is_down_projection(path: str) -> bool:
    """Whether ``path`` (``/``-joined) is a LoRA adapter's down-projection ``A``."""
    parts = path.split("/")
    return parts[-1] == "a" and "lora" in parts


class InfLoraState(NamedTuple):
    """``basis``: per adapter ``A [..., in, r]`` an ``[..., in, in]`` float32 matrix whose nonzero
    columns are an orthonormal basis of M, the earlier tasks' input subspace (``SKIP`` on every
    other leaf)."""

    basis: optax.Params


def inflora(select: Any = None) -> Behind:
    """InfLoRA's mask and memory: the final update of every down-projection ``A`` (paths ending
    ``lora/.../a``, or where ``select(path, leaf)`` holds) is zeroed, every other update (the
    ``B``) passes unchanged; the state holds the basis of M per ``A``
    (:class:`InfLoraState`, refreshed by :func:`jaxcl.methods.consolidate` with
    ``inflora_covariance=`` and ``inflora_threshold=``). Memory: ``in²`` floats per ``A``."""
    pick = select or (lambda path, leaf: is_down_projection(path))

    def init(params: optax.Params) -> InfLoraState:
        def leaf(path, p):
            if not pick(path_str(path), p):
                return SKIP()
            return jnp.zeros((*p.shape[:-2], p.shape[-2], p.shape[-2]), jnp.float32)

        return InfLoraState(jax.tree_util.tree_map_with_path(leaf, params))

    def update(updates, state: InfLoraState, params=None, **extra_args):
        del params, extra_args
        out = jax.tree.map(
            lambda u, b: u if skipped(b) else jnp.zeros_like(u), updates, state.basis
        )
        return out, state

    return behind(init, update)


def _complement(basis: jax.Array) -> jax.Array:
    """An orthonormal basis of the complement of ``span(basis)`` as the nonzero columns of an
    ``[in, in]`` matrix (``eigh(I − B Bᵀ)``, eigenvalues 0 or 1)."""
    size = basis.shape[-2]
    w, q = jnp.linalg.eigh(jnp.eye(size, dtype=jnp.float32) - basis @ basis.T)
    return q * (w > 0.5)[None, :]


def inflora_design(
    cov: jax.Array,
    basis: jax.Array,
    rank: int,
    *,
    spectrum: Literal["inputs", "covariance"] = "inputs",
    scale: float = REFERENCE_SCALE,
) -> jax.Array:
    """InfLoRA's down-projection ``A [..., in, rank]``: ``scale`` times the top-``rank``
    eigenvectors (as columns) of ``(I − P) C (I − P)``, ``P = B Bᵀ`` (``spectrum="inputs"``,
    the paper's), or of ``(I − P) C² (I − P)``, the left singular vectors of ``(I − P) C``
    (``"covariance"``, the reference code's SVD of the projected covariance). Computed inside
    an orthonormal basis Q of the complement of B, so every column is orthogonal to B to float
    precision; columns beyond the complement's dimension are zero.

    ``cov [..., in, in]``: the task's input covariance ``C = (1/n) Σ x xᵀ``; ``basis [..., in,
    in]``: M's basis (zero columns unused)."""
    if cov.ndim > 2:
        return jax.vmap(lambda c, b: inflora_design(c, b, rank, spectrum=spectrum, scale=scale))(
            cov, basis
        )
    c = cov.astype(jnp.float32)
    if spectrum == "covariance":
        c = c @ c
    q = _complement(basis.astype(jnp.float32))
    eigval, eigvec = jnp.linalg.eigh(q.T @ c @ q)
    top = (q @ eigvec)[:, ::-1][:, :rank]
    return top * scale


def dualgpm_update(
    basis: jax.Array,
    cov: jax.Array,
    threshold: float | jax.Array,
    *,
    spectrum: Literal["inputs", "covariance"] = "inputs",
) -> jax.Array:
    """M's basis after a task (DualGPM's rule, see the module doc): the GPM energy criterion
    (:func:`jaxcl.methods.gpm.gpm_expand`) on the task's input covariance C (``"inputs"``: the
    paper's σ² of the representation matrix) or on ``C²`` (``"covariance"``: the reference
    code applies the criterion to the singular values of C itself)."""
    c = cov.astype(jnp.float32)
    if spectrum == "covariance":
        c = c @ c
    return gpm_expand(basis, c, jnp.asarray(threshold, jnp.float32))


def stage_threshold(start: float, end: float, task: int, tasks: int) -> float:
    """``ε_t = λ_b + (λ_e − λ_b) · t / T`` (0-based task ``t`` of ``T``), the reference's
    ``(lame − lamb) · cur_task / total_sessions + lamb``."""
    return start + (end - start) * task / max(tasks, 1)


def _refresh(
    state: InfLoraState,
    *,
    params,
    inflora_covariance,
    inflora_threshold,
    inflora_spectrum="inputs",
    **_,
) -> InfLoraState:
    del params

    def leaf(path, basis):
        if skipped(basis):
            return basis
        name = path_str(path)
        if name not in inflora_covariance:
            raise ValueError(f"inflora: no input seen for {name}")
        return dualgpm_update(
            basis, inflora_covariance[name], inflora_threshold, spectrum=inflora_spectrum
        )

    return InfLoraState(jax.tree_util.tree_map_with_path(leaf, state.basis, is_leaf=is_skip))


register_consolidator(
    InfLoraState, "inflora", _refresh, requires=("inflora_covariance", "inflora_threshold")
)


def adapter_covariance(ctx: Context, carry: Carry, batches: int) -> dict[str, jax.Array]:
    """``C = (1/n) Σ x xᵀ`` of each down-projection's inputs over ``batches`` of the task's own
    batches, keyed by path (the current adapter's ``A``)."""

    def select(path: str, leaf: Any) -> bool:
        return getattr(leaf, "ndim", 0) >= 2 and is_down_projection(path)

    return activation_covariance(
        output_fn(ctx), ctx.trainable(carry), ctx.batches(batches), select=select
    )


class InfLoraSpec(MethodSpecBase):
    """``{name: inflora}`` on a LoRA stage with ``lora.per_task``: each task's ``A`` designed from
    its inputs outside the earlier tasks' subspace and fixed, only ``B`` trained, the branch
    folded into W after the task and M grown (DualGPM)."""

    name: Literal["inflora"]
    position: ClassVar[Position] = "behind"
    threshold: float = Field(
        0.95, gt=0, le=1, description="DualGPM energy threshold after the first task (λ_b)"
    )
    threshold_end: float = Field(
        1.0, gt=0, le=1, description="threshold the schedule rises to over the stage (λ_e)"
    )
    batches: int = Field(4, ge=1, description="batches of the task for its input covariance")
    spectrum: Literal["inputs", "covariance"] = Field(
        "inputs",
        description="eigen-directions of the projected input covariance C (the paper) or of "
        "C² (the reference code's SVD of the projected C)",
    )
    a_scale: float = Field(
        REFERENCE_SCALE, gt=0, description="scale of A's unit columns (reference: 1/sqrt(3))"
    )

    def check_stage(self, *, n_tasks: int, lora: Any) -> None:
        super().check_stage(n_tasks=n_tasks, lora=lora)
        if lora is None or not lora.per_task:
            raise ValueError(
                "designs each task's LoRA down-projection and folds the branch after the task: "
                "it needs a LoRA stage with lora.per_task: true"
            )
        if self.threshold_end < self.threshold:
            raise ValueError(
                f"threshold_end: {self.threshold_end} is below threshold ({self.threshold}); "
                "the schedule rises"
            )

    def transform(self, **_: Any) -> optax.GradientTransformationExtraArgs:
        return inflora()

    def hooks(self) -> list[Hook]:
        spectrum, scale, batches = self.spectrum, self.a_scale, self.batches

        def design(ctx: Context, carry: Carry) -> Carry:
            state = find_state(carry.state.opt_state, InfLoraState)
            if state is None:
                raise ValueError("inflora's task-start hook found no InfLoraState")
            trainable, fixed = ctx.split(carry.state.params)
            cov = adapter_covariance(ctx, carry, batches)

            def leaf(path, a, basis):
                if skipped(basis):
                    return a
                name = path_str(path)
                if name not in cov:
                    raise ValueError(f"inflora: no input seen for {name}")
                new = inflora_design(cov[name], basis, a.shape[-1], spectrum=spectrum, scale=scale)
                new = new.astype(a.dtype)
                sharding = getattr(a, "sharding", None)
                return jax.device_put(new, sharding) if sharding is not None else new

            designed = jax.tree_util.tree_map_with_path(leaf, trainable, state.basis)
            log.info("inflora: task %d's down-projections designed", ctx.task.index)
            return with_state(carry, params=ctx.join(designed, fixed))

        return [Hook("task_start", design, "inflora: design A")]

    def estimates(self, ctx: Context, carry: Carry) -> dict[str, Any]:
        tasks = len(ctx.task.names) or 1
        return {
            "inflora_covariance": adapter_covariance(ctx, carry, self.batches),
            "inflora_threshold": stage_threshold(
                self.threshold, self.threshold_end, ctx.task.index, tasks
            ),
            "inflora_spectrum": self.spectrum,
        }
