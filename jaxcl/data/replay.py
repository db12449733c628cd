"""Replay as data: a reservoir buffer with per-task quotas, mixing schedules, pseudo-replay.

:class:`ReplayBuffer` keeps a uniform sample of every task's (tokenized) examples within one
capacity. Each task streams through its own reservoir (Vitter's algorithm R), and at the end of a
task every reservoir is trimmed to its quota, a uniformly drawn subset (a uniform subset of a
uniform sample is still uniform). Quotas split the capacity by

* ``equal``: the same share for every task seen;
* ``proportional``: shares proportional to how many examples each task had;
* ``inscl``: InsCL-style (Wang et al., 2024), shares proportional to how *dissimilar* each earlier
  task's instructions are to the upcoming task's. The dissimilarity is the cosine distance between
  mean hashed bag-of-words vectors of the instructions (or of embeddings from ``embed_fn``), a
  cheap stand-in for the paper's Wasserstein distance between instruction embeddings. As the
  shares depend on a task not seen yet, ``inscl`` stores up to ``capacity`` examples *per task*
  and the replay pool (``examples()``, ``dataset()``) draws ``capacity`` of them by the shares.

Shares are whole numbers (largest remainder), never above what a task has, with the rest handed
to the others. All randomness is a pure function of ``(seed, task, counter)``, so the buffer is
reproducible and its whole state is arrays plus JSON (:meth:`ReplayBuffer.state`).

Mixing follows a schedule ``step -> ratio`` (:func:`ratio_schedule`) through
:class:`jaxcl.data.pipeline.ReplayMix`. Pseudo-replay (LAMOL, Sun et al., 2020) replaces stored
examples by ones the model generates from each task's prompt prefix: :mod:`jaxcl.data.pseudo`
(its names are re-exported here); :meth:`ReplayBuffer.replace_examples` puts them in the buffer.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from jaxcl.data.pseudo import PseudoReplay as PseudoReplay
from jaxcl.data.pseudo import common_prefix as common_prefix
from jaxcl.data.pseudo import make_generate_fn as make_generate_fn
from jaxcl.data.pseudo import pseudo_replay as pseudo_replay
from jaxcl.spec import Strict

if TYPE_CHECKING:  # Grain loads when a dataset is asked for, not with the buffer
    import grain

QUOTAS = ("equal", "proportional", "inscl")
_DIM = 512


def allocate(capacity: int, weights: Sequence[float], limits: Sequence[int]) -> list[int]:
    """Split ``capacity`` in proportion to ``weights``, each share at most ``limits[i]``.

    Largest-remainder rounding; what a capped task cannot use goes to the others.
    """
    n = len(weights)
    quotas = [0] * n
    open_ = [i for i in range(n) if limits[i] > 0]
    left = min(capacity, sum(limits))
    while left > 0 and open_:
        total = sum(max(weights[i], 0.0) for i in open_)
        w = {i: (max(weights[i], 0.0) / total if total > 0 else 1 / len(open_)) for i in open_}
        raw = {i: left * w[i] for i in open_}
        share = {i: math.floor(raw[i]) for i in open_}
        for i in sorted(open_, key=lambda i: (-(raw[i] - share[i]), i))[
            : left - sum(share.values())
        ]:
            share[i] += 1
        capped = [i for i in open_ if quotas[i] + share[i] >= limits[i]]
        if not capped:
            for i in open_:
                quotas[i] += share[i]
            break
        for i in capped:  # fill capped tasks, re-split the remainder among the others
            left -= limits[i] - quotas[i]
            quotas[i] = limits[i]
        open_ = [i for i in open_ if i not in capped]
    return quotas


def instruction_vector(texts: Sequence[str], dim: int = _DIM) -> np.ndarray:
    """Mean L2-normalised hashed bag-of-words vector of some instructions."""
    out = np.zeros(dim, np.float64)
    for text in texts:
        v = np.zeros(dim, np.float64)
        for word in re.findall(r"\w+", text.lower()):
            v[zlib.crc32(word.encode()) % dim] += 1.0
        norm = np.linalg.norm(v)
        if norm:
            out += v / norm
    return out / max(len(texts), 1)


def dissimilarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine distance ``1 − cos(a, b)`` in [0, 2] (1 when either vector is zero)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if not na or not nb:
        return 1.0
    return float(1.0 - np.dot(a, b) / (na * nb))


def _rng(*key: int | str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in key])


class ReplayBuffer:
    """Reservoir samples of tokenized examples for every task, within ``capacity`` in all.

    Typical use, per task ``t`` of a stage::

        buffer.set_upcoming(instructions_of_task_t)   # inscl only: re-split for the new task
        pool = buffer.dataset()                         # mix with ReplayMix / batched_stream
        ... train on task t ...
        buffer.add_task(name_t, encoded_t, instructions=prompts_t)

    ``add_task`` is ``begin_task`` + ``add`` per example + ``end_task``, for streaming use.
    """

    def __init__(
        self,
        capacity: int,
        *,
        quota: Literal["equal", "proportional", "inscl"] = "equal",
        seed: int = 0,
        embed_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer: capacity must be >= 1, got {capacity}")
        if quota not in QUOTAS:
            raise ValueError(f"replay buffer: unknown quota {quota!r}; valid: {', '.join(QUOTAS)}")
        self.capacity, self.quota, self.seed = int(capacity), quota, int(seed)
        self.embed_fn = embed_fn
        self.tasks: list[str] = []
        self.seen: list[int] = []
        self.items: list[list[dict[str, np.ndarray]]] = []
        self.vectors: list[np.ndarray | None] = []
        self.upcoming: np.ndarray | None = None
        #: JSON-able notes per task name, kept in :meth:`state` (pseudo-replay keeps each
        #: finished task's generation prefix and separator, and its last generation's counts)
        self.notes: dict[str, dict[str, Any]] = {}
        self._open: int | None = None
        self._trims = 0

    # -- streaming -------------------------------------------------------------------------
    def begin_task(self, name: str, instructions: Sequence[str] | None = None) -> None:
        if self._open is not None:
            raise ValueError(f"replay buffer: task {self.tasks[self._open]!r} is still open")
        if name in self.tasks:
            raise ValueError(f"replay buffer: task {name!r} was already added")
        self.tasks.append(name)
        self.seen.append(0)
        self.items.append([])
        self.vectors.append(self._vector(instructions) if instructions else None)
        self._open = len(self.tasks) - 1

    def add(self, example: dict[str, np.ndarray]) -> None:
        """Offer one example of the open task to its reservoir (algorithm R)."""
        t = self._open
        if t is None:
            raise ValueError("replay buffer: call begin_task before add")
        self.seen[t] += 1
        slots = self.items[t]
        if len(slots) < self.capacity:  # every reservoir may hold up to the whole capacity
            slots.append(example)
            return
        j = int(_rng(self.seed, "reservoir", t, self.seen[t]).integers(self.seen[t]))
        if j < self.capacity:
            slots[j] = example

    def end_task(self) -> None:
        if self._open is None:
            raise ValueError("replay buffer: no open task")
        self._open = None
        self._rebalance()

    def add_task(
        self,
        name: str,
        examples: Sequence[dict[str, np.ndarray]],
        *,
        instructions: Sequence[str] | None = None,
    ) -> None:
        """Stream a whole task's examples into the buffer and re-split the quotas."""
        self.begin_task(name, instructions)
        for example in examples:
            self.add(example)
        self.end_task()

    def replace_examples(self, examples: Mapping[str, Sequence[dict[str, np.ndarray]]]) -> None:
        """Replace the stored examples of some finished tasks (e.g. by generated pseudo-examples),
        then re-split the quotas. A task's ``seen`` count becomes the number given."""
        if self._open is not None:
            raise ValueError(f"replay buffer: task {self.tasks[self._open]!r} is still open")
        for name, rows in examples.items():
            if name not in self.tasks:
                raise ValueError(f"replay buffer: unknown task {name!r} (have {self.tasks})")
            t = self.tasks.index(name)
            self.items[t], self.seen[t] = list(rows), len(rows)
        self._rebalance()

    # -- quotas ------------------------------------------------------------------------------
    def _vector(self, texts: Sequence[str]) -> np.ndarray:
        if self.embed_fn is not None:
            return np.asarray(self.embed_fn(list(texts)), np.float64).mean(axis=0)
        return instruction_vector(texts)

    def set_upcoming(self, instructions: Sequence[str]) -> None:
        """Declare the next task's instructions (``inscl``) and re-split the quotas for it."""
        self.upcoming = self._vector(instructions)
        self._rebalance()

    def weights(self) -> list[float]:
        if self.quota == "equal":
            return [1.0] * len(self.tasks)
        if self.quota == "proportional":
            return [float(s) for s in self.seen]
        if any(v is None for v in self.vectors):
            missing = [n for n, v in zip(self.tasks, self.vectors) if v is None]
            raise ValueError(
                f"replay buffer (inscl): tasks {missing} were added without instructions"
            )
        if self.upcoming is None:
            return [1.0] * len(self.tasks)
        # A small floor keeps a task identical to the upcoming one from vanishing entirely.
        return [max(dissimilarity(v, self.upcoming), 1e-3) for v in self.vectors]  # type: ignore[arg-type]

    def quotas(self) -> dict[str, int]:
        """The share of the capacity each task holds now."""
        limits = [len(x) for x in self.items]
        return dict(zip(self.tasks, allocate(self.capacity, self.weights(), limits)))

    def _rebalance(self) -> None:
        if self.quota == "inscl":  # storage stays per task; the pool is drawn in examples()
            return
        for t, q in enumerate(self.quotas().values()):
            slots = self.items[t]
            if len(slots) > q:
                self._trims += 1
                keep = np.sort(_rng(self.seed, "trim", t, self._trims).permutation(len(slots))[:q])
                self.items[t] = [slots[i] for i in keep]

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(x) for x in self.items)

    def stored(self, task: str | None = None) -> list[dict[str, np.ndarray]]:
        """Everything stored for one task, or for all tasks in task order."""
        if task is not None:
            return list(self.items[self.tasks.index(task)])
        return [e for slots in self.items for e in slots]

    def examples(self, task: str | None = None) -> list[dict[str, np.ndarray]]:
        """The replay pool: each task's quota of its stored examples, tasks in order.

        For ``equal`` / ``proportional`` that is everything stored; for ``inscl`` a seeded
        uniform subset of each task's store, of the task's current quota.
        """
        if self.quota != "inscl":
            return self.stored(task)
        pool = []
        for t, q in enumerate(self.quotas().values()):
            if task is not None and self.tasks[t] != task:
                continue
            slots = self.items[t]
            order = _rng(self.seed, "pool", t, len(self.tasks)).permutation(len(slots))[:q]
            pool += [slots[i] for i in np.sort(order)]
        return pool

    def dataset(self) -> grain.MapDataset:
        """The stored examples as a Grain ``MapDataset`` (task order, then slot order)."""
        import grain

        return grain.MapDataset.source(self.examples())

    # -- checkpointing ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """``{"meta": JSON-able dict, "arrays": {name: np.ndarray}}``, the whole buffer.

        ``arrays`` holds ``task_of`` (``[N]``), one stacked array per example field
        (``items.<field>``, ``[N, ...]``) and, for ``inscl``, ``vectors`` (``[T, D]``).
        """
        if self._open is not None:
            raise ValueError("replay buffer: end the open task before saving")
        flat = self.stored()
        keys = sorted(flat[0]) if flat else []
        arrays: dict[str, np.ndarray] = {
            "task_of": np.asarray([t for t, s in enumerate(self.items) for _ in s], np.int32)
        }
        for k in keys:
            try:
                arrays[f"items.{k}"] = np.stack([np.asarray(e[k]) for e in flat])
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"replay buffer: every stored example needs the same fields and shapes ({e})"
                ) from None
        vectors = [v is not None for v in self.vectors]
        if any(vectors):
            dim = next(v for v in self.vectors if v is not None).shape[0]
            arrays["vectors"] = np.stack(
                [v if v is not None else np.zeros(dim) for v in self.vectors]
            )
        if self.upcoming is not None:
            arrays["upcoming"] = np.asarray(self.upcoming)
        meta = {
            "version": 1,
            "capacity": self.capacity,
            "quota": self.quota,
            "seed": self.seed,
            "tasks": list(self.tasks),
            "seen": list(self.seen),
            "has_vector": vectors,
            "trims": self._trims,
            "fields": keys,
            "stored": len(flat),  # 0: no arrays to save (orbax refuses zero-size arrays)
            "notes": self.notes,
        }
        return {"meta": meta, "arrays": arrays}

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        embed_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> ReplayBuffer:
        """Rebuild a buffer from :meth:`state` (after a checkpoint round trip). ``arrays`` may be
        None for a buffer that stored no example (its tasks and notes are in ``meta``)."""
        meta, arrays = state["meta"], state.get("arrays") or {}
        if meta.get("version") != 1:
            raise ValueError(f"replay buffer state: unknown version {meta.get('version')!r}")
        buf = cls(meta["capacity"], quota=meta["quota"], seed=meta["seed"], embed_fn=embed_fn)
        buf.tasks, buf.seen, buf._trims = list(meta["tasks"]), list(meta["seen"]), meta["trims"]
        buf.notes = {k: dict(v) for k, v in meta.get("notes", {}).items()}
        task_of = np.asarray(arrays.get("task_of", np.zeros(0, np.int32)))
        buf.items = [[] for _ in buf.tasks]
        for i, t in enumerate(task_of.tolist()):
            buf.items[t].append({k: np.asarray(arrays[f"items.{k}"][i]) for k in meta["fields"]})
        buf.vectors = [
            np.asarray(arrays["vectors"][t]) if has else None
            for t, has in enumerate(meta["has_vector"])
        ]
        buf.upcoming = np.asarray(arrays["upcoming"]) if "upcoming" in arrays else None
        return buf


# -- mixing schedules ----------------------------------------------------------------------------


class RatioScheduleSpec(Strict):
    """A replay ratio over the steps of a task: ``constant``, ``linear``, ``cosine``
    (from ``start`` to ``end`` over ``steps``, then held) or ``piecewise`` (``values[i]`` from
    step ``boundaries[i-1]`` on; ``len(values) == len(boundaries) + 1``)."""

    kind: Literal["constant", "linear", "cosine", "piecewise"] = "constant"
    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(0.0, ge=0, le=1)
    steps: int = Field(1, ge=1)
    boundaries: list[int] = []
    values: list[float] = []

    def build(self) -> Callable[[int], float]:
        return ratio_schedule(
            self.kind,
            start=self.start,
            end=self.end,
            steps=self.steps,
            boundaries=self.boundaries,
            values=self.values,
        )


def ratio_schedule(
    kind: str = "constant",
    *,
    start: float = 0.0,
    end: float = 0.0,
    steps: int = 1,
    boundaries: Sequence[int] = (),
    values: Sequence[float] = (),
) -> Callable[[int], float]:
    """A pure ``step -> replay ratio`` function (see :class:`RatioScheduleSpec`)."""
    for v in (start, end, *values):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"replay schedule: ratios must lie in [0, 1], got {v}")
    if kind == "constant":
        return lambda step: float(start)
    if kind in ("linear", "cosine"):

        def ramp(step: int) -> float:
            x = min(max(step, 0) / steps, 1.0)
            if kind == "cosine":
                x = (1 - math.cos(math.pi * x)) / 2
            return float(start + (end - start) * x)

        return ramp
    if kind == "piecewise":
        if len(values) != len(boundaries) + 1 or list(boundaries) != sorted(boundaries):
            raise ValueError(
                "replay schedule (piecewise): need sorted boundaries and one more value than "
                f"boundaries, got boundaries={list(boundaries)}, values={list(values)}"
            )
        bounds = np.asarray(boundaries)
        return lambda step: float(values[int(np.searchsorted(bounds, step, side="right"))])
    raise ValueError(
        f"unknown replay schedule {kind!r}; valid: constant, linear, cosine, piecewise"
    )
