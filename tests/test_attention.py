"""Attention kernel selection (jaxcl.models.attention): the choice as a pure function of backend,
dtype, shapes, mask and window; the XLA path equal to jax.nn.dot_product_attention; the splash
kernel (Pallas interpreter on
CPU) and the cuDNN path (lowered for CUDA from this CPU) against a float64 numpy oracle / XLA."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
from flax import nnx

from jaxcl.models import attention as A
from jaxcl.models.attention import (
    AttentionCall,
    AttentionUnsupportedError,
    SegmentMask,
    causal_attention,
    reference_attention,
    select_attention,
)
from jaxcl.models.config import preset, to_hf_config
from jaxcl.models.llama import Decoder
from jaxcl.models.spec import ModelSpec


def call(**kw) -> AttentionCall:
    base = dict(
        backend="cuda",
        dtype="bfloat16",
        head_dim=64,
        num_heads=32,
        num_kv_heads=8,
        seq_len=2048,
        compute_capability=(9, 0),
    )
    return AttentionCall(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, impl, why",
    [
        (dict(backend="cpu"), "xla", "no fused attention kernel for backend cpu"),
        (dict(backend="rocm"), "xla", "backend rocm"),
        (dict(), "cudnn", ""),
        (dict(window=4096), "cudnn", ""),
        (dict(dtype="float16", compute_capability=(8, 0)), "cudnn", ""),
        (dict(dtype="float32"), "xla", "model.dtype is float32"),
        (dict(head_dim=160, compute_capability=(8, 6)), "xla", "at most 128"),
        (dict(head_dim=160), "cudnn", ""),  # Hopper: up to 256
        (dict(head_dim=100), "xla", "multiple of 8"),
        (dict(compute_capability=(7, 5)), "xla", "compute capability 8.0"),
        (dict(segments=True), "xla", "jax-ml/jax#30593"),
        (dict(dense_mask=True), "xla", "segment ids"),
        (dict(backend="tpu"), "splash", ""),
        (dict(backend="tpu", dtype="float32", segments=True, window=256), "splash", ""),
        (dict(backend="tpu", seq_len=100), "xla", "divisible by 128"),
        (dict(backend="tpu", dense_mask=True), "xla", "not an arbitrary dense mask"),
        (dict(backend="tpu", devices=8), "xla", "mesh in context"),
        (dict(backend="tpu", devices=8, mesh=True), "splash", ""),
    ],
)
def test_auto_picks_the_native_kernel_or_says_why_not(kw, impl, why):
    choice = select_attention("auto", call(**kw))
    assert choice.impl == impl
    assert why in choice.reason and (not why) == (not choice.reason)


def test_explicit_kernels_serve_or_refuse_naming_the_field():
    assert select_attention("xla", call(backend="tpu", dense_mask=True)).impl == "xla"
    assert select_attention("cudnn", call(window=8)).impl == "cudnn"
    assert select_attention("splash", call(backend="tpu", segments=True)).impl == "splash"
    with pytest.raises(AttentionUnsupportedError, match=r"model\.attention: cudnn.*backend is cpu"):
        select_attention("cudnn", call(backend="cpu"))
    with pytest.raises(AttentionUnsupportedError, match=r"model\.attention: cudnn.*packed rows"):
        select_attention("cudnn", call(segments=True))
    with pytest.raises(AttentionUnsupportedError, match=r"model\.attention: splash.*it is 100"):
        select_attention("splash", call(backend="tpu", seq_len=100))
    with pytest.raises(ValueError, match=r"model\.attention: unknown .*'flash'"):
        select_attention("flash", call())


def test_recipe_field_checks_what_the_config_rules_out():
    assert ModelSpec(preset="test-micro").attention == "auto"
    spec = ModelSpec(preset="test-micro", dtype="bfloat16", attention="cudnn")
    assert spec.overrides["attention"] == "cudnn"
    assert spec.abstract_model().config.attention == "cudnn"
    with pytest.raises(
        pydantic.ValidationError, match=r"attention: cudnn .*model.dtype is float32"
    ):
        ModelSpec(preset="test-micro", attention="cudnn")
    with pytest.raises(pydantic.ValidationError, match="attention"):
        ModelSpec(preset="test-micro", attention="flash")
    ModelSpec(preset="test-micro", attention="splash")  # float32 is fine on TPU
    # A runtime choice, kept out of the HF config round trip.
    hf = to_hf_config(preset("test-micro").replace(attention="xla")).to_dict()
    assert "attention" not in hf


def _qkv(b=2, t=128, n=4, k=2, h=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, kk, v = (rng.normal(size=(b, t, m, h)).astype(np.float32) for m in (n, k, k))
    return jnp.asarray(q, dtype), jnp.asarray(kk, dtype), jnp.asarray(v, dtype)


def _segments(b=2, t=128):
    ids = np.zeros((b, t), np.int32)
    ids[0, 50:] = 1
    ids[1, 20:90], ids[1, 90:] = 1, 2
    return ids


def _torch_float64_grads(q, k, v, seg, window):
    """Gradients of ``Σ sin(attention(q, k, v))`` in float64 by torch autograd through the
    textbook formula (grouped heads repeated, additive -inf mask): an independent oracle."""
    import torch

    t = q.shape[1]
    qt, kt, vt = (
        torch.tensor(np.asarray(a, np.float64)).transpose(1, 2).requires_grad_() for a in (q, k, v)
    )
    group = q.shape[2] // k.shape[2]
    keys, values = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = np.broadcast_to(j <= i, (q.shape[0], 1, t, t))
    if window is not None:
        allowed = allowed & (i - j < window)
    if seg is not None:
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    bias = torch.tensor(np.where(allowed, 0.0, -np.inf))
    logits = qt @ keys.transpose(-1, -2) / np.sqrt(q.shape[-1]) + bias
    out = torch.softmax(logits, -1) @ values
    torch.sin(out).sum().backward()
    return [a.grad.transpose(1, 2).numpy() for a in (qt, kt, vt)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("packed", [False, True])
def test_xla_path_equals_jax_dot_product_attention(window, packed, dtype):
    """The head-major XLA path (its backward recomputes the probabilities) computes
    jax.nn.dot_product_attention's function: outputs and q/k/v gradients within 1e-5 relative
    in float32; in bf16 the same outputs, and gradients as near torch's float64 autograd as
    jax's own (both within about one bf16 rounding)."""
    q, k, v = _qkv(dtype=dtype)
    seg = _segments() if packed else None
    dense = None if seg is None else jnp.asarray(seg[:, None, :, None] == seg[:, None, None, :])

    def jax_nn(q, k, v):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=dense,
            is_causal=True,
            local_window_size=None if window is None else (window - 1, 0),
        )

    mask = None if seg is None else SegmentMask(jnp.asarray(seg))

    def loss(f):
        return lambda *qkv: jnp.sum(jnp.sin(f(*qkv).astype(jnp.float32)))

    want = jax_nn(q, k, v)
    want_grads = jax.grad(loss(jax_nn), argnums=(0, 1, 2))(q, k, v)
    for impl in ("xla", "auto"):  # on CPU auto is XLA
        path = functools.partial(causal_attention, mask=mask, window=window, impl=impl)
        got, grads = path(q, k, v), jax.grad(loss(path), argnums=(0, 1, 2))(q, k, v)
        if dtype == jnp.bfloat16:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            truth = _torch_float64_grads(q, k, v, seg, window)
            for g, w, t64 in zip(grads, want_grads, truth):
                scale = np.abs(t64).max()
                ours = np.abs(np.asarray(g, np.float64) - t64).max() / scale
                theirs = np.abs(np.asarray(w, np.float64) - t64).max() / scale
                assert ours <= max(1.25 * theirs, 2**-8), (ours, theirs)
            continue
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))
        truth = _torch_float64_grads(q, k, v, seg, window)
        for g, t64 in zip(grads, truth):
            np.testing.assert_allclose(g, t64, rtol=0, atol=1e-5 * np.abs(t64).max())
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, reference_attention(q, k, v, seg, window), atol=2e-6)


