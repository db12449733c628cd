"""Jitted autoregressive generation with a key/value cache.

Prompts of different lengths are left-padded into one batch: every row's real tokens sit at the
right end of the prompt block, get positions ``0..len-1``, and padding slots are masked out of
attention, so each row decodes exactly as it would alone. The whole loop (prefill, then one
token per step until ``max_new_tokens`` or every row has stopped) is one compiled function.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROMPT_BUCKET = 16  # prompt blocks are padded to a multiple of this (fewer recompilations)


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """One token per row of ``logits [batch, vocab]``.

    ``temperature == 0``: ``argmax``. Otherwise sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` largest logits (``top_k > 0``) and to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus; ``top_p < 1``).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
        cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9, 10))
def _generate(
    graphdef: nnx.GraphDef,
    state: Any,
    ids: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    max_new: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stops: tuple[int, ...],
    pad: int,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    batch, prompt = ids.shape
    slots = prompt + max_new
    cache = model.init_cache(batch, slots)
    slot_valid = jnp.zeros((batch, slots), bool).at[:, :prompt].set(valid)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    last = positions[:, -1]
    logits, cache = model.decode(ids, positions, cache, slot_valid, 0)
    stop_ids = jnp.asarray(stops or (-1,), jnp.int32)
    token = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.full((batch, max_new), pad, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop_ids)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, token, cache, slot_valid, out, done = carry
        slot = prompt + i - 1  # where the previous token goes
        slot_valid = jax.lax.dynamic_update_slice(slot_valid, jnp.ones((batch, 1), bool), (0, slot))
        step_model = nnx.merge(graphdef, state)
        logits, cache = step_model.decode(
            token[:, None], (last + i)[:, None], cache, slot_valid, slot
        )
        new = sample_logits(logits[:, 0], jax.random.fold_in(key, i), temperature, top_k, top_p)
        new = jnp.where(done, pad, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        return i + 1, new, cache, slot_valid, out, done | jnp.isin(new, stop_ids)

    carry = (jnp.int32(1), token, cache, slot_valid, out, done)
    return jax.lax.while_loop(cond, body, carry)[4]


def _rows(input_ids: Any, attention_mask: Any) -> list[np.ndarray]:
    if isinstance(input_ids, jax.Array | np.ndarray):
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        if attention_mask is None:
            return list(ids)
        mask = np.asarray(attention_mask).reshape(ids.shape).astype(bool)
        return [row[m] for row, m in zip(ids, mask)]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with an array of input_ids, not a list of rows")
    rows = [np.asarray(r) for r in input_ids]
    if rows and rows[0].ndim == 0:  # one flat prompt
        rows = [np.asarray(input_ids)]
    return rows


def generate(
    model: nnx.Module,
    input_ids: Any,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int = 0,
    attention_mask: Any = None,
    seed: int | jax.Array = 0,
) -> jax.Array:
    """Generate ``max_new_tokens`` tokens after each prompt; returns ``[batch, max_new_tokens]``
    int32 ids (greedy when ``temperature == 0``).

    ``input_ids``: an array ``[batch, seq]`` (with ``attention_mask`` marking real tokens, left
    or right padded), or a list of token-id lists of any lengths. After a row emits one of
    ``stop_tokens`` (default: the model config's eos ids) its remaining slots hold
    ``pad_token_id``; the loop ends early once every row has stopped. ``seed`` (an int or a
    ``jax.random`` key) drives sampling.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, "
            f"{top_k}"
        )
    rows = _rows(input_ids, attention_mask)
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((len(rows), width), pad_token_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        valid[i, width - len(row) :] = True
    stops = tuple(int(t) for t in (cfg.stop_token_ids if stop_tokens is None else stop_tokens))
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(valid),
        key,
        int(max_new_tokens),
        float(temperature),
        int(top_k),
        float(top_p),
        stops,
        int(pad_token_id),
    )
