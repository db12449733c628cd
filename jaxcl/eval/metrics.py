"""Continual-learning metrics over the accuracy matrix ``R``.

``R[t][i]`` is the score on task ``i`` after training through task ``t`` (0-based, ``T`` tasks);
``b[i]`` the score before any training of the sequence. Definitions (GEM, Lopez-Paz & Ranzato
2017; Chaudhry et al. 2018 for OP and forgetting; TRACE, Wang et al. 2023):

* ``op = mean_i R[T-1][i]`` (overall performance, the final row's mean; TRACE's "OP")
* ``bwt = mean_{i<T-1} (R[T-1][i] − R[i][i])`` (backward transfer as GEM defines it, and the
  number TRACE publishes as "BWT": its Tables 8, 13 and 18, recomputed from their own R
  matrices, give its printed BWT only with this ``T−1`` denominator, see
  tests/fixtures/trace_published.yaml)
* ``bwt_trace = (1/T) Σ_i (R[T-1][i] − R[i][i])``: the formula as TRACE's Section 3 prints it,
  the same sum divided by ``T`` (the last task contributing 0), so ``bwt_trace = bwt·(T−1)/T``.
  No published table we know of uses it; it is kept under its contract name for the formula.
  Compare TRACE's numbers with ``bwt``.
* ``fwt = mean_{i≥1} (R[i-1][i] − b_i)`` (forward transfer; needs ``b``)
* ``forgetting = mean_{j<T-1} max_{l<T-1} (R[l][j] − R[T-1][j])``

For a metric where lower is better (perplexity) pass ``higher_is_better=False``: every
difference is negated, so a negative ``bwt`` and a positive ``forgetting`` still mean forgetting.
Undefined entries (a single task has no backward transfer) are ``None``.

Cells above the diagonal (a task not trained yet) may be ``None`` (or NaN), as in papers that
score a task only once it has been learned (TRACE's tables print ``-`` there): ``op``, ``bwt``
and ``bwt_trace`` need only the last row and the diagonal, ``forgetting`` takes its maximum over
the cells present, and ``fwt`` is ``None`` when a cell ``R[i-1][i]`` it needs is missing. The
last row and the diagonal must be scored.

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
    R: Sequence[Sequence[float | None]],
    baseline: Sequence[float] | None = None,
    *,
    higher_is_better: bool = True,
) -> dict[str, float | None]:
    """``op``, ``bwt``, ``bwt_trace``, ``fwt``, ``forgetting`` from ``R`` (and ``baseline``)."""
    r = _matrix(R)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T×T matrix, got shape {r.shape}")
    T = r.shape[0]
    sign = 1.0 if higher_is_better else -1.0
    final, diag = r[T - 1], np.diag(r)
    below = np.tril(np.isnan(r))
    if below.any():
        t, i = (int(x) for x in np.argwhere(below)[0])
        raise ValueError(
            f"R[{t}][{i}] is missing: only cells above the diagonal (a task not trained yet) "
            "may be unscored"
        )
    back = sign * (final - diag)
    out: dict[str, float | None] = {
        "op": float(final.mean()),
        "bwt": float(back[: T - 1].mean()) if T > 1 else None,
        "bwt_trace": float(back.sum() / T),
        "fwt": None,
        "forgetting": None,
    }
    if T > 1:
        peaks = np.nanmax(sign * r[: T - 1, : T - 1], axis=0)  # the diagonal is always there
        out["forgetting"] = float((peaks - sign * final[: T - 1]).mean())
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        if b.shape != (T,):
            raise ValueError(f"baseline must have {T} entries, got shape {b.shape}")
        ahead = r[np.arange(T - 1), np.arange(1, T)]
        if T > 1 and not np.isnan(ahead).any():
            out["fwt"] = float((sign * (ahead - b[1:])).mean())
    return out


def _matrix(R: Sequence[Sequence[float | None]]) -> np.ndarray:
    """``R`` as a float array, ``None`` cells as NaN."""
    if isinstance(R, np.ndarray):
        return R.astype(np.float64)
    try:
        rows = [[np.nan if v is None else v for v in row] for row in R]
    except TypeError:  # not a list of rows: the shape check names it
        return np.asarray(R, dtype=np.float64)
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"R must be a non-empty square T×T matrix, got rows of {sorted(lengths)}")
    return np.asarray(rows, dtype=np.float64)
