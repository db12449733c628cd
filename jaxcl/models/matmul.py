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

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _separate_transposes() -> bool:
    return jax.default_backend() == "cpu"


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., d] · w [d, f] → [..., f]`` in ``x``'s dtype, accumulated in float32 (``w`` is
    cast to ``x``'s dtype first, as mixed precision does)."""
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=_F32).astype(x.dtype)


def _linear_fwd(x, w):
    # symbolic zeros: each primal comes with ``perturbed``, whether anything differentiates it
    # (a frozen base weight under LoRA is not: its gradient dot is then never formed)
    perturbed = (x.perturbed, w.perturbed)
    x, w = x.value, w.value
    return linear(x, w), (x, w, perturbed)


def _linear_bwd(residuals, g: jax.Array):
    x, w, (x_perturbed, w_perturbed) = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    if _separate_transposes() and w_perturbed:
        g = jax.lax.optimization_barrier(g)
    dx = None
    if x_perturbed:
        dx = jnp.matmul(g, w.astype(g.dtype).T, preferred_element_type=_F32).astype(x.dtype)
    if not w_perturbed:
        return dx, None
    tokens_x = x.reshape(-1, x.shape[-1])
    tokens_g = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    contract_tokens = (((0,), (0,)), ((), ()))
    dw = jax.lax.dot_general(tokens_x, tokens_g, contract_tokens, preferred_element_type=_F32)
    return dx, dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)
