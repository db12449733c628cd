"""Continual-learning methods as optax transforms, data ops and task-boundary functions.

Gradient-side methods are factories returning ``optax.GradientTransformationExtraArgs`` whose
state mirrors the parameter tree; compose them with :func:`chain` (a checked ``optax.chain``) or
``optax.chain``: penalties and projections in front of the base optimizer, masks behind it.
"""

from jaxcl.methods._tree import kernels, matches, skipped
from jaxcl.methods.activations import activation_covariance, layer_inputs
from jaxcl.methods.catalog import CATALOG, MethodInfo
from jaxcl.methods.compose import Behind, Front, chain, check_order, position, state_shardings
from jaxcl.methods.consolidate import consolidate, register_consolidator, required_estimates
from jaxcl.methods.gpm import GpmState, gpm, gpm_expand
from jaxcl.methods.importance import fisher_diagonal, mas_importance
from jaxcl.methods.isolate import (
    FreezeState,
    PackNetState,
    freeze,
    packnet,
    packnet_task_params,
)
from jaxcl.methods.project import (
    AgemState,
    OgdState,
    OLoraState,
    agem,
    o_lora,
    o_lora_penalty,
    ogd,
)
from jaxcl.methods.regularize import (
    EwcState,
    L2AnchorState,
    MasState,
    RecAdamState,
    SiState,
    ewc,
    l2_anchor,
    mas,
    recadam,
    recadam_lambda,
    si,
)
from jaxcl.methods.softmask import SoftMaskState, normalized_importance, soft_mask
from jaxcl.methods.weights import (
    average,
    elastic_reset,
    ema,
    interpolate,
    task_arithmetic,
    task_vector,
)

__all__ = [
    "CATALOG",
    "AgemState",
    "Behind",
    "EwcState",
    "FreezeState",
    "Front",
    "GpmState",
    "L2AnchorState",
    "MasState",
    "MethodInfo",
    "OLoraState",
    "OgdState",
    "PackNetState",
    "RecAdamState",
    "SiState",
    "SoftMaskState",
    "activation_covariance",
    "agem",
    "average",
    "chain",
    "check_order",
    "consolidate",
    "elastic_reset",
    "ema",
    "ewc",
    "fisher_diagonal",
    "freeze",
    "gpm",
    "gpm_expand",
    "interpolate",
    "kernels",
    "l2_anchor",
    "layer_inputs",
    "mas",
    "mas_importance",
    "matches",
    "normalized_importance",
    "o_lora",
    "o_lora_penalty",
    "ogd",
    "packnet",
    "packnet_task_params",
    "position",
    "recadam",
    "recadam_lambda",
    "register_consolidator",
    "required_estimates",
    "si",
    "skipped",
    "soft_mask",
    "state_shardings",
    "task_arithmetic",
    "task_vector",
]
