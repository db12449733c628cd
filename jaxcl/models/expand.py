"""Block expansion (LLaMA Pro, Wu et al. 2024): deeper decoders, new blocks starting as identity.

The ``L`` decoder blocks are cut into ``L / every`` groups of ``every`` consecutive blocks, and a
copy of each group's last block is inserted right after it. In the copy the output projections
(attention ``o`` and MLP ``down``, and their biases when the model has them) are zero, so the
block adds nothing to the residual stream::

    h = x + Attn(norm(x))·0 = x,    y = h + MLP(norm(h))·0 = h

and the expanded model computes exactly (bit for bit) what the original did. Training only the
inserted blocks then adds capacity for a new domain while the original blocks, the embeddings
and the output head stay as they were (:class:`jaxcl.methods.block_expansion.BlockExpansionSpec`).

:func:`expand_blocks` works on pure-dict parameters in either layout (``layers: {0: ..., 1: ...}``
or the ``scan_layers`` stack ``[layers, ...]``) and returns the deeper config, so the result is a
plain Llama-family decoder: :func:`jaxcl.models.save_pretrained` writes it as an ordinary HF
directory with ``num_hidden_layers = L + L / every``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl.models.config import ModelConfig
from jaxcl.models.llama import stack_layers, unstack_layers

#: ``(module, parameter)`` pairs zeroed in an inserted block: its writes to the residual stream
ZEROED = (("attn", "o"), ("attn", "o_bias"), ("mlp", "down"), ("mlp", "down_bias"))


def check_every(num_layers: int, every: int, field: str = "every") -> None:
    """Refuse an interval that is not a positive divisor of the layer count, naming ``field``."""
    if not isinstance(every, int) or every < 1 or num_layers % every:
        raise ValueError(
            f"{field}: {every!r} must be a positive divisor of the model's {num_layers} layers "
            f"(num_layers); e.g. {', '.join(str(d) for d in _divisors(num_layers))}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def new_layer_ids(num_layers: int, every: int) -> list[int]:
    """Indices, in the expanded model of ``num_layers + num_layers / every`` layers, of the
    inserted blocks: ``every``, ``2·every + 1``, ... (the last of each group of ``every + 1``)."""
    check_every(num_layers, every)
    return [g * (every + 1) + every for g in range(num_layers // every)]


def expanded_config(cfg: ModelConfig, every: int) -> ModelConfig:
    """``cfg`` with ``num_layers + num_layers / every`` layers."""
    check_every(cfg.num_layers, every)
    return cfg.replace(num_layers=cfg.num_layers + cfg.num_layers // every)


def _identity_copy(layer: dict) -> dict:
    """A copy of one layer's parameters with its output projections zeroed."""
    out = jax.tree.map(lambda x: jnp.array(x, copy=True), layer)
    for module, name in ZEROED:
        if name in out.get(module, {}):
            out[module][name] = jnp.zeros_like(out[module][name])
    return out


def expand_blocks(
    params: dict, cfg: ModelConfig, *, every: int
) -> tuple[dict, ModelConfig, list[int]]:
    """Insert an identity copy of a block after every ``every``-th block.

    ``params``: a pure dict (``nnx.to_pure_dict`` of the model's ``nnx.Param`` state), per-layer
    or stacked (``cfg.scan_layers``); the result has the same layout. Returns ``(params, config,
    new_layer_ids)``: the deeper parameters, the config with the new ``num_layers``, and the
    indices of the inserted blocks in the expanded model. Raises ``ValueError`` naming ``every``
    when it does not divide ``cfg.num_layers``.
    """
    check_every(cfg.num_layers, every)
    scanned = not (
        isinstance(params["layers"], dict) and all(isinstance(k, int) for k in params["layers"])
    )
    layers = unstack_layers(params)["layers"]
    if len(layers) != cfg.num_layers:
        raise ValueError(
            f"params hold {len(layers)} layers but the config says num_layers={cfg.num_layers}"
        )
    out: list[dict] = []
    for i in range(cfg.num_layers):
        out.append(layers[i])
        if (i + 1) % every == 0:
            out.append(_identity_copy(layers[i]))
    expanded = {**params, "layers": dict(enumerate(out))}
    if scanned:
        expanded = stack_layers(expanded)
    return expanded, expanded_config(cfg, every), new_layer_ids(cfg.num_layers, every)


def expand_model(model: nnx.Module, *, every: int) -> tuple[nnx.Module, list[int]]:
    """The NNX form of :func:`expand_blocks`: a new, deeper :class:`~jaxcl.models.Decoder`
    (the given one is left as is) and the indices of the inserted blocks. LoRA adapters are not
    carried over: merge them first (:func:`jaxcl.models.lora.merge`)."""
    from jaxcl.models.pretrained import model_from_params

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params, cfg, ids = expand_blocks(params, model.config, every=every)
    return model_from_params(cfg, params), ids


def layer_mask(params: Any, layer_ids: list[int]) -> Any:
    """A pytree shaped like ``params`` (per-layer or stacked) saying, per leaf, which entries
    belong to the layers ``layer_ids``: Python ``True``/``False`` for per-layer leaves and the
    embeddings, a boolean ``[layers, 1, ...]`` array for a stacked leaf (row ``i`` true iff
    ``i ∈ layer_ids``)."""
    ids = set(layer_ids)

    def leaf(path: tuple, x: Any) -> Any:
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
        if not keys or keys[0] != "layers":
            return False
        if len(keys) > 1 and isinstance(keys[1], int):
            return keys[1] in ids
        n = x.shape[0]
        rows = jnp.asarray([i in ids for i in range(n)])
        return rows.reshape((n,) + (1,) * (len(x.shape) - 1))

    return jax.tree_util.tree_map_with_path(leaf, params)
