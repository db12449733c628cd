"""Causal self-attention kernels, chosen per call: XLA, cuDNN fused (GPU), Pallas splash (TPU).

Every kernel computes the same function: for queries ``q [batch, T, N, H]`` and keys/values
``k, v [batch, T, K, H]`` (grouped-query attention when ``K < N``: query head ``n`` reads key head
``n // (N/K)``),

    out[b, i, n] = Σ_j softmax_j( q[b,i,n]·k[b,j,n//G] / √H  |  allowed(i, j) ) · v[b,j,n//G]

with ``allowed(i, j) = j ≤ i`` (causal), ``∧ i − j < W`` under a sliding window of ``W`` tokens,
``∧ seg[b,i] = seg[b,j]`` for packed rows (segment ids).

Which kernel runs is the model config's ``attention`` field (recipe: ``model.attention``):

- ``xla``: :func:`jax.nn.dot_product_attention` with its default implementation (what jaxcl has
  always run; every feature, every backend).
- ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's fused flash
  attention on NVIDIA GPUs. JAX 0.10.2's rules (``jax._src.cudnn.fused_attention_stablehlo``):
  fp16/bf16 inputs, head dim a multiple of 8 and at most 128 (256 from compute capability 9.0,
  Hopper), compute capability 8.0 or newer (cuDNN's flash kernels). Sliding windows are native.
  Packed rows are refused: JAX hands a mask to cuDNN as a dense ``[B, 1, T, T]`` bias and always
  asks for the bias gradient, which cuDNN supports only at batch 1 (jax-ml/jax#30593).
- ``splash``: the Pallas TPU splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), block-sparse over the causal / local
  mask, with segment ids and grouped-query heads native. Needs the sequence length to be a
  multiple of 128 (its kv block), and on more than one device the mesh in context
  (``jax.set_mesh``), to run it under ``shard_map`` (batch over ``data``/``fsdp``, heads over
  ``tensor``).
- ``auto`` (default): ``cudnn`` on a CUDA GPU and ``splash`` on a TPU when the call qualifies,
  ``xla`` otherwise; the reason for a fallback on an accelerator is logged once.

An explicit ``cudnn`` or ``splash`` that cannot serve a call raises
:class:`AttentionUnsupportedError` naming ``model.attention`` and the reason. The KV-cache decode
path (generation) always runs XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.models.matmul import in_backward

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
FIELD = "model.attention"
SPLASH_BLOCKS = (512, 256, 128)  # kv/q block sizes tried, largest dividing the sequence first
_HALF = ("bfloat16", "float16")
_F32 = jnp.float32


class AttentionUnsupportedError(ValueError):
    """An explicitly requested kernel cannot serve this call (names ``model.attention``)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Packed rows: token ``i`` attends to token ``j`` only when ``segment_ids[b, i] ==
    segment_ids[b, j]`` (on top of the causal mask). Kept as ids (not a dense mask) so that the
    kernels that take segment ids natively get them."""

    segment_ids: jax.Array  # [batch, seq] integers

    def dense(self) -> jax.Array:
        """The boolean mask ``[batch, 1, seq, seq]`` XLA's attention takes."""
        s = self.segment_ids
        return s[:, None, :, None] == s[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What kernel selection looks at: a pure description of one attention call.

    ``backend``: ``cpu``, ``cuda``, ``rocm`` or ``tpu``; ``compute_capability``: ``(major,
    minor)`` of a CUDA device, ``None`` when unknown; ``segments``: packed rows given as segment
    ids; ``dense_mask``: some other boolean mask; ``window``: sliding window ``W`` or ``None``;
    ``devices``: devices the call is spread over; ``mesh``: whether a mesh is in context.
    """

    backend: str
    dtype: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    segments: bool = False
    dense_mask: bool = False
    window: int | None = None
    compute_capability: tuple[int, int] | None = None
    devices: int = 1
    mesh: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """The kernel that runs (``xla``, ``cudnn`` or ``splash``) and why (empty when the request
    was served as asked)."""

    impl: str
    reason: str = ""


def cudnn_problems(call: AttentionCall) -> list[str]:
    """Why cuDNN's fused attention cannot serve ``call`` (empty: it can)."""
    out = []
    if call.backend != "cuda":
        out.append(f"cuDNN attention needs a CUDA GPU; this backend is {call.backend}")
    if call.dtype not in _HALF:
        out.append(
            f"cuDNN attention needs bfloat16 or float16 compute; model.dtype is {call.dtype}"
        )
    cc = call.compute_capability
    h_max = 256 if cc is not None and cc >= (9, 0) else 128
    if call.head_dim % 8 or call.head_dim > h_max:
        out.append(
            f"cuDNN attention needs a head dim that is a multiple of 8 and at most {h_max}; "
            f"it is {call.head_dim}"
        )
    if cc is not None and cc < (8, 0):
        out.append(
            f"cuDNN flash attention needs compute capability 8.0 or newer; this GPU has "
            f"{cc[0]}.{cc[1]}"
        )
    if call.segments or call.dense_mask:
        out.append(
            "packed rows (segment ids) reach cuDNN only as a dense bias whose gradient it "
            "supports at batch 1 only (jax-ml/jax#30593)"
        )
    return out


def splash_block(seq_len: int) -> int | None:
    """The splash block size for ``seq_len`` (the largest of 512, 256, 128 dividing it)."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def splash_problems(call: AttentionCall) -> list[str]:
    """Why the Pallas splash kernel cannot serve ``call`` (empty: it can)."""
    out = []
    if call.backend != "tpu":
        out.append(f"splash attention is a TPU kernel; this backend is {call.backend}")
    if splash_block(call.seq_len) is None:
        out.append(
            f"splash attention needs a sequence length divisible by 128; it is {call.seq_len}"
        )
    if call.dense_mask:
        out.append("splash attention takes segment ids, not an arbitrary dense mask")
    if call.devices > 1 and not call.mesh:
        out.append(
            f"splash attention on {call.devices} devices runs under shard_map and needs the "
            "mesh in context (jax.set_mesh)"
        )
    return out


PROBLEMS = {"cudnn": cudnn_problems, "splash": splash_problems}
NATIVE = {"cuda": "cudnn", "tpu": "splash"}


def config_problems(impl: str, cfg: Any) -> list[str]:
    """What a model config (:class:`jaxcl.models.config.ModelConfig`) alone rules out for the
    kernel ``impl``, on its own backend and the most capable device (checked when a recipe is
    read; the backend, device, batch and sequence are checked when the step is traced)."""
    if impl not in PROBLEMS:
        return []
    call = AttentionCall(
        backend={v: k for k, v in NATIVE.items()}[impl],
        dtype=cfg.dtype,
        head_dim=cfg.resolved_head_dim,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        seq_len=128 * 512,
        window=cfg.sliding_window,
        compute_capability=(9, 0),
    )
    return PROBLEMS[impl](call)


def select_attention(requested: str, call: AttentionCall) -> Choice:
    """The kernel for ``call``: a pure function of the request and the call's description.

    ``xla`` always serves. ``cudnn`` / ``splash`` serve when their ``*_problems`` list is empty
    and raise :class:`AttentionUnsupportedError` (naming ``model.attention``) otherwise.
    ``auto`` takes the backend's native kernel (cuDNN on CUDA, splash on TPU) when it serves and
    XLA otherwise, with the reason.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(
            f"{FIELD}: unknown attention kernel {requested!r}; valid: {', '.join(ATTENTION_IMPLS)}"
        )
    if requested == "xla":
        return Choice("xla")
    if requested != "auto":
        problems = PROBLEMS[requested](call)
        if problems:
            raise AttentionUnsupportedError(
                f"{FIELD}: {requested} cannot serve this model/batch: {'; '.join(problems)} "
                "(use attention: auto to fall back to XLA where it cannot)"
            )
        return Choice(requested)
    native = NATIVE.get(call.backend)
    if native is None:
        return Choice("xla", f"no fused attention kernel for backend {call.backend}")
    problems = PROBLEMS[native](call)
    if problems:
        return Choice("xla", f"{native} not used: {'; '.join(problems)}")
    return Choice(native)


# ----------------------------------------------------------------------------- the running process


def current_backend() -> str:
    """``cpu``, ``cuda``, ``rocm`` or ``tpu``: the default backend of this process."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "") or ""
        return "rocm" if "rocm" in version.lower() else "cuda"
    return backend


def compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the first CUDA device, ``None`` elsewhere."""
    text = getattr(jax.devices()[0], "compute_capability", None)
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def _mesh_devices() -> tuple[bool, int]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return True, int(mesh.size)
    return False, jax.device_count()


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning("attention: %s", message)


def describe(
    q: jax.Array, k: jax.Array, mask: Any, window: int | None, backend: str | None = None
) -> AttentionCall:
    """The :class:`AttentionCall` of ``q [B,T,N,H]``, ``k [B,T,K,H]`` in this process."""
    backend = backend or current_backend()
    in_mesh, devices = _mesh_devices()
    return AttentionCall(
        backend=backend,
        dtype=jnp.dtype(q.dtype).name,
        head_dim=int(q.shape[-1]),
        num_heads=int(q.shape[2]),
        num_kv_heads=int(k.shape[2]),
        seq_len=int(q.shape[1]),
        segments=isinstance(mask, SegmentMask),
        dense_mask=mask is not None and not isinstance(mask, SegmentMask),
        window=window,
        compute_capability=compute_capability() if backend == "cuda" else None,
        devices=devices,
        mesh=in_mesh,
    )


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: SegmentMask | jax.Array | None = None,
    *,
    window: int | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Causal self-attention ``[B,T,N,H]`` (see the module docstring) by the kernel ``impl``
    selects for this call (:func:`select_attention`). ``mask``: a :class:`SegmentMask`, a boolean
    ``[B,1,T,T]`` mask (XLA only) or ``None``; ``window``: sliding window ``W`` (``W`` most recent
    tokens, itself included) or ``None``."""
    choice = select_attention(impl, describe(q, k, mask, window))
    if choice.reason and current_backend() in NATIVE:
        _log_once(f"auto chose xla: {choice.reason}")
    if choice.impl == "cudnn":
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            local_window_size=None if window is None else (window - 1, 0),
            implementation="cudnn",
        )
    if choice.impl == "splash":
        segments = mask.segment_ids if isinstance(mask, SegmentMask) else None
        return splash_attention(q, k, v, segments, window=window)
    return xla_attention(q, k, v, mask, window=window)


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: SegmentMask | jax.Array | None = None,
    *,
    window: int | None = None,
) -> jax.Array:
    """The XLA path: ``jax.nn.dot_product_attention``'s XLA implementation, computed head-major.

    The same arithmetic as ``jax.nn.dot_product_attention(q, k, v, mask, is_causal=True,
    local_window_size=...)`` (float32 logits and softmax, masked logits set to its large negative
    number, probabilities cast to the value dtype; tests/test_attention.py holds them equal),
    but with queries grouped as ``[B, K, G, T, H]`` (query head ``n = k·G + g``) and keys and
    values as ``[B, K, S, H]``: every batched matmul, forward and backward, then has its batch
    axes leading and needs no transposed copy fused into the softmax's elementwise ops, which
    XLA:CPU writes one element at a time (docs/performance.md: 16.5 → 8.8 ms per layer, forward
    and backward, at the tiny preset's 16 × 96 in float32). ``mask``: a :class:`SegmentMask` or
    a boolean mask broadcastable to ``[B, N, T, S]`` with a head axis of 1 or ``N``.
    """
    b, t, n, h = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    groups = n // kv_heads
    q_heads = q.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    allowed = _causal_allowed(t, s, window)[None, None, None]
    if mask is not None:
        allowed = allowed & _grouped_mask(mask, b, kv_heads, groups, t, s)
    out = _attend(q_heads, k_heads, v_heads, allowed)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _probs(q, k, allowed) -> tuple[jax.Array, jax.Array]:
    """``(softmax probabilities [B,K,G,T,S], log-sum-exp [B,K,G,T])`` in float32, masked
    logits at :data:`_LARGE_NEGATIVE` as ``jax.nn.softmax`` of ``jax.nn.dot_product_attention``
    sees them."""
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed, logits * jnp.float32(q.shape[-1] ** -0.5), _LARGE_NEGATIVE)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - peak)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / total, (peak + jnp.log(total))[..., 0]


@jax.custom_vjp
def _attend(q, k, v, allowed):
    """``softmax(q·kᵀ/√H | allowed)·v`` head-major: ``q [B,K,G,T,H]``, ``k, v [B,K,S,H]``."""
    return _attend_fwd(q, k, v, allowed)[0]


def _attend_fwd(q, k, v, allowed):
    probs, lse = _probs(q, k, allowed)
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v, preferred_element_type=_F32)
    return out.astype(v.dtype), (q, k, v, allowed, lse)


def _attend_bwd(residuals, g):
    """Recompute the probabilities from ``q, k`` and the saved log-sum-exp (as flash attention
    does) instead of keeping a ``[T, S]`` float32 array per layer for the backward pass:

        P = exp(s − lse),  dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − Σ_S P ⊙ dP),
        dQ = dS·K/√H,  dK = dSᵀ·Q/√H.
    """
    (q, k, v, allowed, lse), g = in_backward(residuals, g)
    logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=_F32)
    logits = jnp.where(allowed, logits * jnp.float32(q.shape[-1] ** -0.5), _LARGE_NEGATIVE)
    probs = jnp.exp(logits - lse[..., None])
    dv = jnp.einsum("bkgts,bkgth->bksh", probs.astype(g.dtype), g, preferred_element_type=_F32)
    dprobs = jnp.einsum("bkgth,bksh->bkgts", g, v, preferred_element_type=_F32)
    dlogits = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True))
    dlogits = dlogits * jnp.float32(q.shape[-1] ** -0.5)  # float32, as autodiff keeps it
    dq = jnp.einsum("bkgts,bksh->bkgth", dlogits, k.astype(_F32))
    dk = jnp.einsum("bkgts,bkgth->bksh", dlogits, q.astype(_F32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


# jax.nn.dot_product_attention's masked logit (jax._src.nn.functions._get_large_negative)
_LARGE_NEGATIVE = float(-0.7 * np.finfo(np.float32).max)


def _causal_allowed(t: int, s: int, window: int | None) -> jax.Array:
    """``[T, S]``: query ``i`` may attend key ``j`` iff ``j ≤ i`` (and ``i − j < W``), counted
    from the first key as ``jax.nn.dot_product_attention`` does."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def _grouped_mask(mask: SegmentMask | jax.Array, b: int, kv_heads: int, groups: int, t, s):
    """A mask broadcastable to ``[B, N, T, S]`` as ``[B|1, K|1, G|1, T, S]``."""
    dense = mask.dense() if isinstance(mask, SegmentMask) else jnp.asarray(mask)
    dense = jnp.broadcast_to(dense, (*dense.shape[:-2], t, s)) if dense.ndim >= 2 else dense
    while dense.ndim < 4:
        dense = dense[None]
    if dense.shape[1] == 1:
        return dense[:, :, None]
    if dense.shape[1] != kv_heads * groups:
        raise ValueError(
            f"attention mask {tuple(dense.shape)}: its head axis must be 1 or {kv_heads * groups}"
        )
    return dense.reshape(dense.shape[0], kv_heads, groups, t, s)


# ----------------------------------------------------------------------------- splash (TPU)


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, seq_len: int, window: int | None, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (seq_len, seq_len)
    if window is None:
        head_mask = sa.CausalMask(shape)
    else:
        head_mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    block = splash_block(seq_len)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([head_mask] * num_heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _splash_local(q, k, v, segment_ids, *, window: int | None) -> jax.Array:
    """Splash on one device's shard: ``q [B,T,N,H]`` → kernel layout ``[N,T,H]`` per example."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    interpret = jax.default_backend() != "tpu"  # only tests reach splash off a TPU
    kernel = _splash_kernel(q.shape[2], q.shape[1], window, interpret)
    scale = q.shape[-1] ** -0.5
    qt = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        seg = segment_ids.astype(jnp.int32)
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, SegmentIds(q=s, kv=s)))(qt, kt, vt, seg)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    window: int | None = None,
) -> jax.Array:
    """Causal (or local, ``window``) attention by the Pallas splash kernel, ``[B,T,N,H]`` in and
    out, with packed rows as ``segment_ids [B,T]``. Under a mesh of several devices it runs in
    ``shard_map``: batch over the ``data``/``fsdp`` axes it divides by, heads over ``tensor``
    when both head counts divide by it."""
    run = functools.partial(_splash_local, window=window)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return run(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    batch_axes, size = [], 1
    for axis in ("data", "fsdp"):
        n = dict(mesh.shape).get(axis, 1)
        if n > 1 and q.shape[0] % (size * n) == 0:
            batch_axes.append(axis)
            size *= n
    t = dict(mesh.shape).get("tensor", 1)
    heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    batch = tuple(batch_axes) or None
    qkv = P(batch, None, heads, None)
    seg = P(batch, None)
    if segment_ids is None:
        fn = jax.shard_map(
            lambda a, b, c: run(a, b, c, None),
            in_specs=(qkv, qkv, qkv),
            out_specs=qkv,
            check_vma=False,
        )
        return fn(q, k, v)
    fn = jax.shard_map(run, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False)
    return fn(q, k, v, segment_ids)


def reference_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    segment_ids: np.ndarray | None = None,
    window: int | None = None,
) -> np.ndarray:
    """A float64 numpy oracle of the module docstring's formula (for tests and the device check)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    group = n // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bind,bjnd->bnij", q, k) / np.sqrt(h)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = np.broadcast_to(j <= i, (b, 1, t, t))
    if window is not None:
        allowed = allowed & (i - j < window)
    if segment_ids is not None:
        s = np.asarray(segment_ids)
        allowed = allowed & (s[:, None, :, None] == s[:, None, None, :])
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnij,bjnd->bind", weights, v)
