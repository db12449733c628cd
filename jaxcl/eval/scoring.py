"""Task scorers over encoded eval sets: perplexity, exact match, preference accuracy.

One jitted function scores a batch of encoded sequences, returning per row the summed negative
log-likelihood of the masked (target) tokens, their count, and whether the model's argmax
equals the target at every masked position. The last is exact match under greedy decoding: by
induction over the response, greedy generation from the prompt reproduces the reference response
and its end-of-sequence token exactly when every teacher-forced argmax does, so a single forward
pass scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.objectives import token_logps
from jaxcl.parallel import to_host

METRICS = ("perplexity", "exact_match", "pref_accuracy")
HIGHER_IS_BETTER = {"perplexity": False, "exact_match": True, "pref_accuracy": True}


def make_batch_scorer(apply: Callable[..., jax.Array]):
    """``score(params, tokens [B, L+1], mask [B, L+1]) -> (nll_sum, count, all_correct)``."""

    @jax.jit
    def score(params, tokens, loss_mask):
        logits = apply(params, tokens[:, :-1])
        targets, mask = tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
        nll = -token_logps(logits, targets) * mask
        hits = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
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
    raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
