"""Sequence packing: several encoded examples per row, kept apart by segment ids and positions.

A packed row has the same ``seq_len + 1`` layout as an encoded example (inputs ``tokens[:-1]``,
targets ``tokens[1:]``) plus

* ``segment_ids``: 1, 2, ... for the documents of the row, 0 on padding;
* ``positions``: 0, 1, ... restarting at every document (0 on padding).

Feed the model ``model(tokens[:, :-1], positions=positions[:, :-1],
segment_ids=segment_ids[:, :-1])``: attention stays inside a document and rotary positions
restart, so each document's logits equal those it gets alone. The first token of every document
carries loss mask 0, so nothing is ever trained to predict a document from the one before it.

Packing is next-fit in the given order (documents never split; one longer than the row is
truncated, as unpacked encoding does), which keeps the shuffle order of the stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def example_length(example: dict[str, np.ndarray]) -> int:
    """Tokens an encoded example really uses: up to its last trained token (0 if none)."""
    trained = np.flatnonzero(example["loss_mask"])
    return int(trained[-1]) + 1 if trained.size else 0


def pack_examples(
    encoded: Sequence[dict[str, np.ndarray]], seq_len: int, *, pad_id: int = 0
) -> list[dict[str, np.ndarray]]:
    """Pack encoded ``text`` / ``instruction`` examples into rows of ``seq_len + 1`` tokens.

    Examples with no trained token are dropped. Returns rows with ``tokens``, ``loss_mask``,
    ``segment_ids`` and ``positions`` (all ``int32 [seq_len + 1]``).
    """
    width = seq_len + 1
    rows: list[dict[str, np.ndarray]] = []
    row: dict[str, np.ndarray] | None = None
    used = segment = 0
    for example in encoded:
        if "tokens" not in example:
            raise ValueError("pack_examples packs text or instruction examples (tokens, loss_mask)")
        n = min(example_length(example), width)
        if n == 0:
            continue
        if row is None or used + n > width:
            row = {
                "tokens": np.full(width, pad_id, np.int32),
                "loss_mask": np.zeros(width, np.int32),
                "segment_ids": np.zeros(width, np.int32),
                "positions": np.zeros(width, np.int32),
            }
            rows.append(row)
            used = segment = 0
        segment += 1
        span = slice(used, used + n)
        row["tokens"][span] = example["tokens"][:n]
        row["loss_mask"][span] = example["loss_mask"][:n]
        row["loss_mask"][used] = 0
        row["segment_ids"][span] = segment
        row["positions"][span] = np.arange(n, dtype=np.int32)
        used += n
    if encoded and not rows:
        raise ValueError(
            f"pack_examples: no example has a trained token within seq_len={seq_len} "
            "(every response was truncated away); raise seq_len"
        )
    return rows


def packing_efficiency(rows: Sequence[dict[str, np.ndarray]]) -> float:
    """Share of row slots holding a document token (1.0 = no padding)."""
    if not rows:
        return 0.0
    filled = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    return filled / sum(r["segment_ids"].size for r in rows)