def test_xla_path_keeps_no_probabilities_for_the_backward_pass():
    """The residuals of the XLA path's backward pass are q, k, v, the mask and the per-row
    log-sum-exp: no ``[.., T, S]`` float32 array (what autodiff of softmax would keep)."""
    q, k, v = _qkv(t=64)
    _, residuals = jax.vjp(lambda q, k, v: causal_attention(q, k, v, impl="xla"), q, k, v)
    leaves = [x for x in jax.tree.leaves(residuals) if hasattr(x, "dtype")]
    float_tt = [x.shape for x in leaves if x.dtype == jnp.float32 and x.shape[-2:] == (64, 64)]
    assert not float_tt, float_tt


def test_xla_path_takes_a_per_head_dense_mask():
    """A boolean mask with a head axis of N (as broadcastable to [B, N, T, S]) masks each query
    head on its own, as jax.nn.dot_product_attention does; another head count is refused."""
    q, k, v = _qkv(t=32)
    rng = np.random.default_rng(3)
    dense = rng.random((2, 4, 32, 32)) < 0.7
    dense |= np.eye(32, dtype=bool)  # every query keeps itself
    want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(dense), is_causal=True)
    got = causal_attention(q, k, v, jnp.asarray(dense), impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="head axis must be 1 or 4"):
        causal_attention(q, k, v, jnp.asarray(dense[:, :3]), impl="xla")


def test_auto_fallback_is_logged_once_on_an_accelerator(monkeypatch, caplog):
    monkeypatch.setattr(A, "current_backend", lambda: "tpu")
    monkeypatch.setattr(A, "_LOGGED", set())
    q, k, v = _qkv(t=96)
    with caplog.at_level(logging.WARNING, logger="jaxcl.models.attention"):
        for _ in range(2):
            causal_attention(q, k, v, impl="auto")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "divisible by 128; it is 96" in messages[0]


