"""Model benchmark: load time and forward tokens/s (for ``jaxcl bench``)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def bench_model(
    source: str = "smollm2-135m-instruct",
    *,
    batch: int = 4,
    seq: int = 256,
    steps: int = 3,
    dtype: str | None = None,
    scan_layers: bool = False,
) -> dict[str, Any]:
    """``load_s`` (reading and dequantizing the weights), ``compile_s`` (first jitted forward)
    and ``forward_tokens_per_s`` (``batch·seq`` tokens per forward, best of ``steps``). When the
    source's weights are not installed, the shape preset of the same name is used instead
    (``smollm2-135m-instruct`` → ``smollm2-135m``, random weights) and ``source`` says so."""
    from jaxcl.models.pretrained import from_pretrained

    start = time.perf_counter()
    try:
        model = from_pretrained(source, dtype=dtype, scan_layers=scan_layers)
    except FileNotFoundError:
        source = source.removesuffix("-instruct")
        model = from_pretrained(source, dtype=dtype, scan_layers=scan_layers)
    load_s = time.perf_counter() - start
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    ids = jnp.asarray(
        jax.random.randint(jax.random.key(0), (batch, seq), 0, model.config.vocab_size)
    )
    start = time.perf_counter()
    forward(state, ids).block_until_ready()
    compile_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        forward(state, ids).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return {
        "source": source,
        "parameters": model.config.num_params(),
        "batch": batch,
        "seq": seq,
        "load_s": round(load_s, 2),
        "compile_s": round(compile_s, 2),
        "forward_tokens_per_s": round(batch * seq / best, 1),
        "device": jax.devices()[0].device_kind,
    }
