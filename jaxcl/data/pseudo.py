"""Pseudo-replay (LAMOL, Sun et al., 2020): the model writes the examples of earlier tasks.

LAMOL trains one language model to answer (``L_QA``) and to generate whole examples from a
task's generation token (``λ L_LM``). At the start of task ``t > 0`` the current model (the one
that finished task ``t − 1``) samples ``⌈γ |T_t|⌉`` examples, rounded down to a multiple of the
number of finished tasks and split equally among them, each from its task's token with top-k
sampling (k = 20, temperature 1); malformed samples (no answer token) are dropped, and the rest
are trained on together with task ``t``'s data. No real example of a finished task is kept.

Here a task's generation token is its **prompt prefix** (:func:`common_prefix` of its prompts,
e.g. ``"Q: capital of "``), and a generated instruction example is cut into ``{prompt,
response}`` at the task's **separator**, the end of its prompt format (:func:`prompt_separator`,
e.g. ``"\\nA:"``), which plays the part of LAMOL's answer token. :func:`pseudo_counts` is
LAMOL's split of ``γ |T_t|``; :func:`pseudo_replay` asks a ``generate_fn(prompts) ->
continuations`` for the samples and parses them. The recipe option is ``replay.pseudo``
(:class:`jaxcl.methods.memory.PseudoSpec`), which runs all of this at every task start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


@dataclass
class PseudoReplay:
    """Generated examples per task and what became of the generations."""

    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)

    def all(self) -> list[dict[str, str]]:
        return [e for rows in self.examples.values() for e in rows]


def common_prefix(prompts: Sequence[str]) -> str:
    """The longest common prefix of a task's prompts, cut back to a word boundary."""
    if not prompts:
        raise ValueError("common_prefix: no prompts")
    first, last = min(prompts), max(prompts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    prefix = first[:n]
    if n < len(first) and not prefix.endswith((" ", "\n")):
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        prefix = prefix[: cut + 1] if cut >= 0 else prefix
    return prefix


def prompt_separator(prompts: Sequence[str]) -> str:
    """The end of a task's prompt format: the longest common suffix of its prompts, from its
    first whitespace on (``"…France?\\nA:"`` and ``"…Peru?\\nA:"`` give ``"\\nA:"``).

    Raises ``ValueError`` when the prompts share no ending (name the separator yourself)."""
    if not prompts:
        raise ValueError("prompt_separator: no prompts")
    rev = [p[::-1] for p in prompts]
    first, last = min(rev), max(rev)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    suffix = first[:n][::-1]
    if n < len(first):  # not a whole prompt: start the separator at a word or line break
        cut = next((i for i, c in enumerate(suffix) if c.isspace()), None)
        suffix = suffix[cut:] if cut is not None else suffix
    if not suffix.strip():
        raise ValueError(
            "the task's prompts share no ending to split generated examples at; give the "
            "separator (e.g. replay.pseudo.separator: '\\nA:')"
        )
    return suffix


def pseudo_counts(
    n_new: int,
    n_finished: int,
    *,
    ratio: float,
    per_task: int | None = None,
    capacity: int | None = None,
) -> list[int]:
    """How many pseudo-examples each finished task gets at the start of a new task.

    LAMOL (``create_extra_data``): ``N = ⌈γ · n_new⌉``, less ``N mod k`` for ``k`` finished
    tasks, ``N / k`` each; ``per_task`` replaces ``N / k``. A ``capacity`` caps the total: equal
    shares of it, the first ``capacity mod k`` tasks one more, never above the uncapped count.
    """
    if n_finished < 1:
        return []
    if per_task is None:
        total = math.ceil(round(n_new * ratio, 9))
        each = (total - total % n_finished) // n_finished
    else:
        each = int(per_task)
    if capacity is None:
        return [each] * n_finished
    share, extra = divmod(int(capacity), n_finished)
    return [min(each, share + (i < extra)) for i in range(n_finished)]


def _split(full: str, prefix: str, sep: str) -> tuple[str, str] | None:
    """``(prompt, response)`` of a generated example at the first ``sep`` that ends after the
    prefix (None if there is none, or the response is empty)."""
    at = full.find(sep, max(len(prefix) - len(sep) + 1, 0))
    if at < 0:
        return None
    response = full[at + len(sep) :].rstrip()
    return (full[: at + len(sep)], response) if response.strip() else None


def pseudo_replay(
    generate_fn: Callable[[list[str]], list[str]],
    prefixes: Mapping[str, str],
    *,
    per_task: int | Mapping[str, int],
    kind: Literal["text", "instruction"] = "instruction",
    separator: str | Mapping[str, str] | None = "\nA:",
    batch_size: int = 64,
) -> PseudoReplay:
    """LAMOL-style pseudo-examples of earlier tasks, generated by the model itself.

    For every task, ``generate_fn`` receives ``per_task`` (a number, or one per task) copies of
    the task's prompt prefix (in batches of ``batch_size``) and returns one continuation per
    prompt (it should sample: greedy decoding gives copies). ``prefix + continuation`` becomes
    ``{"text": ...}`` for ``text`` kind, or is cut at the task's ``separator`` (the end of its
    prompt format, e.g. ``"\\nA:"``, searched after the prefix) into ``{prompt, response}``;
    generations without the separator or with an empty response are dropped (as LAMOL drops
    samples without an answer token) and counted in ``stats``.
    """
    if kind == "instruction" and separator is None:
        raise ValueError("pseudo_replay: instruction examples need a separator")
    out = PseudoReplay()
    for task, prefix in prefixes.items():
        want = per_task if isinstance(per_task, int) else int(per_task[task])
        sep = separator if isinstance(separator, str) or separator is None else separator[task]
        texts: list[str] = []
        while len(texts) < want:
            n = min(batch_size, want - len(texts))
            got = list(generate_fn([prefix] * n))
            if len(got) != n:
                raise ValueError(f"pseudo_replay: generate_fn returned {len(got)} texts for {n}")
            texts += got
        rows: list[dict[str, str]] = []
        for cont in texts:
            full = prefix + cont
            if kind == "text":
                rows.append({"text": full})
                continue
            parts = _split(full, prefix, sep)  # type: ignore[arg-type]
            if parts is not None:
                rows.append({"prompt": parts[0], "response": parts[1]})
        out.examples[task] = rows
        out.stats[task] = {
            "generated": len(texts),
            "kept": len(rows),
            "dropped": len(texts) - len(rows),
            "unique": len({tuple(sorted(r.items())) for r in rows}),
        }
    return out


def make_generate_fn(
    model: Any,
    tokenizer: Any,
    *,
    max_new_tokens: int,
    generate: Callable[..., Any] | None = None,
    **generate_kwargs: Any,
) -> Callable[[list[str]], list[str]]:
    """``generate_fn(prompts) -> continuations`` over ``jaxcl.generate`` (or ``generate``).

    Each prompt is run alone (``[1, len]`` input: no padding conventions assumed); the
    continuation stops at the first eos. ``generate_kwargs`` (``temperature``, a key...) are
    passed through. (The trainer's pseudo-replay uses the stage's batched ``generate`` tool.)
    """
    from jaxcl.data.tokenize import special_ids, token_ids

    if generate is None:
        import jaxcl

        generate = getattr(jaxcl, "generate", None)
        if generate is None:
            raise ValueError("make_generate_fn: jaxcl.generate is not available; pass generate=")
    bos, eos, _ = special_ids(tokenizer)

    def generate_fn(prompts: list[str]) -> list[str]:
        outs = []
        for ids in token_ids(tokenizer, prompts):
            ids = ([bos] if bos is not None else []) + ids
            inp = np.asarray([ids], np.int32)
            got = np.asarray(generate(model, inp, max_new_tokens=max_new_tokens, **generate_kwargs))
            echoed = got.shape[1] >= len(ids) and np.array_equal(got[0, : len(ids)], ids)
            new = (got[0, len(ids) :] if echoed else got[0]).tolist()
            new = new[: new.index(eos)] if eos in new else new
            outs.append(tokenizer.decode(new, skip_special_tokens=True))
        return outs

    return generate_fn