@pytest.fixture
def on_tpu(monkeypatch):
    """Selection sees a TPU; the splash kernel then runs in the Pallas interpreter on CPU."""
    monkeypatch.setattr(A, "current_backend", lambda: "tpu")


@pytest.mark.parametrize("window, packed", [(None, False), (40, True)])
def test_splash_matches_the_oracle_and_xla_gradients(on_tpu, window, packed):
    q, k, v = _qkv()
    seg = _segments() if packed else None
    mask = None if seg is None else SegmentMask(jnp.asarray(seg))
    out = causal_attention(q, k, v, mask, window=window, impl="splash")
    np.testing.assert_allclose(out, reference_attention(q, k, v, seg, window), atol=2e-5)

    def loss(impl, q, k, v):
        o = causal_attention(q, k, v, mask, window=window, impl=impl)
        return jnp.sum(jnp.sin(o))

    splash = jax.grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2))(q, k, v)
    xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(splash, xla):
        np.testing.assert_allclose(a, b, atol=5e-5)


SPLASH_ON_A_MESH = """
import jax, numpy as np
from jaxcl import parallel
from jaxcl.models import attention as A
A.current_backend = lambda: "tpu"
rng = np.random.default_rng(0)
q = rng.normal(size=(2, 128, 4, 16)).astype(np.float32)
k, v = (rng.normal(size=(2, 128, 2, 16)).astype(np.float32) for _ in range(2))
seg = np.zeros((2, 128), np.int32)
seg[0, 60:] = 1
with jax.set_mesh(parallel.make_mesh({"data": 2, "tensor": 2})):
    attend = lambda q, k, v, s: A.causal_attention(q, k, v, A.SegmentMask(s), window=50,
                                                   impl="splash")
    f = jax.jit(attend)
    assert "sdy.manual_computation" in f.lower(q, k, v, seg).as_text()  # under shard_map
    out = f(q, k, v, seg)
print(float(np.abs(np.asarray(out) - A.reference_attention(q, k, v, seg, 50)).max()))
"""


def test_splash_runs_under_shard_map_on_a_mesh():
    """4 fake devices, batch over data and heads over tensor: the oracle's numbers."""
    from tests.fake_devices import run_on_fake_devices

    assert float(run_on_fake_devices(SPLASH_ON_A_MESH, devices=4).split()[-1]) < 2e-5


@pytest.mark.slow
def test_a_packed_model_trains_the_same_through_splash(on_tpu):
    """The decoder end to end: loss gradients with packed rows, splash vs XLA (float32)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 128)), jnp.int32)
    seg = jnp.asarray(_segments())
    grads = {}
    for impl in ("xla", "splash"):
        graphdef, params = nnx.split(
            Decoder(preset("test-micro").replace(attention=impl), rngs=nnx.Rngs(0)), nnx.Param
        )

        def loss(p, graphdef=graphdef):
            return nnx.merge(graphdef, p)(ids, segment_ids=seg).std()

        grads[impl] = jax.jit(jax.grad(loss))(params)
    for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["splash"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_cudnn_path_lowers_to_cudnn_custom_calls_for_cuda(monkeypatch):
    """No GPU here: the model's bf16 train gradient is lowered for the CUDA platform from CPU
    (cuDNN's version check stubbed) and must hold cuDNN's fused forward and backward calls, with
    the sliding window passed to the kernel; explicit cudnn with packed rows is refused."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    from jax import export

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(A, "current_backend", lambda: "cuda")
    monkeypatch.setattr(A, "compute_capability", lambda: (9, 0))
    cfg = preset("test-mistral").replace(dtype="bfloat16", attention="auto")  # window 8
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.zeros((2, 64), jnp.int32)

    def loss(p, ids, seg=None):
        return nnx.merge(graphdef, p)(ids, segment_ids=seg).std()

    checks = [
        export.DisabledSafetyCheck.custom_call(name)
        for name in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
    ]
    exported = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"], disabled_checks=checks)
    text = exported(params, ids).mlir_module()
    assert text.count("__cudnn$fmhaSoftmax(") == cfg.num_layers
    assert text.count("__cudnn$fmhaSoftmaxBackward(") == cfg.num_layers
    assert "\\22sliding_window_length\\22: 8" in text
    # Packed rows: auto falls back to XLA (no cuDNN call), explicit cudnn is refused.
    seg = jnp.zeros((2, 64), jnp.int32)
    text = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"])(
        params, ids, seg
    ).mlir_module()
    assert "__cudnn" not in text
    graphdef, params = nnx.split(
        Decoder(cfg.replace(attention="cudnn"), rngs=nnx.Rngs(0)), nnx.Param
    )
    with pytest.raises(AttentionUnsupportedError, match=r"model\.attention: cudnn.*packed rows"):
        jax.eval_shape(jax.grad(loss), params, ids, seg)
