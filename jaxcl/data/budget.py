"""A task's training budget in steps, from ``steps``, ``epochs`` or ``tokens``.

* ``steps: S``: ``S`` steps.
* ``tokens: N``: ``⌈N / (B · L)⌉`` steps, a step being ``B`` rows of ``L = seq_len`` input
  positions.
* ``epochs: E``: the steps that read ``D = ⌈E · n⌉`` documents of the task's ``n`` (in the
  stream's shuffled order, a fresh order each epoch), rounded up to whole batches; the last
  batch is completed with empty rows (loss mask 0). The rows those documents make depend on the
  packing: one per document (``none``), ``⌈(T − 1) / L⌉`` for ``T`` stream tokens (``concat``,
  rows overlap by one token), or as many as next-fit packing fills (``segments``, counted by
  running the packer over the documents' lengths). ``concat`` and ``segments`` need every
  document's length: read from ``jaxcl prepare``'s shards, or counted by one pass over the
  task's documents (tokenized by the same pipeline) and kept in the run folder
  (``OUT_DIR/cache/``), so a resumed run or a second dry run does not count again.

Replayed rows take their share of the steps: a budget sets the steps, and with replay at ratio
``r`` about ``r`` of every batch holds memory rows instead of the task's.

With ``P`` processes, each reads every ``P``-th document; the steps are the largest any process
needs, so all processes run the same number of steps (those with fewer rows pad with empty
rows).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxcl.data.stream import (
    DocumentOrder,
    RowStream,
    Skipped,
    StreamState,
    pipeline,
)


@dataclass(frozen=True)
class Budget:
    """``steps`` of a task, the tokens they feed (``steps · B · L``), the global documents an
    epoch budget reads (``documents``, None for an endless stream), and the rows of one epoch
    when known (per process)."""

    steps: int
    tokens: int
    documents: int | None = None
    epoch_rows: int | None = None
    given: str = "steps"


def document_lengths(docs: Any, threads: int = 4, *, cache: Path | None = None) -> np.ndarray:
    """Every document's token count (0 for a skipped bad row): from ``jaxcl prepare``'s
    shards when ``docs`` has them, else from ``cache`` (a ``.npy`` file written by an earlier
    count of the same documents), else by one pass of the pipeline (then saved to ``cache``)."""
    known = docs.lengths() if hasattr(docs, "lengths") else None
    if known is not None:
        return known
    if cache is not None and cache.is_file():
        try:
            cached = np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            cached = None  # a damaged cache is counted again and rewritten
        if cached is not None and cached.shape == (len(docs),):
            return cached
    lengths = _count_lengths(docs, threads)
    if cache is not None:
        _save_atomically(cache, lengths)
    return lengths


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """``array`` to ``path`` whole or not at all (a cache may be missing, never torn)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.save(f, array, allow_pickle=False)
        os.replace(f.name, path)
    except OSError:  # an unwritable folder: the count is only not kept
        pass


def _count_lengths(docs: Any, threads: int) -> np.ndarray:
    n = len(docs)
    order = _identity(n)
    read = pipeline(docs, order, threads=threads)
    lengths = np.zeros(n, np.int64)
    for q, doc in read(0):
        if not isinstance(doc, Skipped):
            lengths[q] = len(doc[0]) if not isinstance(doc, dict) else 1
    return lengths


class _identity:
    """``order[q] = q`` for ``q < n`` (the counting pass reads documents in file order)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, q: int) -> int:
        return int(q)


def _process_rows(
    lengths: np.ndarray,
    *,
    docs: int,
    seed: int,
    count: int,
    packing: str,
    seq_len: int,
) -> list[int]:
    """Rows each of ``count`` processes makes of the first ``docs`` global document positions."""
    order = DocumentOrder(len(lengths), seed)
    per_doc = [[] for _ in range(count)]
    for g in range(docs):
        per_doc[g % count].append(int(lengths[int(order[g])]))
    rows = []
    for lens in per_doc:
        if packing == "concat":
            total = int(sum(lens))
            rows.append(math.ceil((total - 1) / seq_len) if total > 1 else 0)
        else:
            rows.append(_segment_rows(lens, seq_len))
    return rows


def _segment_rows(lengths: list[int], seq_len: int) -> int:
    """Rows :class:`RowStream`'s next-fit packing makes of documents of these lengths (the
    packer itself, run on zero documents of the same lengths)."""
    docs = [np.zeros(n, np.int32) for n in lengths if n > 0]
    if not docs:
        return 0

    def documents(start: int):
        return ((q, (docs[q], docs[q].astype(np.int8))) for q in range(start, len(docs)))

    rows = RowStream(
        documents,
        packing="segments",
        seq_len=seq_len,
        pad_id=0,
        limit=len(docs),
        state=StreamState(),
    )
    n = 0
    while rows.state.doc < len(docs):
        rows.next_row()
        n += 1
    return n


def task_budget(
    task: Any,
    default_steps: int,
    *,
    docs: Any,
    packing: str,
    batch_size: int,
    seq_len: int,
    seed: int,
    process_count: int = 1,
    lengths_cache: Path | None = None,
) -> Budget:
    """The budget of ``task`` (a :class:`~jaxcl.recipe.TaskSpec`) over its documents ``docs``;
    an epoch count of packed rows keeps the documents' lengths in ``lengths_cache``."""
    local = batch_size // process_count
    per_step = batch_size * seq_len
    known = None
    if task.tokens is not None:
        steps = max(1, math.ceil(task.tokens / per_step))
        return Budget(steps, steps * per_step, None, known, "tokens")
    if task.epochs is None:
        steps = task.steps if task.steps is not None else default_steps
        return Budget(steps, steps * per_step, None, known, "steps")
    n = len(docs)
    total = math.ceil(task.epochs * n)
    if packing == "none":  # row g is document position g: the slots up to D
        steps = max(1, -(-total // batch_size))
        return Budget(steps, steps * per_step, total, known, "epochs")
    else:
        lengths = document_lengths(docs, cache=lengths_cache)
        rows = _process_rows(
            lengths, docs=total, seed=seed, count=process_count, packing=packing, seq_len=seq_len
        )
        if task.epochs == 1:
            known = max(rows)
    steps = max(1, max(-(-r // local) for r in rows))
    return Budget(steps, steps * per_step, total, known, "epochs")
