"""Tokenized examples and Grain pipelines that turn them into fixed-shape batches.

An encoded example holds ``seq_len + 1`` token ids (inputs are ``tokens[:-1]``, targets
``tokens[1:]``) and a loss mask of the same length that is 1 where the token is a training
target: the whole text for CPT, only the response (and its eos) for CIT and preference pairs.
Sequences are right-padded with the pad id and right-truncated (the policy, stated here: the end of
an over-long example is dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from jaxcl.data.tokenize import check_messages, encode_chat, special_ids, token_ids

KINDS = ("text", "instruction", "preference")


class Tokenizer(Protocol):
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


def _pack(
    prefix: list[int], target: list[int], seq_len: int | None, pad: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    return _fixed(prefix + target, [0] * len(prefix) + [1] * len(target), seq_len, pad)


def _fixed(
    ids: list[int], mask: list[int], seq_len: int | None, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    if seq_len is None:  # a whole document: neither cut nor padded
        return np.asarray(ids, np.int32), np.asarray(mask, np.int8)
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    tokens = np.full(seq_len + 1, pad, np.int32)
    loss_mask = np.zeros(seq_len + 1, np.float32)
    tokens[: len(ids)] = ids
    loss_mask[: len(mask)] = mask
    return tokens, loss_mask


def _field(example: dict[str, Any], name: str, kind: str, where: str = "") -> str:
    at = f"{where}: " if where else ""
    try:
        value = example[name]
    except (KeyError, TypeError):
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(f"{at}a {kind} example needs the field {name!r}; it has {keys}") from None
    if not isinstance(value, str):
        raise ValueError(f"{at}field {name!r} of a {kind} example must be a string, got {value!r}")
    return value


def encode_example(
    example: dict[str, Any], kind: str, tokenizer: Tokenizer, seq_len: int
) -> dict[str, np.ndarray]:
    """Encode one ``text``, ``instruction`` or ``preference`` example to fixed-size arrays.

    An instruction example is either ``{prompt, response}`` or ``{messages: [{role, content}]}``
    (a chat, rendered with the tokenizer's chat template; only assistant tokens are trained).
    """
    return encode_all([example], kind, tokenizer, seq_len)[0]


def encode_all(
    examples: Sequence[dict[str, Any]], kind: str, tokenizer: Tokenizer, seq_len: int | None
) -> list[dict[str, np.ndarray]]:
    """Encode many examples; every text field is tokenized in one batched tokenizer call."""
    if kind not in KINDS:
        raise ValueError(
            f"unknown example kind {kind!r}; valid kinds: text, instruction, preference"
        )
    bos_id, eos_id, pad = special_ids(tokenizer)
    bos, eos = ([bos_id] if bos_id is not None else []), [eos_id]
    examples = list(examples)
    where = (lambda i: f"example {i}") if len(examples) > 1 else (lambda i: "")
    if kind == "text":
        ids = token_ids(
            tokenizer, [_field(e, "text", kind, where(i)) for i, e in enumerate(examples)]
        )
        out = []
        for t in ids:
            tokens, mask = _pack(bos, t + eos, seq_len, pad)
            out.append({"tokens": tokens, "loss_mask": mask})
        return out
    if kind == "instruction":
        out: list[dict[str, np.ndarray] | None] = [None] * len(examples)
        chats = {i for i, e in enumerate(examples) if isinstance(e, dict) and "messages" in e}
        plain = [i for i in range(len(examples)) if i not in chats]
        for i in sorted(chats):
            msgs = check_messages(examples[i]["messages"], where(i) or "example")
            tokens, mask = _fixed(*encode_chat(tokenizer, msgs), seq_len, pad)
            out[i] = {"tokens": tokens, "loss_mask": mask}
        prompts = token_ids(
            tokenizer, [_field(examples[i], "prompt", kind, where(i)) for i in plain]
        )
        responses = token_ids(
            tokenizer, [_field(examples[i], "response", kind, where(i)) for i in plain]
        )
        for i, p, r in zip(plain, prompts, responses):
            tokens, mask = _pack(bos + p, r + eos, seq_len, pad)
            out[i] = {"tokens": tokens, "loss_mask": mask}
        return out  # type: ignore[return-value]
    fields = {
        f: token_ids(tokenizer, [_field(e, f, kind, where(i)) for i, e in enumerate(examples)])
        for f in ("prompt", "chosen", "rejected")
    }
    out = []
    for n in range(len(examples)):
        enc = {}
        for side in ("chosen", "rejected"):
            tokens, mask = _pack(bos + fields["prompt"][n], fields[side][n] + eos, seq_len, pad)
            enc[f"{side}_tokens"], enc[f"{side}_mask"] = tokens, mask
        out.append(enc)
    return out


def encode_documents(
    examples: Sequence[dict[str, Any]], kind: str, tokenizer: Tokenizer
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole ``text`` / ``instruction`` examples as ``(ids int32, mask int8)`` pairs, neither
    padded nor truncated: ``bos? text eos`` (mask on ``text eos``) or ``bos? prompt response eos``
    (mask on ``response eos``), the layout :func:`encode_all` cuts to ``seq_len + 1``.

    This is what packing (:mod:`jaxcl.data.stream`) and prepared shards
    (:mod:`jaxcl.data.prepare`) hold per document.
    """
    if kind not in ("text", "instruction"):
        raise ValueError(f"documents are text or instruction examples, not {kind!r}")
    rows = encode_all(examples, kind, tokenizer, seq_len=None)
    return [(r["tokens"], r["loss_mask"]) for r in rows]


Ratio = float | Callable[[int], float]


class ReplayMix(grain.MapDataset):
    """Replay as a Grain op: element ``i`` comes from ``replay`` with probability ``ratio``.

    The draw is a pure function of ``(seed, i)``, so the mixed stream is random-access,
    deterministic and resumable: element ``i`` is ``replay[j]`` (``j`` uniform, with replacement)
    when ``u_i < ratio`` and ``current[i]`` otherwise. Over ``n`` elements the replayed fraction
    concentrates around ``ratio`` with standard deviation ``sqrt(ratio (1 − ratio) / n)``.

    ``ratio`` may also be a schedule ``step -> ratio`` (see :mod:`jaxcl.data.replay`); element
    ``i`` belongs to step ``i // batch_size``.
    """

    def __init__(
        self,
        current: grain.MapDataset,
        replay: grain.MapDataset,
        ratio: Ratio,
        seed: int,
        *,
        batch_size: int = 1,
    ) -> None:
        super().__init__([current, replay])
        if not callable(ratio) and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"replay ratio must lie in [0, 1], got {ratio}")
        if len(replay) == 0:
            raise ValueError("replay: the replay pool is empty")
        if batch_size < 1:
            raise ValueError(f"replay: batch_size must be >= 1, got {batch_size}")
        self._current, self._replay = current, replay
        self._ratio, self._seed, self._batch = ratio, int(seed), int(batch_size)

    def __len__(self) -> int:
        return len(self._current)

    def ratio_at(self, index: int) -> float:
        """The declared replay probability of element ``index``."""
        if callable(self._ratio):
            r = float(self._ratio(index // self._batch))
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"replay schedule gave ratio {r} at step {index // self._batch}")
            return r
        return float(self._ratio)

    def is_replayed(self, index: int) -> bool:
        return bool(self._draw(index)[0] < self.ratio_at(index))

    def _draw(self, index: int) -> tuple[float, int]:
        rng = np.random.default_rng([self._seed, index])
        return float(rng.random()), int(rng.integers(max(len(self._replay), 1)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        u, j = self._draw(index)
        return self._replay[j] if u < self.ratio_at(index) else self._current[index]

    def __str__(self) -> str:
        return f"ReplayMix(ratio={self._ratio}, seed={self._seed})"


def batched_stream(
    encoded: Sequence[dict[str, np.ndarray]],
    *,
    batch_size: int,
    num_batches: int,
    seed: int,
    replay: Sequence[dict[str, np.ndarray]] | None = None,
    replay_ratio: Ratio = 0.0,
    shard: tuple[int, int] | None = None,
) -> grain.MapDataset:
    """A random-access Grain dataset of exactly ``num_batches`` batches.

    The task's examples are shuffled with ``seed`` afresh each epoch and repeated as needed;
    with a replay pool, :class:`ReplayMix` swaps in earlier tasks' examples at ``replay_ratio``
    (a number, or a schedule ``step -> ratio``). Batch ``k`` is ``ds[k]``, so resuming at step
    ``k`` is just indexing.

    ``shard=(process_index, process_count)`` gives this process's rows of every global batch
    (``batch_size / process_count`` rows: the elements ``i`` of the global batch with
    ``i % process_count == process_index``); assemble the global batch with
    :func:`jaxcl.data.distributed.global_batch`.
    """
    if not encoded:
        raise ValueError("a task has no training examples")
    needed = batch_size * num_batches
    epochs = -(-needed // len(encoded))
    ds = grain.MapDataset.source(list(encoded)).shuffle(seed=seed).repeat(epochs)
    mixing = callable(replay_ratio) or replay_ratio > 0
    if replay and mixing:
        pool = grain.MapDataset.source(list(replay))
        ds = ReplayMix(ds, pool, replay_ratio, seed=seed + 7919, batch_size=batch_size)
    ds = ds[:needed]
    if shard is not None:
        index, count = shard
        if not 0 <= index < count or batch_size % count:
            raise ValueError(
                f"shard {shard}: need 0 <= process_index < process_count and a batch size "
                f"({batch_size}) divisible by the process count"
            )
        ds, batch_size = ds[index::count], batch_size // count
    return ds.batch(batch_size, drop_remainder=True)


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
