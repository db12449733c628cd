"""A task's training rows as a lazy, packed, sharded and checkpointable stream of batches.

The documents of a task are read by index from a random-access source (file offsets, Parquet
row groups, ArrayRecord shards), tokenized inside a Grain pipeline on worker threads, and cut
into rows of ``seq_len + 1`` tokens by one of three packings:

``none``
    one document per row, right-truncated and padded (the end of a long document is dropped).
``concat``
    documents joined (each ``bos? doc eos``) into one token stream ``S`` cut into rows that
    overlap by one token: row ``k`` holds ``S[kL : kL + L + 1]``, so every token but the first
    of ``S`` is a target exactly once and nothing is dropped. One epoch trains on the corpus's
    tokens plus one eos per document.
``segments``
    whole documents side by side (next-fit, in stream order) with ``segment_ids`` and
    ``positions`` restarting at each document, so attention stays inside a document and each
    one gets the logits it gets alone; a document longer than a row continues in the next row,
    again overlapping by one token.

The document order is Grain's index shuffle, seeded, fresh every epoch, and endless; a process
of ``P`` reads only the documents at global positions ``p, p + P, p + 2P, ...``. The stream's
place is a small JSON state (next document, offset into it, counters), saved with every
checkpoint, so a run resumes on the very row it stopped before.

Replay mixes rows of a memory pool into the batch: slot ``g`` of the global row sequence is a
memory row when ``u_g < ratio`` (``u_g`` drawn from ``(seed, g)``, as
:class:`~jaxcl.data.pipeline.ReplayMix`), and the task's row of that slot is dropped; so with
``packing: none`` row ``g`` is a pure function of ``g``, the same on any number of processes.

Sharding: with ``P`` processes each global batch of ``B`` rows is ``P`` blocks of ``b = B / P``
rows, process ``p`` holding block ``p``. Under ``packing: none`` process ``p`` reads the
documents of its slots (global position ``g = k·B + p·b + r`` for its row ``r`` of step ``k``),
so a run's batches do not depend on ``P``. Under ``concat`` and ``segments`` process ``p``
reads every ``P``-th document (``g = q·P + p``) and packs them on its own: the processes read
disjoint documents whose union is the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import grain
import numpy as np

from jaxcl.data.pipeline import encode_all, encode_documents
from jaxcl.data.sources import BadRowError

PACKINGS = ("none", "concat", "segments")
Packing = Literal["none", "concat", "segments"]
#: Grain read options of the tokenizing pipeline: threads and the look-ahead (in documents)
READ_THREADS, READ_AHEAD = 4, 256


@dataclass(frozen=True)
class Skipped:
    """A row of the source that could not be read (``on_bad_row: skip``), and why."""

    where: str
    reason: str


class DocumentSource(Protocol):
    """Random access to a task's documents: ``(ids, mask)`` pairs (text and instruction data),
    encoded row dicts (preference pairs), or :class:`Skipped`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


