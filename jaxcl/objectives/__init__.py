"""Loss-side methods: pure functions of logits and log-probabilities."""

from jaxcl.objectives.lm import causal_lm_loss, sequence_logps, token_logps
from jaxcl.objectives.preference import DPO_KINDS, dpo_loss, dpo_rewards

__all__ = [
    "DPO_KINDS",
    "causal_lm_loss",
    "dpo_loss",
    "dpo_rewards",
    "sequence_logps",
    "token_logps",
]
