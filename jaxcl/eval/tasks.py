"""A task's evaluation set for its metric, prepared once and scored after every task.

:func:`task_eval` turns a task's eval examples into one of three scorable sets:

* :class:`TeacherForced` (``perplexity``, ``exact_match``, ``pref_accuracy``): encoded sequences
  scored in one forward pass per batch (:func:`jaxcl.eval.score_task`);
* :class:`MultipleChoice` (``multiple_choice``, ``multiple_choice_norm``): one row
  ``bos + prompt + choice`` per choice of every example, all examples' rows flattened into
  fixed-size batches (so examples may have any number of choices), each row's summed
  log-likelihood of its choice tokens computed by the same jitted forward pass; an example is
  right when the correct choice has the highest log-likelihood (``multiple_choice``, lm-eval-
  harness ``acc``), or the highest log-likelihood per character of the choice text
  (``multiple_choice_norm``, lm-eval-harness ``acc_norm``); ties go to the first choice;
* :class:`Generated` (``rouge_l``, custom scorers ``package.module:function``): greedy
  generations from the prompts (:func:`jaxcl.generate`, batched), decoded with the tokenizer and
  compared with the reference responses by the string scorer; a custom scorer with a parameter
  named ``prompts`` also gets the prompts as text (:func:`prompt_texts`), by keyword.

Long inputs: a multiple-choice row keeps its choice whole and drops prompt tokens from the left
(after bos) to fit ``seq_len + 1`` tokens; a generation prompt is cut the same way to at most
``seq_len`` tokens (and to the model's ``max_position_embeddings`` minus the tokens generated).

A scorable set is host data until :meth:`on_devices` places its batches; ``score(ctx, params)``
reads ``ctx.scorer`` (:func:`jaxcl.eval.make_batch_scorer` of the model), ``ctx.graphdef`` and
``ctx.tokenizer`` (the runner's context has all three).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from jaxcl import parallel
from jaxcl.data.benchmarks.scoring import score as string_score
from jaxcl.data.pipeline import encode_all, eval_batches
from jaxcl.data.tokenize import check_messages, encode_chat, special_ids, token_ids
from jaxcl.eval.scoring import _rows, is_custom, load_scorer, score_task

GENERATED = ("rouge_l",)  # built-in metrics scored on generations (besides custom scorers)
CHOICE = ("multiple_choice", "multiple_choice_norm")


@dataclasses.dataclass(frozen=True)
class ModelScorer:
    """What scoring a task needs of the model: ``batch`` (:func:`jaxcl.eval.make_batch_scorer` of
    its apply function, for teacher-forced metrics), its ``graphdef`` and ``tokenizer`` (for
    generated ones)."""

    batch: Callable[..., Any]
    graphdef: Any
    tokenizer: Any


class TaskEval(Protocol):
    metric: str

    def on_devices(self, put_batch: Callable[[dict], dict]) -> TaskEval: ...

    def score(self, scorer: ModelScorer, params: Any) -> float: ...


@dataclasses.dataclass
class TeacherForced:
    """``perplexity``, ``exact_match`` or ``pref_accuracy`` over encoded eval batches."""

    metric: str
    batches: list[dict[str, Any]]

    def on_devices(self, put_batch) -> TeacherForced:
        return dataclasses.replace(self, batches=[put_batch(b) for b in self.batches])

    def score(self, scorer: ModelScorer, params) -> float:
        return score_task(scorer.batch, params, self.batches, self.metric)


@dataclasses.dataclass
class MultipleChoice:
    """Accuracy of the argmax over each example's choices of their (normalised) log-likelihood.

    Rows ``offsets[e]:offsets[e+1]`` of the flattened batches are example ``e``'s choices;
    ``answers[e]`` is the correct one's position among them; ``divisors`` is 1 per row
    (``multiple_choice``) or the choice's length in characters (``multiple_choice_norm``).
    """

    metric: str
    batches: list[dict[str, Any]]
    offsets: np.ndarray
    answers: np.ndarray
    divisors: np.ndarray

    def on_devices(self, put_batch) -> MultipleChoice:
        return dataclasses.replace(self, batches=[put_batch(b) for b in self.batches])

    def loglikelihoods(self, scorer: ModelScorer, params) -> np.ndarray:
        """Summed log-likelihood of every row's choice tokens given its prompt."""
        nll, _, _ = _rows(scorer.batch, params, self.batches, "tokens", "loss_mask")
        return -nll.astype(np.float64)

    def score(self, scorer: ModelScorer, params) -> float:
        return choice_accuracy(
            self.loglikelihoods(scorer, params), self.offsets, self.answers, self.divisors
        )