@dataclass
class StreamState:
    """Where a stream stands: the next row starts at token ``offset`` of the document at local
    position ``doc`` of this process's endless document order. Counters: rows emitted,
    replayed slots, trained target tokens, skipped bad rows (and the first few places),
    truncated documents (``packing: none``)."""

    doc: int = 0
    offset: int = 0
    rows: int = 0
    replayed: int = 0
    tokens: int = 0
    skipped: int = 0
    truncated: int = 0
    bad_rows: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamState:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class DocumentOrder:
    """This process's endless order of document indices ``0..n-1``: Grain's seeded index
    shuffle, a fresh one each epoch, read at global positions ``g(q) = ⌊q / b⌋ · bP + p·b +
    (q mod b)`` for the process's ``q``-th document (``b`` = block: the local batch under
    ``packing: none``, 1 otherwise)."""

    def __init__(self, n: int, seed: int, shard: tuple[int, int] = (0, 1), block: int = 1):
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {shard}: need 0 <= process_index < process_count")
        if n < 1:
            raise ValueError("a task has no training examples")
        self.n, self.index, self.count, self.block = n, index, count, max(1, block)
        self._order = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)

    def position(self, q: int) -> int:
        b = self.block
        return (q // b) * b * self.count + self.index * b + q % b

    def __len__(self) -> int:
        return (2**62) // self.count

    def below(self, documents: int | None) -> int | None:
        """How many of this process's positions fall under global position ``documents`` (the
        documents it reads of an epoch budget; None: endless)."""
        if documents is None:
            return None
        lo, hi = 0, documents + 1  # g(q) >= q, so the count is at most ``documents``
        while lo < hi:
            mid = (lo + hi) // 2
            if self.position(mid) < documents:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def __getitem__(self, q: int) -> int:
        return int(self._order[self.position(int(q))])


def _empty_row(width: int, pad: int, packed: bool) -> dict[str, np.ndarray]:
    row = {
        "tokens": np.full(width, pad, np.int32),
        "loss_mask": np.zeros(width, np.float32),
    }
    if packed:
        row["segment_ids"] = np.zeros(width, np.int32)
        row["positions"] = np.zeros(width, np.int32)
    return row


class RowStream:
    """Rows of one task from ``(position, document)`` pairs, by the stream's packing.

    ``documents(start)`` yields ``(q, doc)`` from local position ``start`` on (a Grain iterator
    over :class:`DocumentOrder` mapped through the source). ``limit`` (local documents) ends the
    stream after that many documents (epoch budgets); rows after the end are empty (mask 0).
    """

    def __init__(
        self,
        documents: Callable[[int], Iterator[tuple[int, Any]]],
        *,
        packing: Packing,
        seq_len: int,
        pad_id: int,
        limit: int | None = None,
        state: StreamState | None = None,
    ) -> None:
        if packing not in PACKINGS:
            raise ValueError(f"packing: unknown {packing!r}; valid: {', '.join(PACKINGS)}")
        self.documents, self.packing, self.width = documents, packing, seq_len + 1
        self.pad, self.limit = pad_id, limit
        self.state = state or StreamState()
        self._it: Iterator[tuple[int, Any]] | None = None
        self._current: tuple[int, Any] | None = None  # the document at ``state.doc``, once read
        self._template: dict[str, np.ndarray] | None = None  # a preference row's layout

    # -- documents -------------------------------------------------------------------------
    def _count_skipped(self, doc: Skipped) -> None:
        self.state.skipped += 1
        if len(self.state.bad_rows) < 20:
            self.state.bad_rows.append(f"{doc.where}: {doc.reason}")

    def _doc(self, skip: bool = True) -> Any | None:
        """The document at ``state.doc`` (bad rows skipped unless ``skip`` is False), or None
        past the limit."""
        while True:
            q = self.state.doc
            if self.limit is not None and q >= self.limit:
                return None
            if self._current is not None and self._current[0] == q:
                doc = self._current[1]
            else:
                if self._it is None:
                    self._it = self.documents(q)
                got, doc = next(self._it)
                if got != q:  # the pipeline must deliver positions in order
                    raise RuntimeError(f"document stream out of order: wanted {q}, got {got}")
                self._current = (q, doc)
            if isinstance(doc, Skipped) and skip:
                self._count_skipped(doc)
                self._advance_doc()
                continue
            return doc

    def _advance_doc(self) -> None:
        self.state.doc += 1
        self.state.offset = 0

    # -- rows ------------------------------------------------------------------------------
    def next_row(self) -> dict[str, np.ndarray]:
        """The next row (an empty one, all mask 0, once the stream has ended)."""
        if self.packing == "none":
            row = self._row_none()
        elif self.packing == "concat":
            row = self._row_concat()
        else:
            row = self._row_segments()
        self.state.rows += 1
        return row

    def _row_none(self) -> dict[str, np.ndarray]:
        # one document position per row, bad or not, so that row g stays a function of g
        doc = self._doc(skip=False)
        if doc is None or isinstance(doc, Skipped):
            if doc is not None:
                self._count_skipped(doc)
                self._advance_doc()
            if self._template is not None:  # an empty preference pair: every mask 0
                return {k: np.zeros_like(v) for k, v in self._template.items()}
            return _empty_row(self.width, self.pad, packed=False)
        self._advance_doc()
        if isinstance(doc, dict):  # a preference pair, already a fixed row
            self._template = doc
            return doc
        ids, mask = doc
        if len(ids) > self.width:
            self.state.truncated += 1
        row = _empty_row(self.width, self.pad, packed=False)
        n = min(len(ids), self.width)
        row["tokens"][:n], row["loss_mask"][:n] = ids[:n], mask[:n]
        return row

    def _row_concat(self) -> dict[str, np.ndarray]:
        row = _empty_row(self.width, self.pad, packed=False)
        used, last = 0, None
        while used < self.width:
            doc = self._doc()
            if doc is None:
                break
            ids, mask = _pair(doc)
            o = self.state.offset
            take = min(len(ids) - o, self.width - used)
            row["tokens"][used : used + take] = ids[o : o + take]
            row["loss_mask"][used : used + take] = mask[o : o + take]
            used += take
            last = (self.state.doc, o + take - 1)
            if o + take == len(ids):
                self._advance_doc()
            else:
                self.state.offset = o + take
        row["loss_mask"][0] = 0.0  # the overlap token: the previous row's last target
        if last is not None and used == self.width:
            # the next row starts at this row's last token (overlap by one)
            self._seek(*last)
        if used <= 1:  # nothing left to predict
            row["loss_mask"][:] = 0.0
        return row

    def _row_segments(self) -> dict[str, np.ndarray]:
        row = _empty_row(self.width, self.pad, packed=True)
        used = segment = 0
        while used < self.width:
            doc = self._doc()
            if doc is None:
                break
            ids, mask = _pair(doc)
            o = self.state.offset
            rest = len(ids) - o
            if rest > self.width - used and used > 0:
                break  # next-fit: the document starts the next row
            take = min(rest, self.width - used)
            segment += 1
            span = slice(used, used + take)
            row["tokens"][span] = ids[o : o + take]
            row["loss_mask"][span] = mask[o : o + take]
            row["loss_mask"][used] = 0.0  # a segment's first token has no context in the row
            row["segment_ids"][span] = segment
            row["positions"][span] = np.arange(o, o + take, dtype=np.int32)
            used += take
            if take == rest:
                self._advance_doc()
            else:  # a long document continues in the next row from this piece's last token
                self._seek(self.state.doc, o + take - 1)
        return row

    def _seek(self, doc: int, offset: int) -> None:
        if offset >= self._length(doc):
            self.state.doc, self.state.offset = doc + 1, 0
        else:
            self.state.doc, self.state.offset = doc, offset

    def _length(self, doc: int) -> int:
        assert self._current is not None and self._current[0] == doc
        return len(_pair(self._current[1])[0])

    def close(self) -> None:
        self._it = None


def _as_segment(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An unpacked row (a memory's) as one segment, so that it batches with packed rows."""
    if "segment_ids" in row:
        return row
    width = row["tokens"].shape[0]
    return {
        **row,
        "segment_ids": np.ones(width, np.int32),
        "positions": np.arange(width, dtype=np.int32),
    }


def _pair(doc: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(doc, dict):
        raise ValueError("packing: preference pairs cannot be packed; use packing: none")
    return doc


class TaskStream:
    """Batches of ``batch_size`` global rows (this process's ``batch_size / P`` of them), with
    a memory ``pool`` mixed in at ``ratio``; :meth:`state` / :meth:`restore` checkpoint it.

    ``annotate(rows)`` (optional) adds fields to the task's rows before they are batched (the
    reference log-probs of ``reference.logps: precomputed``).
    """

    def __init__(
        self,
        rows: RowStream,
        *,
        batch_size: int,
        shard: tuple[int, int] = (0, 1),
        pool: Sequence[dict[str, np.ndarray]] | None = None,
        ratio: float | Callable[[int], float] = 0.0,
        seed: int = 0,
        annotate: Callable[[list], list] | None = None,
    ) -> None:
        index, count = shard
        if batch_size % count:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the process count {count}"
            )
        self.rows, self.batch_size, self.shard = rows, batch_size, shard
        self.local = batch_size // count
        self.pool = list(pool or [])
        self.ratio, self.seed, self.annotate = ratio, int(seed), annotate
        self.step = 0

    def _ratio(self, step: int) -> float:
        r = float(self.ratio(step)) if callable(self.ratio) else float(self.ratio)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"replay ratio {r} at step {step} is outside [0, 1]")
        return r

    def _replayed(self, g: int, ratio: float) -> int | None:
        """The memory row slot ``g`` takes, or None (the draw of :class:`ReplayMix`)."""
        if not self.pool or ratio <= 0.0:
            return None
        rng = np.random.default_rng([self.seed, g])
        u, j = float(rng.random()), int(rng.integers(len(self.pool)))
        return j if u < ratio else None

    def next_batch(self) -> dict[str, np.ndarray]:
        index, count = self.shard
        ratio = self._ratio(self.step)
        slots: list[Any] = []
        own: list[int] = []
        state = self.rows.state
        for r in range(self.local):
            g = self.step * self.batch_size + index * self.local + r
            row = self.rows.next_row()  # the slot's own row, dropped when replayed
            j = self._replayed(g, ratio)
            if j is None:
                own.append(len(slots))
                slots.append(row)
                state.tokens += int(row.get("loss_mask", row.get("chosen_mask", 0)).sum())
            else:
                state.replayed += 1
                slots.append(self.pool[j])
        if self.annotate is not None and own:
            done = self.annotate([slots[i] for i in own])
            for i, row in zip(own, done):
                slots[i] = row
        self.step += 1
        if any("segment_ids" in row for row in slots):
            slots = [_as_segment(row) for row in slots]
        return {k: np.stack([row[k] for row in slots]) for k in slots[0]}

    def state(self) -> dict[str, Any]:
        return {"step": self.step, **self.rows.state.to_json()}

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.rows.state = StreamState.from_json(state)
        self.rows.close()


def pipeline(
    source: DocumentSource,
    order: grain.MapDataset,
    *,
    threads: int = READ_THREADS,
    read_ahead: int = READ_AHEAD,
) -> Callable[[int], Iterator[tuple[int, Any]]]:
    """``start -> iterator of (q, source[order[q]])`` for ``q = start, start + 1, ...``: the
    documents read and tokenized by Grain on ``threads`` threads, ``read_ahead`` ahead."""

    def read(q: int) -> tuple[int, Any]:
        return q, source[int(order[q])]

    def documents(start: int) -> Iterator[tuple[int, Any]]:
        ds = grain.MapDataset.range(start, len(order)).map(read)
        if threads <= 0:
            return iter(ds[i] for i in range(len(ds)))
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=read_ahead)
        return iter(ds.to_iter_dataset(options))

    return documents


class TokenizedDocuments:
    """A :class:`DocumentSource` over random-access examples: row ``rows[i]`` of ``examples``
    encoded as a whole document (:func:`~jaxcl.data.pipeline.encode_documents`), or as a fixed
    row for preference pairs. A bad record raises, or with ``skip`` becomes :class:`Skipped`."""

    def __init__(
        self,
        examples: Any,
        kind: str,
        tokenizer: Any,
        *,
        seq_len: int,
        rows: Any = None,
        skip: bool = False,
    ) -> None:
        self.examples, self.kind, self.tokenizer = examples, kind, tokenizer
        self.seq_len, self.rows, self.skip = seq_len, rows, skip

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.examples)

    def __getitem__(self, i: int) -> Any:
        r = int(self.rows[i]) if self.rows is not None else int(i)
        try:
            example = self.examples[r]
            if self.kind == "preference":
                return encode_all([example], self.kind, self.tokenizer, self.seq_len)[0]
            return encode_documents([example], self.kind, self.tokenizer)[0]
        except BadRowError as e:
            if not self.skip:
                raise
            return Skipped(e.where, str(e).removeprefix(f"{e.where}: "))


