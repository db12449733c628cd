"""Continual-learning metrics over the accuracy matrix ``R``.

``R[t][i]`` is the score on task ``i`` after training through task ``t`` (0-based, ``T`` tasks);
``b[i]`` the score before any training of the sequence. Definitions (GEM, Lopez-Paz & Ranzato
2017; TRACE, Wang et al. 2023; Chaudhry et al. 2018 for forgetting):

* ``op = mean_i R[T-1][i]`` (overall performance, the final row's mean)
* ``bwt = mean_{i<T-1} (R[T-1][i] − R[i][i])`` (backward transfer, GEM)
* ``bwt_trace = (1/T) Σ_i (R[T-1][i] − R[i][i])`` (TRACE's variant, the last task contributing 0)
* ``fwt = mean_{i≥1} (R[i-1][i] − b_i)`` (forward transfer; needs ``b``)
* ``forgetting = mean_{j<T-1} max_{l<T-1} (R[l][j] − R[T-1][j])``

For a metric where lower is better (perplexity) pass ``higher_is_better=False``: every
difference is negated, so a negative ``bwt`` and a positive ``forgetting`` still mean forgetting.
Undefined entries (a single task has no backward transfer) are ``None``.

Perplexity is compared on its log scale (:func:`metric_scale`): ``ln ppl`` is the mean token
negative log-likelihood, so a perplexity task's BWT and forgetting read in **nats** per token
(a rise from 1.24 to 572 is 6.13 nats), not in raw perplexity differences, which grow without
bound and let one task dominate a mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def metric_scale(R: Sequence[Sequence[float]], metrics: Sequence[str]) -> np.ndarray:
    """``R`` on the scale its CL metrics are taken on: ``ln`` of each perplexity column (nats
    per token), every other column as it is. ``metrics[i]`` names column ``i``'s metric."""
    r = np.asarray(R, dtype=np.float64)
    logged = np.array([m == "perplexity" for m in metrics], bool)
    return np.where(logged, np.log(np.maximum(r, 1e-300)), r) if logged.any() else r


def cl_metrics(
    R: Sequence[Sequence[float]],
    baseline: Sequence[float] | None = None,
    *,
    higher_is_better: bool = True,
) -> dict[str, float | None]:
    """``op``, ``bwt``, ``bwt_trace``, ``fwt``, ``forgetting`` from ``R`` (and ``baseline``)."""
    r = np.asarray(R, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T×T matrix, got shape {r.shape}")
    T = r.shape[0]
    sign = 1.0 if higher_is_better else -1.0
    final, diag = r[T - 1], np.diag(r)
    back = sign * (final - diag)
    out: dict[str, float | None] = {
        "op": float(final.mean()),
        "bwt": float(back[: T - 1].mean()) if T > 1 else None,
        "bwt_trace": float(back.sum() / T),
        "fwt": None,
        "forgetting": None,
    }
    if T > 1:
        peaks = (sign * r[: T - 1, : T - 1]).max(axis=0)
        out["forgetting"] = float((peaks - sign * final[: T - 1]).mean())
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(f"baseline must have {T} entries, got shape {b.shape}")
        if T > 1:
            out["fwt"] = float((sign * (r[np.arange(T - 1), np.arange(1, T)] - b[1:])).mean())
    return out
