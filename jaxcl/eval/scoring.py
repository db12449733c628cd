"""Task scorers over encoded eval sets: perplexity, exact match, preference accuracy; the
registry of every metric a task may name (:func:`check_metric`, :data:`HIGHER_IS_BETTER`).

One jitted function scores a batch of encoded sequences, returning per row the summed negative
log-likelihood of the masked (target) tokens, their count, and whether the model's argmax
equals the target at every masked position. The last is exact match under greedy decoding: by
induction over the response, greedy generation from the prompt reproduces the reference response
and its end-of-sequence token exactly when every teacher-forced argmax does, so a single forward
pass scores it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.objectives import token_logps
from jaxcl.objectives.chunked import DEFAULT_CHUNK, can_chunk, chunked_token_stats
from jaxcl.parallel import to_host

METRICS = (
    "perplexity",
    "exact_match",
    "pref_accuracy",
    "multiple_choice",
    "multiple_choice_norm",
    "rouge_l",
)
#: the data kinds each built-in metric applies to (custom scorers: instruction data)
METRIC_DATA = {
    "perplexity": ("text", "instruction"),
    "exact_match": ("instruction",),
    "pref_accuracy": ("preference",),
    "multiple_choice": ("instruction",),
    "multiple_choice_norm": ("instruction",),
    "rouge_l": ("instruction",),
}
CUSTOM_DATA = ("instruction",)
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
CHOICES = ", ".join(METRICS) + ", or a custom scorer package.module:function"


def is_custom(name: str) -> bool:
    """Whether ``name`` names a custom scorer (``package.module:function``)."""
    return ":" in name


def load_scorer(path: str) -> Callable[..., Any]:
    """The custom scorer ``package.module:function`` (imported; errors say what failed)."""
    if not _IMPORT_PATH.match(path):
        raise ValueError(f"{path!r} is not an import path of the form package.module:function")
    module_name, attr = path.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raised while importing
        raise ValueError(
            f"custom scorer {path!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {err})"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"custom scorer {path!r}: {getattr(obj, '__name__', module_name)!r} has no "
                f"attribute {part!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"custom scorer {path!r} is not callable ({type(obj).__name__})")
    direction = getattr(obj, "higher_is_better", True)
    if not isinstance(direction, bool):
        raise ValueError(
            f"custom scorer {path!r}: its attribute higher_is_better must be True or False, "
            f"got {direction!r}"
        )
    return obj


def check_metric(name: Any, data_kind: str | None = None) -> str:
    """``name`` if it is a metric (a built-in one or an importable custom scorer) that applies to
    ``data_kind`` examples; else a ``ValueError`` listing the valid choices."""
    if not isinstance(name, str):
        raise ValueError(f"a metric is a string; valid choices: {CHOICES}")
    if is_custom(name):
        load_scorer(name)
        kinds = CUSTOM_DATA
    elif name in METRIC_DATA:
        kinds = METRIC_DATA[name]
    else:
        raise ValueError(f"unknown metric {name!r}; valid choices: {CHOICES}")
    if data_kind is not None and data_kind not in kinds:
        valid = [m for m in METRICS if data_kind in METRIC_DATA[m]]
        if data_kind in CUSTOM_DATA:
            valid.append("package.module:function")
        raise ValueError(
            f"metric {name!r} does not apply to {data_kind} data; valid choices for "
            f"{data_kind} data: {', '.join(valid)}"
        )
    return name


class _Directions(dict):
    """``HIGHER_IS_BETTER[name]``: built-in metrics by table; a custom scorer by its attribute
    ``higher_is_better`` (default True); a stage label ``a+b`` (tasks with different metrics) by
    its parts, which must agree."""

    def __missing__(self, name: str) -> bool:
        if not isinstance(name, str):
            raise KeyError(name)
        if "+" in name:
            directions = {self[part] for part in name.split("+")}
            if len(directions) != 1:
                raise KeyError(f"{name!r} mixes metrics where higher and lower is better")
            return directions.pop()
        if is_custom(name):
            try:
                return bool(getattr(load_scorer(name), "higher_is_better", True))
            except ValueError as err:
                raise KeyError(str(err)) from None
        raise KeyError(name)


HIGHER_IS_BETTER: dict[str, bool] = _Directions(
    perplexity=False,
    exact_match=True,
    pref_accuracy=True,
    multiple_choice=True,
    multiple_choice_norm=True,
    rouge_l=True,
)


def make_batch_scorer(apply: Callable[..., jax.Array], chunk: int = DEFAULT_CHUNK):
    """``score(params, tokens [B, L+1], mask [B, L+1]) -> (nll_sum, count, all_correct)``; the
    logits taken ``chunk`` positions at a time when ``apply`` exposes its hidden states and
    head (:mod:`jaxcl.objectives.chunked`; 0: whole)."""

    @jax.jit
    def score(params, tokens, loss_mask):
        targets, mask = tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
        if chunk > 0 and can_chunk(apply):
            hidden = apply.hidden(params, tokens[:, :-1])
            stats = chunked_token_stats(apply, params, hidden, targets, chunk, argmax=True)
            logps, argmax = stats["logps"], stats["argmax"]
        else:
            logits = apply(params, tokens[:, :-1])
            logps, argmax = token_logps(logits, targets), jnp.argmax(logits, axis=-1)
        nll = -logps * mask
        hits = (argmax == targets) | (mask == 0)
        return nll.sum(-1), mask.sum(-1), jnp.all(hits, axis=-1)

    return score


def _rows(score, params, batches, tokens_key, mask_key):
    nll, count, correct, valid = [], [], [], []
    for batch in batches:
        n, c, ok = (to_host(x) for x in score(params, batch[tokens_key], batch[mask_key]))
        (
            nll.append(n),
            count.append(c),
            correct.append(ok),
            valid.append(to_host(batch["valid"]) > 0),
        )
    keep = np.concatenate(valid)
    return (np.concatenate(nll)[keep], np.concatenate(count)[keep], np.concatenate(correct)[keep])


def score_task(score, params, batches: Sequence[dict], metric: str) -> float:
    """Score one task's eval batches (from :func:`jaxcl.data.eval_batches`) with ``metric``.

    * ``perplexity``: ``exp(Σ nll / Σ tokens)`` over the target tokens;
    * ``exact_match``: fraction of examples whose response is reproduced exactly (greedy);
    * ``pref_accuracy``: fraction of pairs whose chosen response has the higher mean per-token
      log-likelihood than the rejected one.
    """
    if metric == "perplexity":
        nll, count, _ = _rows(score, params, batches, "tokens", "loss_mask")
        return float(np.exp(nll.sum() / max(count.sum(), 1.0)))
    if metric == "exact_match":
        _, _, correct = _rows(score, params, batches, "tokens", "loss_mask")
        return float(correct.mean())
    if metric == "pref_accuracy":
        nll_c, count_c, _ = _rows(score, params, batches, "chosen_tokens", "chosen_mask")
        nll_r, count_r, _ = _rows(score, params, batches, "rejected_tokens", "rejected_mask")
        mean_c = -nll_c / np.maximum(count_c, 1)
        mean_r = -nll_r / np.maximum(count_r, 1)
        return float((mean_c > mean_r).mean())
    raise ValueError(
        f"score_task scores perplexity, exact_match and pref_accuracy, not {metric!r} "
        "(jaxcl.eval.tasks.task_eval prepares any metric's eval set)"
    )