class PreparedDocuments:
    """A :class:`DocumentSource` over prepared shards (``jaxcl prepare``), rows mapped by
    ``rows``; a row skipped at preparation comes back as :class:`Skipped`."""

    def __init__(self, prepared: Any, kind: str, *, rows: Any = None) -> None:
        self.prepared, self.kind, self.rows = prepared, kind, rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.prepared)

    def __getitem__(self, i: int) -> Any:
        r = int(self.rows[i]) if self.rows is not None else int(i)
        doc = self.prepared[r]
        if doc is None:
            return Skipped(self.prepared.where(r), "skipped when prepared (on_bad_row: skip)")
        return doc

    def lengths(self) -> np.ndarray | None:
        """Every document's token count, from the shards' manifest (no document is read)."""
        lengths = self.prepared.lengths()
        if lengths is None or self.rows is None:
            return lengths
        rows = self.rows.indices() if hasattr(self.rows, "indices") else np.asarray(self.rows)
        return lengths[rows]


def make_task_stream(
    docs: DocumentSource,
    *,
    packing: Packing,
    seq_len: int,
    batch_size: int,
    seed: int,
    pad_id: int = 0,
    budget: Any = None,
    shard: tuple[int, int] = (0, 1),
    pool: Sequence[dict[str, np.ndarray]] | None = None,
    ratio: float | Callable[[int], float] = 0.0,
    annotate: Callable[[list], list] | None = None,
    threads: int = READ_THREADS,
) -> TaskStream:
    """A task's batches on process ``shard``: documents of ``docs`` in a seeded order, packed
    into rows, ``pool`` rows mixed in at ``ratio``; ``budget`` (a
    :class:`~jaxcl.data.budget.Budget`) ends an epoch budget's stream after its documents."""
    block = batch_size // shard[1] if packing == "none" else 1
    order = DocumentOrder(len(docs), seed, shard, block=block)
    limit = order.below(getattr(budget, "documents", None))
    rows = RowStream(
        pipeline(docs, order, threads=threads),
        packing=packing,
        seq_len=seq_len,
        pad_id=pad_id,
        limit=limit,
    )
    return TaskStream(
        rows,
        batch_size=batch_size,
        shard=shard,
        pool=pool,
        ratio=ratio,
        seed=seed + 7919,
        annotate=annotate,
    )


class TaskRows:
    """A task's own rows in training order, lazily: ``len`` rows from a fresh
    :class:`RowStream` each time it is iterated (what hooks see as ``ctx.task.examples``;
    the memory samples them by algorithm R as they stream by)."""

    def __init__(self, make_rows: Callable[[], RowStream], length: int) -> None:
        self.make_rows, self.length = make_rows, int(length)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rows = self.make_rows()
        for _ in range(self.length):
            yield rows.next_row()
        rows.close()
