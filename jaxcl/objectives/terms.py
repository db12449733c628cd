"""Composite objectives: ``L(θ) = Σ_k w_k · L_k(θ)`` over weighted terms, in any stage kind.

Every term reads one :class:`Pass` over the batch, so the policy's logits are computed once per
step however many terms there are, and a frozen tree's logits at most once. A batch is either
``{tokens, loss_mask}`` (text and instruction data) or ``{chosen_tokens, chosen_mask,
rejected_tokens, rejected_mask}`` (preference pairs; the chosen and rejected sequences run as one
batch of ``2B`` rows, chosen first). Terms:

=========  ==============================================================================
``lm``     masked causal-LM NLL (on the chosen response of preference pairs: SFT / ORPO's NLL)
``dpo``    :func:`~jaxcl.objectives.preference.dpo_loss` (sigmoid, IPO, hinge, SimPO) vs the
           reference; IPO and SimPO on length-averaged log-probs (SimPO: no reference)
``orpo``   :func:`~jaxcl.objectives.preference.orpo_loss` on length-normalised log-probs
``cppo``   :func:`~jaxcl.objectives.retention.cppo_penalty` against a frozen tree, mean over rows
           (CPPO's retention penalty, offline: not CPPO's online PPO)
``kl``     :func:`~jaxcl.objectives.retention.token_kl`, masked mean over target tokens
``distill``:func:`~jaxcl.objectives.retention.distill_kl`, masked mean over target tokens
=========  ==============================================================================

The metrics hold ``loss`` (the weighted sum), ``terms/<name>`` (each unweighted term) and the
terms' own metrics (TRL's ``rewards/*`` and ``logps/*`` for preference terms).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.objectives.bound import Batch, Metrics, Objective, row_inputs
from jaxcl.objectives.chunked import (
    DEFAULT_CHUNK,
    can_chunk,
    chunked_pair_stat,
    chunked_token_stats,
)
from jaxcl.objectives.lm import token_logps
from jaxcl.objectives.preference import (
    LENGTH_AVERAGED_KINDS,
    REFERENCE_FREE_KINDS,
    dpo_loss,
    orpo_log_odds,
    orpo_loss,
    preference_metrics,
)
from jaxcl.objectives.retention import (
    confidence_weights,
    cppo_penalty,
    distill_kl,
    masked_mean,
    token_kl,
)

#: batch keys holding precomputed reference sequence log-probs of preference pairs (TRL's names)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
#: optional batch key of per-example retention weights ``[B]`` (multiplies the CPPO weights)
SAMPLE_WEIGHT_KEY = "sample_weight"


class Pass:
    """One batch as every term sees it: the policy's logits once, frozen trees' on demand.

    With ``chunk > 0`` and a model that exposes its hidden states and head
    (:class:`~jaxcl.objectives.chunked.ModelApply`), per-token quantities (target log-probs,
    KLs, mean logits) are computed over sequence chunks of ``chunk`` positions
    (:mod:`jaxcl.objectives.chunked`): the whole ``[R, T, V]`` logits are never held, unless a
    term asks for :meth:`logits` itself.
    """

    def __init__(
        self, apply, params, batch: Batch, frozen: dict[str, Any], chunk: int = DEFAULT_CHUNK
    ) -> None:
        self.apply, self.params, self.batch, self.frozen = apply, params, batch, frozen
        self.chunk = chunk if can_chunk(apply) else 0
        self.pairs = "chosen_tokens" in batch
        if self.pairs:
            tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
            mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
            self.half = batch["chosen_tokens"].shape[0]
        else:
            tokens, mask = batch["tokens"], batch["loss_mask"]
            self.half = tokens.shape[0]
        self.inputs, self.targets = row_inputs(batch, tokens), tokens[:, 1:]
        self.mask = mask[:, 1:].astype(jnp.float32)
        self._logits: dict[str, jax.Array] = {}
        self._hidden: dict[str, jax.Array] = {}
        self._raw: dict[str, jax.Array] = {}
        self._mean_logits: dict[str, jax.Array] = {}

    def tree_params(self, tree: str = "policy") -> Any:
        """The parameters of the policy or of frozen tree ``tree`` (gradient stopped)."""
        if tree == "policy":
            return self.params
        if tree not in self.frozen:
            raise KeyError(
                f"objective: frozen tree {tree!r} was not supplied by the trainer "
                f"(have {sorted(self.frozen)})"
            )
        return jax.lax.stop_gradient(self.frozen[tree])

    def logits(self, tree: str = "policy") -> jax.Array:
        """``[R, T, V]`` logits of the policy or of frozen tree ``tree`` (no gradient); whole,
        even when chunking (prefer the per-token accessors)."""
        if tree not in self._logits:
            if self.chunk:
                out = self.apply.head(self.tree_params(tree), self.hidden(tree))
            else:
                out = self.apply(self.tree_params(tree), self.inputs)
            self._logits[tree] = out if tree == "policy" else jax.lax.stop_gradient(out)
        return self._logits[tree]

    def hidden(self, tree: str = "policy") -> jax.Array:
        """``[R, T, D]`` final-normed hidden states (chunked passes only)."""
        if tree not in self._hidden:
            out = self.apply.hidden(self.tree_params(tree), self.inputs)
            self._hidden[tree] = out if tree == "policy" else jax.lax.stop_gradient(out)
        return self._hidden[tree]

    def all_token_logps(self, tree: str = "policy") -> jax.Array:
        """``[R, T]`` log-probs of every target, trained or not (padding included)."""
        if tree not in self._raw:
            if self.chunk and tree not in self._logits:
                stats = chunked_token_stats(
                    self.apply,
                    self.tree_params(tree),
                    self.hidden(tree),
                    self.targets,
                    self.chunk,
                    mean_logits=tree == "policy",
                )
                self._mean_logits[tree] = stats.get("mean_logits")
                self._raw[tree] = stats["logps"]
            else:
                self._raw[tree] = token_logps(self.logits(tree), self.targets)
        return self._raw[tree]

    def mean_logits(self, tree: str = "policy") -> jax.Array:
        """``[R, T]`` mean logit over the vocabulary at every position (a logged metric)."""
        if self._mean_logits.get(tree) is None:
            if self.chunk and tree not in self._logits:
                stats = chunked_token_stats(
                    self.apply,
                    self.tree_params(tree),
                    self.hidden(tree),
                    self.targets,
                    self.chunk,
                    mean_logits=True,
                )
                self._mean_logits[tree] = stats["mean_logits"]
            else:
                self._mean_logits[tree] = jnp.mean(self.logits(tree).astype(jnp.float32), -1)
        return self._mean_logits[tree]

    def token_pair(
        self, fn: Callable[[jax.Array, jax.Array], jax.Array], tree_a: str, tree_b: str
    ) -> jax.Array:
        """``fn(logits_a, logits_b) -> [R, T]`` of two trees' logits, position by position
        (chunked when the pass is)."""
        if self.chunk and not (tree_a in self._logits and tree_b in self._logits):
            return chunked_pair_stat(
                self.apply,
                fn,
                self.tree_params(tree_a),
                self.hidden(tree_a),
                self.tree_params(tree_b),
                self.hidden(tree_b),
                self.chunk,
            )
        return fn(self.logits(tree_a), self.logits(tree_b))

    def token_logps(self, tree: str = "policy") -> jax.Array:
        """``[R, T]`` log-probs of the targets (0 where the mask is 0)."""
        return self.all_token_logps(tree) * self.mask

    @property
    def example_mask(self) -> jax.Array:
        """``[R, T]``: 1 on every target up to a row's last trained one, 0 on the padding after.

        Encoded rows are ``bos, prompt, response, eos, pad...`` with the loss mask on the
        response and its eos, so this covers the whole example (prompt included): the reverse
        running maximum ``e_t = max_{s ≥ t} m_s``. On text rows it equals the loss mask.
        """
        return jax.lax.cummax(self.mask, axis=1, reverse=True)

    def seq_logps(self, tree: str = "policy") -> jax.Array:
        """``[R]`` summed target log-probs."""
        return jnp.sum(self.token_logps(tree), axis=-1)

    @property
    def lengths(self) -> jax.Array:
        return jnp.maximum(jnp.sum(self.mask, axis=-1), 1.0)

    def split(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return x[: self.half], x[self.half :]


TermFn = Callable[[Pass], tuple[jax.Array, Metrics]]


@dataclass(frozen=True)
class Term:
    """``weight · fn(pass)``; ``frozen`` names the trees ``fn`` reads, ``pairs`` whether it needs
    preference pairs."""

    name: str
    weight: float
    fn: TermFn
    frozen: tuple[str, ...] = ()
    pairs: bool = False


def lm_term(weight: float = 1.0, *, question_loss: float = 0.0) -> Term:
    """Masked causal-LM NLL; on preference pairs, of the chosen responses only.

    With ``question_loss = λ > 0`` it is LAMOL's objective (Sun et al., 2020),
    ``L = L_QA + λ L_LM``: the response NLL plus λ times the NLL of the whole example, prompt
    tokens included (:attr:`Pass.example_mask`), each a mean over its tokens in the batch, as
    the reference code's ``qa_loss + lm_lambda * lm_loss`` (LAMOL's λ = 0.25). The model thus
    also learns to write the questions it will generate as pseudo-examples.
    """
    if question_loss < 0:
        raise ValueError(f"lm: question_loss must be >= 0, got {question_loss}")

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        nll, mask = -p.all_token_logps(), p.mask
        rows = slice(0, p.half) if p.pairs else slice(None)
        value = masked_mean(nll[rows], mask[rows])
        if not question_loss:
            return value, {}
        whole = masked_mean(nll[rows], p.example_mask[rows])
        return value + question_loss * whole, {"lm/answer": value, "lm/example": whole}

    return Term("lm", weight, fn)


def dpo_term(
    weight: float = 1.0,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    reference: str = "reference",
    precomputed: bool = False,
) -> Term:
    """DPO (or IPO, hinge, SimPO) against frozen tree ``reference`` (unless reference-free);
    with ``precomputed`` the reference log-probs come from the batch (:data:`REF_KEYS`, summed;
    divided here by the same response lengths when the kind wants averages).

    Kinds in :data:`~jaxcl.objectives.preference.LENGTH_AVERAGED_KINDS` (IPO, SimPO) see the
    per-token mean ``ℓ̄ = Σ_t m_t log π(y_t|·) / Σ_t m_t`` of the policy and of the reference,
    as TRL feeds them; the reward metrics are computed from the same quantities (as TRL logs
    them)."""
    free = kind in REFERENCE_FREE_KINDS
    averaged = kind in LENGTH_AVERAGED_KINDS

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        per = p.lengths if averaged else 1.0
        pol = p.seq_logps() / per
        if free:
            pol_c, pol_r = p.split(pol)
            ref_c = ref_r = jnp.zeros_like(pol_c)
        else:
            if precomputed:
                missing = [k for k in REF_KEYS if k not in p.batch]
                if missing:
                    raise KeyError(
                        f"dpo: reference.logps is 'precomputed' but the batch lacks {missing}; "
                        "the trainer must add them with "
                        "jaxcl.objectives.reference.annotate_reference_logps"
                    )
                ref = jnp.concatenate([p.batch[k] for k in REF_KEYS], axis=0)
            else:
                ref = p.seq_logps(reference)
            pol_c, pol_r = p.split(pol)
            ref_c, ref_r = p.split(jax.lax.stop_gradient(ref / per))
        losses = dpo_loss(
            pol_c,
            pol_r,
            ref_c,
            ref_r,
            beta=beta,
            kind=kind,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
        )
        metrics = preference_metrics(pol_c, pol_r, ref_c, ref_r, beta=beta)
        lc, lr = p.split(jax.lax.stop_gradient(p.mean_logits()))
        mc, mr = p.split(p.mask)
        metrics["logits/chosen"] = masked_mean(lc, mc)
        metrics["logits/rejected"] = masked_mean(lr, mr)
        return jnp.mean(losses), metrics

    frozen = () if free or precomputed else (reference,)
    return Term("dpo", weight, fn, frozen, pairs=True)


def orpo_term(weight: float = 0.1) -> Term:
    """ORPO's odds-ratio term ``−log σ(z)`` on length-normalised log-probs (weight = ORPO's λ)."""

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        mean_c, mean_r = p.split(p.seq_logps() / p.lengths)
        z = orpo_log_odds(mean_c, mean_r)
        metrics = {
            "orpo/log_odds_ratio": jnp.mean(jax.nn.log_sigmoid(z)),
            "orpo/log_odds_chosen": jnp.mean(z),
        }
        return jnp.mean(orpo_loss(mean_c, mean_r)), metrics

    return Term("orpo", weight, fn, pairs=True)


def cppo_term(
    weight: float = 1.0,
    *,
    against: str = "task_start",
    weighting: str = "uniform",
    length_normalized: bool = False,
) -> Term:
    """CPPO-style ``mean_i w_i (log π_θ(y_i|x_i) − log π_prev(y_i|x_i))²`` over every row
    (both responses of preference pairs); weight = the formula's β. CPPO's knowledge-retention
    penalty applied offline, on the batch's responses: not CPPO's online PPO on rollouts."""
    if weighting not in ("uniform", "confidence"):
        raise ValueError(f"cppo: unknown weighting {weighting!r}; valid: uniform, confidence")

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        pol, prev = p.seq_logps(), jax.lax.stop_gradient(p.seq_logps(against))
        if length_normalized:
            pol, prev = pol / p.lengths, prev / p.lengths
        w = None
        if weighting == "confidence":
            w = confidence_weights(p.seq_logps(against) / p.lengths)
        if SAMPLE_WEIGHT_KEY in p.batch:
            sw = p.batch[SAMPLE_WEIGHT_KEY].astype(jnp.float32)
            sw = jnp.concatenate([sw, sw]) if p.pairs else sw
            w = sw if w is None else w * sw
        penalty = cppo_penalty(pol, prev, w)
        return jnp.mean(penalty), {"cppo/logp_shift": jnp.mean(pol - prev)}

    return Term("cppo", weight, fn, (against,))


def kl_term(
    weight: float = 1.0, *, against: str = "task_start", direction: str = "reverse"
) -> Term:
    """Exact token-level KL to a frozen policy: ``reverse`` = ``KL(π_θ ‖ π_prev)`` (RLHF's
    direction), ``forward`` = ``KL(π_prev ‖ π_θ)``; masked mean over target tokens."""
    if direction not in ("reverse", "forward"):
        raise ValueError(f"kl: unknown direction {direction!r}; valid: reverse, forward")

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        if direction == "reverse":
            kl = p.token_pair(token_kl, "policy", against)
        else:
            kl = p.token_pair(token_kl, against, "policy")
        return masked_mean(kl, p.mask), {}

    return Term("kl", weight, fn, (against,))


def distill_term(
    weight: float = 1.0,
    *,
    against: str = "task_start",
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Term:
    """LwF / knowledge distillation from a frozen teacher: masked mean of ``T² KL(p̃_T ‖ q_T)``."""

    def fn(p: Pass) -> tuple[jax.Array, Metrics]:
        def per_token(teacher: jax.Array, student: jax.Array) -> jax.Array:
            return distill_kl(teacher, student, temperature=temperature, top_k=top_k)

        kl = p.token_pair(per_token, against, "policy")
        return masked_mean(kl, p.mask), {}

    return Term("distill", weight, fn, (against,))


def compose_objective(
    apply,
    terms: Sequence[Term],
    *,
    precompute: tuple[str, ...] = (),
    reference_checkpoint: str | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Objective:
    """One :class:`Objective` whose loss is ``Σ_k w_k L_k`` and whose ``frozen`` is the union of
    the trees its terms read. A term of weight 0 is still computed and logged (not trained).
    ``chunk``: sequence positions per logits chunk (:class:`Pass`; 0: whole logits)."""
    terms = tuple(terms)
    if not terms:
        raise ValueError("an objective needs at least one term")
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"objective terms must be unique, got {names}")
    frozen = tuple(dict.fromkeys(f for t in terms for f in t.frozen))

    def loss_fn(params, batch: Batch, frozen_trees) -> tuple[jax.Array, Metrics]:
        p = Pass(apply, params, batch, frozen_trees, chunk)
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for term in terms:
            if term.pairs and not p.pairs:
                raise ValueError(f"objective term {term.name!r} needs preference pairs")
            value, extra = term.fn(p)
            total = total + term.weight * value
            metrics[f"terms/{term.name}"] = value
            for key, v in extra.items():
                metrics.setdefault(key, v)
        metrics["loss"] = total
        return total, metrics

    return Objective(
        loss_fn,
        frozen=frozen,
        precompute=precompute,
        reference_checkpoint=reference_checkpoint,
        terms=tuple(names),
        chunk=chunk,
    )
