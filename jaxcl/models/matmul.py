"""The projection ``y = x·W`` of every decoder weight, with a backward pass written out.

``linear(x, w)`` computes ``x [..., d] · w [d, f]`` in ``x``'s dtype with float32 accumulation
(``preferred_element_type``; the result is rounded to ``x``'s dtype once), and its gradients

    ∂L/∂x = g · Wᵀ            (float32 accumulation, rounded to x's dtype)
    ∂L/∂W = Σ_tokens xᵀ · g    (float32 accumulation, in W's own dtype)

where ``g = ∂L/∂y`` (cast to the compute dtype, ``x``'s, as under ``torch.autocast``). With
``transposed=True`` the weight is stored ``[f, d]`` (a tied embedding used as the output head).
What differs from what ``jax.grad`` of ``x @ w.astype(x.dtype)`` emits was found by profiling
the train step on XLA:CPU (docs/performance.md):

- **float32 results from bf16 operands.** XLA:CPU runs a bf16 × bf16 dot with a bf16 result
  about 2.5× slower than the same dot with a float32 result (its YNNPACK kernels take only the
  latter); every backend accumulates in float32 either way, so asking for the float32 result and
  rounding once gives the same numbers. ``∂L/∂W`` stays float32 for float32 master weights
  (autodiff would round it to bf16 first, then widen it).
- **the weight gradient's transpose (CPU only).** That dot contracts over tokens, the major axis
  of both operands, so one operand must be transposed. In float32, XLA transposes ``g`` and
  fuses the transpose into the elementwise op that produced it (e.g. the SwiGLU's gradient),
  whose loop then writes one element at a time (11 ms instead of about 1 ms for the tiny
  preset's ``[1536, 640]`` gradient): an optimization barrier on ``g`` keeps them apart. In
  bf16, XLA:CPU runs a dot whose left operand contracts its major axis in float32 (operands
  upcast, half the speed), and folds any visible transpose into the dot: ``x`` is transposed
  by a gather instead, and the dot runs on bf16 row-major operands (SmolLM2 shape: 4.8 → 4.1 s
  per step). Other backends transpose inside their matmuls; there the plain dot is emitted.

:func:`swiglu` is the SwiGLU product with a backward pass that keeps less (below). Values and
gradients equal the plain formulations' within float32 rounding (tests/test_matmul.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # [m, k]·[k, n]


def _separate_transposes() -> bool:
    return jax.default_backend() == "cpu"


def in_backward(residuals: Any, g: Any) -> tuple[Any, Any]:
    """``(residuals, g)`` with, on CPU, each floating residual made to depend on ``g``: what a
    backward rule derives from its residuals (a cast to the compute dtype, a transpose, a
    recomputed softmax or sigmoid) then cannot run before the backward pass reaches the rule.

    XLA:CPU otherwise merges such a value with the forward pass's identical one (its common
    subexpression elimination) or schedules it as soon as its inputs exist, and keeps it alive
    from the forward pass to the backward pass: at the SmolLM2 bench shape in bf16, the bf16
    weight copies, the transposed layer inputs, each layer's float32 attention probabilities,
    sigmoid and normalized input, about 1.2 GiB of the step's 1.9 GiB of temporaries. An
    optimization barrier does not help: XLA:CPU removes barriers before those passes. The
    dependency is an exact zero, ``0·g₀`` (``g₀`` one element of ``g``) added to each residual,
    which the compiler cannot fold away (``0·x`` is not 0 for every float), and which changes
    no value unless ``g`` holds an inf or a NaN, when every gradient is lost anyway."""
    if not _separate_transposes():
        return residuals, g
    first = jax.tree.leaves(g)[0]
    zero = jnp.ravel(first)[0].astype(_F32) * 0.0

    def tie(r: Any) -> Any:
        if isinstance(r, jax.Array) and jnp.issubdtype(r.dtype, jnp.floating):
            return r + zero.astype(r.dtype)
        return r

    return jax.tree.map(tie, residuals), g


def linear(
    x: jax.Array, w: jax.Array, *, transposed: bool = False, out_dtype: Any = None
) -> jax.Array:
    """``x [..., d] · w [d, f] → [..., f]`` (``transposed``: ``w [f, d]``, ``x·wᵀ``, e.g. a tied
    embedding as the output head) in ``x``'s dtype, accumulated in float32 and returned in
    ``out_dtype`` (default ``x``'s dtype). ``w`` is cast to ``x``'s dtype first, as mixed
    precision does; in the backward pass ``g`` is cast to it too, so both gradient dots run in
    the compute dtype (as under ``torch.autocast``)."""
    out = jnp.dtype(out_dtype or x.dtype)
    return _linear(x, w, bool(transposed), out)


def _w_axes(transposed: bool) -> tuple[int, int]:
    """``(input axis, output axis)`` of the weight."""
    return (1, 0) if transposed else (0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear(x: jax.Array, w: jax.Array, transposed: bool, out_dtype: Any) -> jax.Array:
    w_in, _ = _w_axes(transposed)
    dims = (((x.ndim - 1,), (w_in,)), ((), ()))
    y = jax.lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=_F32)
    return y.astype(out_dtype)


def _linear_fwd(x, w, transposed, out_dtype):
    # symbolic zeros: each primal comes with ``perturbed``, whether anything differentiates it
    # (a frozen base weight under LoRA is not: its gradient dot is then never formed)
    perturbed = (x.perturbed, w.perturbed)
    x, w = x.value, w.value
    return _linear(x, w, transposed, out_dtype), (x, w, perturbed)


def _linear_bwd(transposed, out_dtype, residuals, g):
    x, w, (x_perturbed, w_perturbed) = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    # what this rule derives from x and w alone is derived here, not kept from the forward pass
    (x_tied, w_tied), g = in_backward((x, w), g)
    w = w_tied if w.dtype != x.dtype else w  # its compute-dtype copy
    x = x_tied if _gather_for(x.dtype) else x  # its gathered transpose
    g = g.astype(x.dtype)
    dx = None
    if x_perturbed:
        _, w_out = _w_axes(transposed)
        dims = (((g.ndim - 1,), (w_out,)), ((), ()))
        dx = jax.lax.dot_general(g, w.astype(x.dtype), dims, preferred_element_type=_F32)
        dx = dx.astype(x.dtype)
    if not w_perturbed:
        return dx, None
    return dx, _weight_gradient(x, g, transposed).astype(w.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


def _weight_gradient(x: jax.Array, g: jax.Array, transposed: bool) -> jax.Array:
    """``Σ_tokens xᵀ·g`` in float32: ``[d, f]``, or ``[f, d]`` for a ``transposed`` weight."""
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_g = g.reshape(-1, g.shape[-1])
    if _separate_transposes() and _gather_for(x.dtype):
        # XLA:CPU runs a low-precision dot whose left operand contracts its major axis in
        # float32, and folds any transpose it can see into the dot: a gather transposes x
        in_by_out = jax.lax.dot_general(
            _gather_transpose(tokens_x), tokens_g, _NN, preferred_element_type=_F32
        )
        return jax.lax.optimization_barrier(in_by_out).T if transposed else in_by_out
    if _separate_transposes():
        tokens_g = jax.lax.optimization_barrier(tokens_g)
    contract_tokens = (((0,), (0,)), ((), ()))
    if transposed:
        return jax.lax.dot_general(tokens_g, tokens_x, contract_tokens, preferred_element_type=_F32)
    return jax.lax.dot_general(tokens_x, tokens_g, contract_tokens, preferred_element_type=_F32)


def _gather_for(dtype) -> bool:
    """Whether the CPU weight gradient transposes ``x`` by a gather: for low-precision compute
    (float32 dots are not upcast, and the gather measured no faster there) on one device (a
    gather over the flattened tokens of a sharded ``x`` would gather them all to every device)."""
    return jnp.dtype(dtype) != _F32 and jax.device_count() == 1


def _gather_transpose(a: jax.Array) -> jax.Array:
    """``aᵀ`` for ``a [n, d]``, made by a gather (element ``(i, j)`` of the result is element
    ``j·d + i`` of ``a`` flattened), which XLA does not fold into a consuming dot."""
    n, d = a.shape
    rows = jax.lax.broadcasted_iota(jnp.int32, (d, n), 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (d, n), 0)
    flat = jnp.take(a.reshape(-1), (rows * d + cols).reshape(-1), mode="clip", unique_indices=True)
    return flat.reshape(d, n)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) ⊙ up = gate·σ(gate)·up``, computed in float32 and returned in ``gate``'s
    dtype. Its backward pass keeps only ``gate`` and ``up`` and recomputes ``σ(gate)``:

        ∂up = g·gate·σ(gate),   ∂gate = g·up·σ(gate)·(1 + gate·(1 − σ(gate)))

    (autodiff of ``jax.nn.silu(gate) * up`` keeps four ``[tokens, mlp]`` arrays from the forward
    to the backward pass, 6 per layer with the projections': 1.1 GiB at the SmolLM2 shape)."""
    gate32 = gate.astype(_F32)
    return (gate32 * jax.nn.sigmoid(gate32) * up.astype(_F32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    (gate, up), g = in_backward(residuals, g)
    g32, gate32, up32 = g.astype(_F32), gate.astype(_F32), up.astype(_F32)
    sig = jax.nn.sigmoid(gate32)
    d_up = g32 * gate32 * sig
    d_gate = g32 * up32 * sig * (1.0 + gate32 * (1.0 - sig))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``y = x · r · scale`` with ``r = 1/sqrt(mean(x²) + eps)`` over the last axis, computed in
    float32 and returned in ``x``'s dtype. Its backward pass keeps ``x`` (in its own dtype) and
    ``r`` (one float32 per row) and recomputes ``n = x·r``:

        ∂scale = Σ_rows g·n,   ∂x = r·(d − n·mean(d·n)),   d = g·scale

    (autodiff keeps the float32 ``x`` and ``n``: two float32 ``[tokens, d]`` arrays per norm,
    four times what bf16 compute keeps here)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    x32 = x.astype(_F32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * r * scale.astype(_F32)).astype(x.dtype), (x, scale, r)


def _rms_norm_bwd(eps, residuals, g):
    del eps
    (x, scale, r), g = in_backward(residuals, g)
    n = x.astype(_F32) * r
    d = g.astype(_F32) * scale.astype(_F32)
    dx = r * (d - n * jnp.mean(d * n, axis=-1, keepdims=True))
    d_scale = jnp.sum((g.astype(_F32) * n).reshape(-1, n.shape[-1]), axis=0)
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
