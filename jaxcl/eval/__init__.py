"""Evaluation: continual-learning metrics and task scorers."""

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
