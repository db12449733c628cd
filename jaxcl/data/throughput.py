"""How fast the input pipeline delivers tokens (for ``jaxcl bench``).

:func:`pipeline_throughput` times the whole host-side path of one task: reading the source,
tokenizing (batched), optional packing, building the shuffled / replay-mixed Grain stream and
materialising ``num_batches`` batches. Its ``tokens_per_s`` counts ``batch_size × seq_len``
slots per batch, the unit in which a train step consumes tokens, so the two compare directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxcl.data.packing import pack_examples
from jaxcl.data.pipeline import batched_stream, encode_all


def pipeline_throughput(
    data: Any,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int = 100,
    kind: str | None = None,
    pack: bool = False,
    replay: Sequence[dict[str, np.ndarray]] | None = None,
    replay_ratio: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Tokens per second the pipeline delivers for ``data``.

    ``data`` is a :class:`jaxcl.data.spec.DataSpec` (its train split is read, timed too) or a
    list of raw examples of ``kind``. Returns ``tokens_per_s`` (batch slots per second, end to
    end), ``real_tokens_per_s`` (non-padding tokens), ``examples_per_s``, and the seconds spent
    in ``load``, ``encode`` (tokenize + pack) and ``batches``.
    """
    t0 = time.perf_counter()
    if hasattr(data, "load") and hasattr(data, "kind"):
        examples, kind = data.load("train"), data.kind
    else:
        examples = list(data)
        if kind is None:
            raise ValueError("pipeline_throughput: give kind= for a list of examples")
    t1 = time.perf_counter()
    encoded = encode_all(examples, kind, tokenizer, seq_len)
    if pack:
        encoded = pack_examples(encoded, seq_len)
    t2 = time.perf_counter()
    stream = batched_stream(
        encoded,
        batch_size=batch_size,
        num_batches=num_batches,
        seed=seed,
        replay=replay,
        replay_ratio=replay_ratio,
    )
    real = 0
    for k in range(len(stream)):
        batch = stream[k]
        key = "tokens" if "tokens" in batch else "chosen_tokens"
        mask = batch.get("segment_ids", batch[key] != getattr(tokenizer, "pad_token_id", 0))
        real += int(np.count_nonzero(np.asarray(mask)[:, :-1]))
    t3 = time.perf_counter()
    total = t3 - t0
    slots = batch_size * seq_len * num_batches
    return {
        "tokens_per_s": slots / total,
        "real_tokens_per_s": real / total,
        "examples_per_s": len(examples) / max(t2 - t0, 1e-9),
        "load_s": t1 - t0,
        "encode_s": t2 - t1,
        "batches_s": t3 - t2,
        "seconds": total,
        "tokens": float(slots),
    }
