"""Continual-learning methods as optax transforms, data ops and task-boundary functions."""

from jaxcl.methods.catalog import CATALOG, MethodInfo
from jaxcl.methods.consolidate import consolidate, register_consolidator, required_estimates
from jaxcl.methods.importance import fisher_diagonal
from jaxcl.methods.regularize import EwcState, L2AnchorState, ewc, l2_anchor

__all__ = [
    "CATALOG",
    "EwcState",
    "L2AnchorState",
    "MethodInfo",
    "consolidate",
    "ewc",
    "fisher_diagonal",
    "l2_anchor",
    "register_consolidator",
    "required_estimates",
]
