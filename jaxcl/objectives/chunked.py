"""Chunked losses: token statistics over sequence chunks of the final hidden states.

A loss over a 128k vocabulary never needs the whole ``[batch, seq, vocab]`` float32 logits at
once (16 GiB at 8 × 4096 tokens): every quantity it reads is a per-token reduction over the
vocabulary (the target's log-probability, a KL between two distributions, an argmax). Here the
model runs up to its final-normed hidden states ``h [B, T, D]`` (:meth:`Decoder.hidden_states
<jaxcl.models.llama.Decoder.hidden_states>`), and the output projection (:meth:`Decoder.head
<jaxcl.models.llama.Decoder.head>`) plus the reduction run over sequence chunks
``h[:, i·c:(i+1)·c]`` inside :func:`jax.lax.map`, each chunk under :func:`jax.checkpoint`: the
forward pass holds one ``[B, c, V]`` logits chunk at a time, and the backward pass recomputes
each chunk's logits instead of keeping them (saved per chunk: its ``[B, c, D]`` hidden states).

The result equals the unchunked computation up to float32 rounding (the same per-token formula
on the same rows; 1e-5 relative, tests/test_chunked.py), for values and gradients.
``chunk <= 0``, or a sequence no longer than ``chunk``, takes the unchunked path unchanged.

:class:`ModelApply` is the model as a pure function (``apply(params, inputs) -> logits``, the
trainer's ``make_apply``) that also exposes ``hidden`` and ``head``; objectives given a plain
function fall back to materialised logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl.objectives.lm import token_logps

#: default chunk: sequence positions per chunk (a ``[batch, 512, vocab]`` float32 logits block)
DEFAULT_CHUNK = 512


class ModelApply:
    """The NNX model of ``graphdef`` as pure functions of its parameters.

    * ``apply(params, inputs, **kw) -> logits [B, T, V]`` (float32), ``inputs`` the token ids
      or a dict of ``input_ids``, ``positions`` and ``segment_ids`` (packed rows);
    * ``apply.hidden(params, inputs, **kw) -> h [B, T, D]``, the final-normed hidden states;
    * ``apply.head(params, h) -> logits [..., V]``, so ``apply(p, x) == head(p, hidden(p, x))``.
    """

    def __init__(self, graphdef: nnx.GraphDef) -> None:
        self.graphdef = graphdef

    def _model(self, params: Any) -> Any:
        return nnx.merge(self.graphdef, params)

    def __call__(self, params: Any, input_ids: Any, **kwargs: Any) -> jax.Array:
        if isinstance(input_ids, dict):  # packed rows: ids with their positions and segments
            return self._model(params)(**input_ids, **kwargs)
        return self._model(params)(input_ids, **kwargs)

    def hidden(self, params: Any, input_ids: Any, **kwargs: Any) -> jax.Array:
        model = self._model(params)
        if isinstance(input_ids, dict):
            return model.hidden_states(**input_ids, **kwargs)
        return model.hidden_states(input_ids, **kwargs)

    def head(self, params: Any, hidden: jax.Array) -> jax.Array:
        return self._model(params).head(hidden)


def can_chunk(apply: Any) -> bool:
    """Whether ``apply`` exposes ``hidden`` and ``head`` (a :class:`ModelApply`)."""
    return callable(getattr(apply, "hidden", None)) and callable(getattr(apply, "head", None))


def num_chunks(seq: int, chunk: int) -> int:
    """Chunks a sequence of ``seq`` positions is cut into (1: unchunked)."""
    return 1 if chunk <= 0 or seq <= chunk else math.ceil(seq / chunk)


def chunk_map(fn: Callable[..., Any], consts: Any, arrays: Sequence[jax.Array], chunk: int) -> Any:
    """``fn(consts, *arrays)`` evaluated over sequence chunks of ``arrays`` (each ``[B, T, ...]``),
    outputs (a pytree of ``[B, T, ...]``) concatenated back along the sequence.

    ``fn`` must act position by position (output ``[B, c, ...]`` for inputs ``[B, c, ...]``).
    Each chunk runs under :func:`jax.checkpoint`, so the backward pass keeps only each chunk's
    inputs and recomputes its intermediates (the logits). A ragged last chunk is padded with
    zeros and its padded positions dropped.
    """
    batch, seq = arrays[0].shape[:2]
    n = num_chunks(seq, chunk)
    if n == 1:
        return fn(consts, *arrays)
    pad = n * chunk - seq

    def split(a: jax.Array) -> jax.Array:
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.swapaxes(a.reshape(batch, n, chunk, *a.shape[2:]), 0, 1)

    def join(o: jax.Array) -> jax.Array:
        o = jnp.swapaxes(o, 0, 1)
        return o.reshape(batch, n * chunk, *o.shape[3:])[:, :seq]

    body = jax.checkpoint(fn)
    out = jax.lax.map(lambda xs: body(consts, *xs), tuple(split(a) for a in arrays))
    return jax.tree.map(join, out)


def chunked_token_stats(
    apply: ModelApply,
    params: Any,
    hidden: jax.Array,
    targets: jax.Array,
    chunk: int = DEFAULT_CHUNK,
    *,
    argmax: bool = False,
    mean_logits: bool = False,
) -> dict[str, jax.Array]:
    """Per-token statistics ``[B, T]`` of the logits ``head(h)`` without holding them whole:
    ``logps`` = ``log softmax(z)[y] = z_y − logsumexp(z)`` (float32), and on request ``argmax``
    (``argmax_v z_v``) and ``mean_logits`` (``(1/V) Σ_v z_v``)."""

    def fn(p, h, y):
        logits = apply.head(p, h)
        out = {"logps": token_logps(logits, y)}
        if argmax:
            out["argmax"] = jnp.argmax(logits, axis=-1)
        if mean_logits:
            out["mean_logits"] = jnp.mean(logits.astype(jnp.float32), axis=-1)
        return out

    return chunk_map(fn, params, (hidden, targets), chunk)


def chunked_pair_stat(
    apply: ModelApply,
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    params_a: Any,
    hidden_a: jax.Array,
    params_b: Any,
    hidden_b: jax.Array,
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
    """``fn(head(a, h_a), head(b, h_b)) -> [B, T]`` over sequence chunks: a per-token function
    of two models' logits (a KL, a distillation loss) without either's whole logits."""

    def body(ps, ha, hb):
        return fn(apply.head(ps[0], ha), apply.head(ps[1], hb))

    return chunk_map(body, (params_a, params_b), (hidden_a, hidden_b), chunk)


def sequence_logps_chunked(
    apply: Any, params: Any, inputs: Any, targets: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """Summed masked target log-probs ``[B]`` (``Σ_t m_t log p(y_t)``), chunked when ``apply``
    allows it (else from the whole logits)."""
    logps = token_logps_of(apply, params, inputs, targets, chunk)
    return jnp.sum(logps * mask, axis=-1)


def token_logps_of(
    apply: Any, params: Any, inputs: Any, targets: jax.Array, chunk: int
) -> jax.Array:
    """Target log-probs ``[B, T]`` of the model on ``inputs``, chunked when ``apply`` allows."""
    if chunk > 0 and can_chunk(apply):
        hidden = apply.hidden(params, inputs)
        return chunked_token_stats(apply, params, hidden, targets, chunk)["logps"]
    return token_logps(apply(params, inputs), targets)
