"""The projection ``y = x·W`` of every decoder weight, with a backward pass written out.

``linear(x, w)`` computes ``x [..., d] · w [d, f]`` in ``x``'s dtype with float32 accumulation
(``preferred_element_type``; the result is rounded to ``x``'s dtype once), and its gradients

    ∂L/∂x = g · Wᵀ            (float32 accumulation, rounded to x's dtype)
    ∂L/∂W = Σ_tokens xᵀ · g    (float32 accumulation, in W's own dtype)

where ``g = ∂L/∂y``. Two things differ from what ``jax.grad`` of ``x @ w.astype(x.dtype)`` emits,
both found by profiling the train step on XLA:CPU (docs/performance.md):

- **float32 results from bf16 operands.** XLA:CPU runs a bf16 × bf16 dot with a bf16 result
  about 2.5× slower than the same dot with a float32 result (the bf16 result is not taken by its
  YNNPACK kernels); every backend accumulates in float32 either way, so asking for the float32
  result and rounding once gives the same numbers, faster. ``∂L/∂W`` stays float32 for float32
  master weights (autodiff would round it to bf16 first, then widen it).
- **the weight gradient's transpose stays a copy of its own (CPU only).** The weight-gradient
  dot contracts over tokens, the major axis of both operands, so XLA transposes ``g``; on CPU it
  fuses that transpose into the elementwise op that produced ``g`` (e.g. the SwiGLU's gradient),
  whose loop then writes one element at a time (11 ms instead of about 1 ms for the tiny
  preset's ``[1536, 640]`` gradient). An optimization barrier on ``g`` keeps the producer and
  the transpose apart. Other backends transpose inside the matmul, so there it is left out.

Values and gradients equal the plain formulation's within float32 rounding
(tests/test_matmul.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _separate_transposes() -> bool:
    return jax.default_backend() == "cpu"


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
    g = g.astype(x.dtype)
    if _separate_transposes() and w_perturbed:
        g = jax.lax.optimization_barrier(g)
    _, w_out = _w_axes(transposed)
    dx = None
    if x_perturbed:
        dims = (((g.ndim - 1,), (w_out,)), ((), ()))
        dx = jax.lax.dot_general(g, w.astype(x.dtype), dims, preferred_element_type=_F32)
        dx = dx.astype(x.dtype)
    if not w_perturbed:
        return dx, None
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_g = g.reshape(-1, g.shape[-1])
    contract_tokens = (((0,), (0,)), ((), ()))
    if transposed:  # [f, d]
        dw = jax.lax.dot_general(tokens_g, tokens_x, contract_tokens, preferred_element_type=_F32)
    else:  # [d, f]
        dw = jax.lax.dot_general(tokens_x, tokens_g, contract_tokens, preferred_element_type=_F32)
    return dx, dw.astype(w.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)
