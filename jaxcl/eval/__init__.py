"""Evaluation: continual-learning metrics and task scorers; the lm-evaluation-harness adapter
(``JaxclLM``, ``run_lm_eval``: :mod:`jaxcl.eval.harness`, imported on first use, it needs the
``lm-eval`` extra)."""

from jaxcl.eval.metrics import cl_metrics, metric_scale
from jaxcl.eval.scoring import HIGHER_IS_BETTER, METRICS, make_batch_scorer, score_task

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "cl_metrics",
    "make_batch_scorer",
    "metric_scale",
    "score_task",
]

#: names of :mod:`jaxcl.eval.harness`, imported on first access (lm-eval is an optional extra)
HARNESS = ("JaxclLM", "run_lm_eval")


def __getattr__(name: str):
    if name in HARNESS:
        from jaxcl.eval import harness, harness_run

        return getattr(harness if name == "JaxclLM" else harness_run, name)
    raise AttributeError(f"module 'jaxcl.eval' has no attribute {name!r}")
