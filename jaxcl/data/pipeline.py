"""Tokenized examples and Grain pipelines that turn them into fixed-shape batches.

An encoded example holds ``seq_len + 1`` token ids (inputs are ``tokens[:-1]``, targets
``tokens[1:]``) and a loss mask of the same length that is 1 where the token is a training
target: the whole text for CPT, only the response (and its eos) for CIT and preference pairs.
Sequences are right-padded with the pad id and right-truncated (the policy, stated here: the end of
an over-long example is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np


class Tokenizer(Protocol):
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


def _pack(prefix: list[int], target: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = (prefix + target)[: seq_len + 1]
    mask = ([0] * len(prefix) + [1] * len(target))[: seq_len + 1]
    tokens = np.zeros(seq_len + 1, np.int32)
    loss_mask = np.zeros(seq_len + 1, np.float32)
    tokens[: len(ids)] = ids
    loss_mask[: len(mask)] = mask
    return tokens, loss_mask


def _field(example: dict[str, Any], name: str, kind: str) -> str:
    try:
        value = example[name]
    except KeyError:
        raise ValueError(
            f"a {kind} example needs the field {name!r}; it has {sorted(example)}"
        ) from None
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} of a {kind} example must be a string, got {value!r}")
    return value


def encode_example(
    example: dict[str, Any], kind: str, tokenizer: Tokenizer, seq_len: int
) -> dict[str, np.ndarray]:
    """Encode one ``text``, ``instruction`` or ``preference`` example to fixed-size arrays."""
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    if kind == "text":
        tokens, mask = _pack(bos, tokenizer.encode(_field(example, "text", kind)) + eos, seq_len)
        return {"tokens": tokens, "loss_mask": mask}
    if kind == "instruction":
        prompt = bos + tokenizer.encode(_field(example, "prompt", kind))
        response = tokenizer.encode(_field(example, "response", kind)) + eos
        tokens, mask = _pack(prompt, response, seq_len)
        return {"tokens": tokens, "loss_mask": mask}
    if kind == "preference":
        prompt = bos + tokenizer.encode(_field(example, "prompt", kind))
        out = {}
        for side in ("chosen", "rejected"):
            tokens, mask = _pack(
                prompt, tokenizer.encode(_field(example, side, kind)) + eos, seq_len
            )
            out[f"{side}_tokens"], out[f"{side}_mask"] = tokens, mask
        return out
    raise ValueError(f"unknown example kind {kind!r}; valid kinds: text, instruction, preference")


def encode_all(
    examples: Sequence[dict[str, Any]], kind: str, tokenizer: Tokenizer, seq_len: int
) -> list[dict[str, np.ndarray]]:
    return [encode_example(e, kind, tokenizer, seq_len) for e in examples]


class ReplayMix(grain.MapDataset):
    """Replay as a Grain op: element ``i`` comes from ``replay`` with probability ``ratio``.

    The draw is a pure function of ``(seed, i)``, so the mixed stream is random-access,
    deterministic and resumable: element ``i`` is ``replay[j]`` (``j`` uniform, with replacement)
    when ``u_i < ratio`` and ``current[i]`` otherwise. Over ``n`` elements the replayed fraction
    concentrates around ``ratio`` with standard deviation ``sqrt(ratio (1 − ratio) / n)``.
    """

    def __init__(
        self, current: grain.MapDataset, replay: grain.MapDataset, ratio: float, seed: int
    ) -> None:
        super().__init__([current, replay])
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"replay ratio must lie in [0, 1], got {ratio}")
        if len(replay) == 0 and ratio > 0:
            raise ValueError("replay: the replay pool is empty")
        self._current, self._replay = current, replay
        self._ratio, self._seed = float(ratio), int(seed)

    def __len__(self) -> int:
        return len(self._current)

    def is_replayed(self, index: int) -> bool:
        return bool(self._draw(index)[0] < self._ratio)

    def _draw(self, index: int) -> tuple[float, int]:
        rng = np.random.default_rng([self._seed, index])
        return float(rng.random()), int(rng.integers(max(len(self._replay), 1)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        u, j = self._draw(index)
        return self._replay[j] if u < self._ratio else self._current[index]

    def __str__(self) -> str:
        return f"ReplayMix(ratio={self._ratio}, seed={self._seed})"


def batched_stream(
    encoded: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    num_batches: int,
    seed: int,
    replay: Sequence[dict[str, np.ndarray]] | None = None,
    replay_ratio: float = 0.0,
) -> grain.MapDataset:
    """A random-access Grain dataset of exactly ``num_batches`` batches.

    The task's examples are shuffled with ``seed`` afresh each epoch and repeated as needed;
    with a replay pool, :class:`ReplayMix` swaps in earlier tasks' examples at ``replay_ratio``.
    Batch ``k`` is ``ds[k]``, so resuming at step ``k`` is just indexing.
    """
    if not encoded:
        raise ValueError("a task has no training examples")
    needed = batch_size * num_batches
    epochs = -(-needed // len(encoded))
    ds = grain.MapDataset.source(list(encoded)).shuffle(seed=seed).repeat(epochs)
    if replay and replay_ratio > 0:
        pool = grain.MapDataset.source(list(replay))
        ds = ReplayMix(ds, pool, replay_ratio, seed=seed + 7919)
    return ds[:needed].batch(batch_size, drop_remainder=True)


def eval_batches(
    encoded: Sequence[dict[str, np.ndarray]], batch_size: int
) -> list[dict[str, np.ndarray]]:
    """The eval set in order, padded to whole batches; ``valid`` marks the real rows."""
    n = len(encoded)
    padded = list(encoded) + [encoded[-1]] * ((-n) % batch_size)
    ds = grain.MapDataset.source(padded).batch(batch_size)
    out = []
    for k in range(len(ds)):
        batch = dict(ds[k])
        rows = np.arange(k * batch_size, (k + 1) * batch_size)
        batch["valid"] = (rows < n).astype(np.float32)
        out.append(batch)
    return out