def choice_accuracy(
    loglik: np.ndarray, offsets: np.ndarray, answers: np.ndarray, divisors: np.ndarray
) -> float:
    """Fraction of examples whose ``answers[e]`` is the argmax of ``loglik / divisors`` over its
    rows ``offsets[e]:offsets[e+1]`` (the first maximum wins a tie)."""
    value = np.asarray(loglik, np.float64) / np.asarray(divisors, np.float64)
    picked = np.array([np.argmax(value[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    return float(np.mean(picked == np.asarray(answers)))


@dataclasses.dataclass
class Generated:
    """A string scorer (``rouge_l`` or a custom one) on greedy generations; ``texts``: the
    prompts as text, for a custom scorer that takes ``prompts``."""

    metric: str
    prompts: list[list[int]]
    references: list[str]
    max_new_tokens: int
    batch_size: int
    seq_len: int
    texts: list[str] | None = None

    def on_devices(self, put_batch) -> Generated:
        return self  # prompts are placed per generation batch

    def predictions(self, scorer: ModelScorer, params) -> list[str]:
        return greedy_texts(
            scorer.graphdef,
            params,
            scorer.tokenizer,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
        )

    def score(self, scorer: ModelScorer, params) -> float:
        return score_strings(
            self.metric, self.predictions(scorer, params), self.references, prompts=self.texts
        )


def takes_prompts(fn: Callable[..., Any]) -> bool:
    """Whether scorer ``fn`` has a parameter named ``prompts`` (it is then passed by keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: the plain two-argument contract
        return False
    param = params.get("prompts")
    return param is not None and param.kind not in (param.VAR_POSITIONAL, param.POSITIONAL_ONLY)


def score_strings(
    metric: str,
    predictions: list[str],
    references: list[str],
    prompts: Sequence[str] | None = None,
) -> float:
    """``rouge_l`` (the mean sentence-level F1) or custom scorer ``metric`` on the texts; a
    custom scorer with a ``prompts`` parameter gets ``prompts=`` the prompt texts too."""
    if not is_custom(metric):
        return string_score(metric, predictions, references)
    fn = load_scorer(metric)
    extra: dict[str, Any] = {}
    if takes_prompts(fn):
        if prompts is None:
            raise ValueError(f"custom scorer {metric!r} takes prompts, but none were given")
        if len(prompts) != len(predictions):
            raise ValueError(f"{len(prompts)} prompts for {len(predictions)} predictions")
        extra["prompts"] = list(prompts)
    value = fn(list(predictions), list(references), **extra)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"custom scorer {metric!r} must return a number, "
            f"got {type(value).__name__} {value!r:.60}"
        ) from None


def _keep_tail(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """``ids`` cut from the left to ``limit`` tokens, a leading bos kept."""
    if len(ids) <= limit:
        return ids
    if bos is not None and ids and ids[0] == bos and limit > 1:
        return [bos, *ids[len(ids) - limit + 1 :]]
    return ids[len(ids) - limit :]


def continuations(
    graphdef: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    seq_len: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    top_p: float = 1.0,
) -> list[str]:
    """Continuations of ``prompts`` (token ids), decoded up to the first stop token (the model's
    eos ids and the tokenizer's), special tokens skipped, in batches of ``batch_size`` (the last
    one padded, so every batch compiles alike); greedy at ``temperature`` 0, else sampled (top-k
    when ``top_k > 0``, nucleus when ``top_p < 1``) with batch ``j`` drawing from ``seed + j``."""
    from flax import nnx

    from jaxcl.models.generate import generate

    model = nnx.merge(graphdef, params)
    cfg = model.config
    limit = cfg.max_position_embeddings - max_new_tokens
    if seq_len is not None:
        limit = min(limit, seq_len)
    if limit < 1:
        raise ValueError(
            f"generating {max_new_tokens} tokens leaves no room for a prompt within the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    bos, eos, pad = special_ids(tokenizer)
    stops = tuple(dict.fromkeys([*cfg.stop_token_ids, eos]))
    known = tokenizer_size(tokenizer)
    rows = [_keep_tail(list(p), limit, bos) for p in prompts]
    texts: list[str] = []
    for j, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)
        out = generate(
            model,
            chunk,
            max_new_tokens=max_new_tokens,
            stop_tokens=stops,
            pad_token_id=pad,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed + j,
        )
        for row in parallel.to_host(out)[:n].tolist():
            end = next((k for k, t in enumerate(row) if t in stops), len(row))
            ids = [t for t in row[:end] if known is None or t < known]
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


#: greedy continuations: :func:`continuations` at its default temperature 0
greedy_texts = continuations


def tokenizer_size(tokenizer: Any) -> int | None:
    """How many ids ``tokenizer`` decodes (a model's vocabulary may be padded past it: such ids,
    which an untrained model can emit, are dropped from generations before decoding)."""
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    size = getattr(tokenizer, "vocab_size", None)
    return int(size) if size is not None else None


def generation_prompts(
    examples: Sequence[dict[str, Any]], tokenizer: Any, where: str = "task"
) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids (as training encodes them: ``bos + prompt``, or a chat up to its last
    assistant message, role header included) and the reference responses."""
    bos, _, _ = special_ids(tokenizer)
    head = [bos] if bos is not None else []
    prompts: list[list[int] | None] = [None] * len(examples)
    references: list[str] = [""] * len(examples)
    plain = []
    for i, e in enumerate(examples):
        if "messages" in e:
            msgs = check_messages(e["messages"], f"{where}, eval example {i}")
            last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
            ids, mask = encode_chat(tokenizer, msgs[: last + 1])
            start = len(mask)
            while start > 0 and mask[start - 1]:
                start -= 1
            prompts[i], references[i] = ids[:start], msgs[last]["content"]
        else:
            plain.append(i)
            references[i] = str(e["response"])
    for i, ids in zip(plain, token_ids(tokenizer, [str(examples[i]["prompt"]) for i in plain])):
        prompts[i] = head + ids
    return prompts, references  # type: ignore[return-value]


def prompt_texts(examples: Sequence[dict[str, Any]]) -> list[str]:
    """Each example's prompt as text: ``prompt``, or for a chat the content of the message just
    before its last assistant message (the turn that the reference answers; ``""`` if none)."""
    texts = []
    for e in examples:
        if "messages" in e:
            msgs = e["messages"]
            last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
            texts.append(str(msgs[last - 1]["content"]) if last > 0 else "")
        else:
            texts.append(str(e["prompt"]))
    return texts


def encode_choices(
    examples: Sequence[dict[str, Any]],
    tokenizer: Any,
    seq_len: int,
    *,
    normalise: bool = False,
    where: str = "task",
) -> tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray, np.ndarray]:
    """One row per choice (``tokens``, ``loss_mask`` on the choice tokens), the examples'
    ``offsets`` into the rows, the correct choices' positions and the rows' divisors."""
    for i, e in enumerate(examples):
        choices = e.get("choices") if isinstance(e, dict) else None
        if "messages" in e or not choices:
            raise ValueError(
                f"{where}: multiple-choice scoring needs eval examples {{prompt, response, "
                f"choices}}; eval example {i} has fields {sorted(e)}"
            )
        if e["response"] not in choices:
            raise ValueError(
                f"{where}: eval example {i}: the response {e['response']!r} is not one of its "
                f"choices {choices}"
            )
    bos, _, pad = special_ids(tokenizer)
    head = [bos] if bos is not None else []
    prompts = token_ids(tokenizer, [str(e["prompt"]) for e in examples])
    flat = [str(c) for e in examples for c in e["choices"]]
    conts = token_ids(tokenizer, flat)
    counts = [len(e["choices"]) for e in examples]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    answers = np.array([list(e["choices"]).index(e["response"]) for e in examples], np.int64)
    rows = []
    owner = np.repeat(np.arange(len(examples)), counts)
    for e, cont in zip(owner, conts):
        cont = cont[:seq_len]  # a choice longer than the window keeps its start
        context = _keep_tail(head + prompts[e], seq_len + 1 - len(cont), bos)
        ids = context + cont
        tokens = np.full(seq_len + 1, pad, np.int32)
        mask = np.zeros(seq_len + 1, np.float32)
        tokens[: len(ids)] = ids
        mask[len(context) : len(ids)] = 1.0
        rows.append({"tokens": tokens, "loss_mask": mask})
    divisors = (
        np.array([max(len(c), 1) for c in flat], np.float64)
        if normalise
        else np.ones(len(flat), np.float64)
    )
    return rows, offsets, answers, divisors


def task_eval(
    metric: str,
    examples: Sequence[dict[str, Any]],
    kind: str,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    *,
    max_new_tokens: int | None = None,
    where: str = "task",
) -> TaskEval:
    """The scorable eval set of ``examples`` (of data ``kind``) for ``metric``."""
    examples = list(examples)
    if not examples:
        raise ValueError(f"{where}: the eval set is empty")
    if metric in CHOICE:
        rows, offsets, answers, divisors = encode_choices(
            examples, tokenizer, seq_len, normalise=metric.endswith("_norm"), where=where
        )
        return MultipleChoice(metric, eval_batches(rows, batch_size), offsets, answers, divisors)
    if metric in GENERATED or is_custom(metric):
        prompts, references = generation_prompts(examples, tokenizer, where)
        if max_new_tokens is None:
            longest = max(len(ids) for ids in token_ids(tokenizer, references))
            max_new_tokens = longest + 1  # the reference and its end-of-sequence token
        texts = prompt_texts(examples)
        return Generated(metric, prompts, references, max_new_tokens, batch_size, seq_len, texts)
    encoded = encode_all(examples, kind, tokenizer, seq_len)
    return TeacherForced(metric, eval_batches(encoded, batch_size))


__all__ = [
    "Generated",
    "MultipleChoice",
    "TaskEval",
    "TeacherForced",
    "choice_accuracy",
    "encode_choices",
    "generation_prompts",
    "greedy_texts",
    "prompt_texts",
    "score_strings",
    "takes_prompts",
    "task_eval",
    "tokenizer_size",
]
