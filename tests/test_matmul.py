"""The decoder's hand-written backward passes (jaxcl.models.matmul: linear, swiglu, rms_norm;
llama.apply_rope) against independent oracles: numpy in float64 for each rule, and
transformers + torch for the gradient of every parameter of a whole model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxcl.models import from_pretrained, matmul
from jaxcl.models.hf import param_map
from jaxcl.models.llama import apply_rope, rope_tables
from jaxcl.models.matmul import linear, rms_norm, swiglu


def _arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _numpy_linear_grads(x, w, g):
    """float64 ``(x·w, gᵀ-contractions)``: ``dx = g·wᵀ``, ``dw = Σ_tokens xᵀ·g``."""
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    y = x64 @ w64
    dx = g64 @ w64.T
    dw = x64.reshape(-1, x.shape[-1]).T @ g64.reshape(-1, g.shape[-1])
    return y, dx, dw


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_float32_matches_numpy_float64(transposed):
    """``x·w`` and, ``transposed`` (a tied output head), ``x·wᵀ`` with ``w [f, d]``."""
    x, w, g = _arrays((3, 17, 24), (24, 40), (3, 17, 40))
    stored = w.T.copy() if transposed else w
    fn = jax.jit(lambda x, w: linear(x, w, transposed=transposed))
    y, pullback = jax.vjp(fn, jnp.asarray(x), jnp.asarray(stored))
    dx, dw = pullback(jnp.asarray(g))
    want_y, want_dx, want_dw = _numpy_linear_grads(x, w, g)
    if transposed:
        want_dw = want_dw.T
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32


@pytest.fixture(params=["cpu", "other"])
def backend_path(request, monkeypatch):
    """Both weight-gradient paths on this CPU: XLA:CPU's (barrier / gather transpose) and the
    plain transposed dot other backends get."""
    if request.param == "other":
        monkeypatch.setattr(matmul, "_separate_transposes", lambda: False)
    else:  # this process's one CPU device takes the gather path in bf16
        assert matmul._separate_transposes() and matmul._gather_for(jnp.bfloat16)
    return request.param


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_bf16_weight_gradient_on_each_path(backend_path, transposed):
    """bf16 compute, float32 weight: ``∂W`` equals the float64 product of the bf16 operands
    within float32 rounding on either path, stored or transposed."""
    x, w, g = _arrays((4, 24, 40), (40, 56), (4, 24, 56), seed=5)
    xb, gb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    stored = w.T.copy() if transposed else w
    fn = jax.jit(lambda x, w: linear(x, w, transposed=transposed))
    _, pullback = jax.vjp(fn, xb, jnp.asarray(stored))
    dx, dw = pullback(gb)
    want = np.asarray(xb, np.float64).reshape(-1, 40).T @ np.asarray(gb, np.float64).reshape(-1, 56)
    want = want.T if transposed else want
    assert dw.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_linear_bf16_rounds_once_and_keeps_a_float32_weight_gradient():
    """bf16 activations with float32 master weights: the output and ∂x are the float64 result
    rounded once to bf16; ∂W comes back in float32, nearer the float64 truth than autodiff of
    ``x @ w.astype(bf16)``, which rounds it to bf16 first."""
    x, w, g = _arrays((4, 32, 64), (64, 48), (4, 32, 48), seed=1)
    xb, gb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    y, pullback = jax.vjp(linear, xb, jnp.asarray(w))
    dx, dw = pullback(gb)
    x_r, g_r = np.asarray(xb, np.float32), np.asarray(gb, np.float32)
    w_r = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)
    want_y, want_dx, want_dw = _numpy_linear_grads(x_r, w_r, g_r)
    assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    for got, want in ((y, want_y), (dx, want_dx)):
        rounded = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float32)
        # one rounding of a float32 accumulation: equal to the rounded truth up to one bf16 ulp
        np.testing.assert_allclose(np.asarray(got, np.float32), rounded, rtol=2**-7, atol=1e-6)
    _, autodiff_pullback = jax.vjp(lambda x, w: x @ w.astype(x.dtype), xb, jnp.asarray(w))
    autodiff_dw = autodiff_pullback(gb)[1]
    ours_err = np.abs(np.asarray(dw) - want_dw).max()
    autodiff_err = np.abs(np.asarray(autodiff_dw) - want_dw).max()
    assert ours_err < 1e-5 * np.abs(want_dw).max() < autodiff_err


def _dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in ``jaxpr`` and the jaxprs nested in it."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(eqn.outvars[0].aval.shape)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                shapes += _dot_shapes(getattr(inner, "jaxpr", inner))
    return shapes


def test_linear_output_head_in_bf16_returns_float32_logits():
    """The output head's call: bf16 hidden states, a float32 tied table ``[V, d]``, float32
    logits equal to the float64 product of the bf16-rounded operands; its gradient reaches
    ``x`` in bf16 and the table in float32."""
    x, table, g = _arrays((2, 9, 32), (50, 32), (2, 9, 50), seed=4)
    xb = jnp.asarray(x, jnp.bfloat16)
    fn = functools.partial(linear, transposed=True, out_dtype=jnp.float32)
    y, pullback = jax.vjp(fn, xb, jnp.asarray(table))
    dx, dtable = pullback(jnp.asarray(g))
    table_r = np.asarray(jnp.asarray(table, jnp.bfloat16), np.float64)
    want = np.asarray(xb, np.float64) @ table_r.T
    assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dtable.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-5 * np.abs(want).max())
    g_r = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)  # the compute dtype's g
    want_dtable = g_r.reshape(-1, 50).T @ np.asarray(xb, np.float64).reshape(-1, 32)
    np.testing.assert_allclose(
        np.asarray(dtable), want_dtable, rtol=0, atol=1e-5 * np.abs(want_dtable).max()
    )


def test_linear_forms_no_weight_gradient_for_a_frozen_weight():
    """Differentiating ``x`` alone: no dot of the weight's shape (16, 24) is formed; with the
    weight differentiated too, it is."""
    x, w = (jnp.asarray(a) for a in _arrays((2, 8, 16), (16, 24)))
    x_only = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(linear(x, w) ** 2)))(x)
    assert (16, 24) not in _dot_shapes(x_only.jaxpr)
    assert (2, 8, 16) in _dot_shapes(x_only.jaxpr)  # ∂x
    both = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(linear(x, w) ** 2), (0, 1)))(x, w)
    assert (16, 24) in _dot_shapes(both.jaxpr)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_value_and_gradient_match_numpy_float64(dtype):
    """``silu(gate)·up`` and its two gradients against float64 numpy (the derivative of
    ``x·σ(x)`` is ``σ(x)(1 + x(1 − σ(x)))``, checked here by central differences)."""
    gate, up, g = _arrays((3, 7, 20), (3, 7, 20), (3, 7, 20), seed=6)
    gate, up, g = gate * 3, up * 2, g
    gd, ud = jnp.asarray(gate, dtype), jnp.asarray(up, dtype)
    y, pullback = jax.vjp(swiglu, gd, ud)
    d_gate, d_up = pullback(jnp.asarray(g, dtype))
    g64, u64 = np.asarray(gd, np.float64), np.asarray(ud, np.float64)

    def silu(x):
        return x / (1.0 + np.exp(-x))

    eps = 1e-6
    dsilu = (silu(g64 + eps) - silu(g64 - eps)) / (2 * eps)
    gr = np.asarray(jnp.asarray(g, dtype), np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    for got, want in (
        (y, silu(g64) * u64),
        (d_up, gr * silu(g64)),
        (d_gate, gr * u64 * dsilu),
    ):
        assert got.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=0, atol=tol * np.abs(want).max()
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_value_and_gradients_match_numpy_float64(dtype):
    """``x / sqrt(mean(x²) + eps) · scale`` and its vector-Jacobian product against float64
    numpy: the Jacobian of the row map by central differences, the scale's gradient as
    ``Σ_rows g · x / rms(x)``."""
    x, scale, g = _arrays((2, 3, 16), (16,), (2, 3, 16), seed=8)
    x, scale, eps = x * 2 + 0.5, scale + 1.5, 1e-5
    xd, gd = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
    y, pullback = jax.vjp(lambda a, s: rms_norm(a, s, eps), xd, jnp.asarray(scale))
    dx, d_scale = pullback(gd)
    x64, g64, s64 = (np.asarray(a, np.float64) for a in (xd, gd, scale))

    def norm(a):
        return a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + eps) * s64

    step = 1e-6
    jac = np.stack(  # d y[..., i] / d x[..., j], per row, column j
        [(norm(x64 + step * e) - norm(x64 - step * e)) / (2 * step) for e in np.eye(x.shape[-1])],
        axis=-1,
    )
    want_dx = np.einsum("...ij,...i->...j", jac, g64)
    want_scale = np.sum(g64 * norm(x64) / s64, axis=(0, 1))
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    for got, want in ((y, norm(x64)), (dx, want_dx), (d_scale, want_scale)):
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=0, atol=tol * np.abs(want).max()
        )
    assert y.dtype == dx.dtype == dtype and d_scale.dtype == jnp.float32


def _step_memory(dtype: str, tie: bool, monkeypatch) -> tuple[float, list[np.ndarray]]:
    """XLA's temporary bytes for the gradient of the LM loss of a small model, and the
    gradient itself, with the backward rules' residuals tied to their cotangent or not."""
    from jaxcl.objectives.bound import lm_objective
    from jaxcl.train.step import make_apply

    if not tie:
        monkeypatch.setattr(matmul, "in_backward", lambda residuals, g: (residuals, g))
        for module in ("jaxcl.models.attention", "jaxcl.objectives.lm"):
            monkeypatch.setattr(f"{module}.in_backward", lambda residuals, g: (residuals, g))
    model = from_pretrained("tiny", seed=0, dtype=dtype)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    loss = lm_objective(make_apply(graphdef)).loss_fn
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, model.config.vocab_size, size=(4, 129)), jnp.int32)
    batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    grad = jax.jit(jax.grad(lambda p: loss(p, batch, {})[0]))
    temp = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    return temp, [np.asarray(x, np.float32) for x in jax.tree.leaves(grad(params))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_rules_keep_nothing_derived_from_the_forward_pass(dtype, monkeypatch):
    """Tying each rule's residuals to its cotangent (matmul.in_backward) stops XLA:CPU from
    keeping the forward pass's casts, transposes, attention probabilities and sigmoids alive
    until the backward pass: the gradient's temporary memory falls by more than a fifth, and
    the gradient is unchanged (float32) or equal to bf16 rounding."""
    tied, grads = _step_memory(dtype, True, monkeypatch)
    with monkeypatch.context() as m:
        untied, plain = _step_memory(dtype, False, m)
    assert tied < 0.8 * untied, (tied, untied)
    # recomputed (not reused) attention probabilities round differently: float32 or bf16 noise
    tol = 1e-5 if dtype == "float32" else 2**-6
    for a, b in zip(grads, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


def _numpy_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_backward_is_the_transposed_rotation(dtype):
    """∂x of RoPE against float64 numpy: the vector-Jacobian product of the linear map
    ``x ↦ x·cos + R(x)·sin``, formed as ``Jᵀg`` from its explicit Jacobian."""
    b, t, n, h = 2, 5, 3, 8
    x, g = _arrays((b, t, n, h), (b, t, n, h), seed=2)
    positions = jnp.broadcast_to(jnp.arange(t) * 3, (b, t))
    cos, sin = rope_tables(positions, h, 10_000.0)
    xd, gd = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
    y, pullback = jax.vjp(lambda x: apply_rope(x, cos, sin), xd)
    (dx,) = pullback(gd)
    c64, s64 = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
    eye = np.eye(h)
    # the Jacobian acts per (b, t, n) on the head dim: columns are images of basis vectors
    jac = np.stack([_numpy_rope(np.broadcast_to(e, (b, t, 1, h)), c64, s64) for e in eye], -1)
    want_dx = np.einsum(
        "btnij,btni->btnj", np.broadcast_to(jac, (b, t, n, h, h)), gd.astype(np.float64)
    )
    want_y = _numpy_rope(np.asarray(xd, np.float64), c64, s64)
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    for got, want in ((y, want_y), (dx, want_dx)):
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=0, atol=tol * np.abs(want).max()
        )


CASES = {
    "llama-gqa": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-tied-bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_parameter_gradient_matches_transformers(case, tmp_path):
    """The LM loss's gradient with respect to every weight, jaxcl (custom projection, RoPE and
    attention backward passes) against torch autograd through transformers, float32."""
    cls, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )
    config._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 96, size=(3, 21))

    out = hf(torch.from_numpy(ids[:, :-1]), labels=None).logits
    torch_loss = torch.nn.functional.cross_entropy(
        out.flatten(0, 1), torch.from_numpy(ids[:, 1:]).flatten()
    )
    torch_loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    graphdef, state = nnx.split(ours, nnx.Param)
    params = nnx.to_pure_dict(state)

    def loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids[:, :-1]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], -1))

    jax_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(jax_loss), torch_loss.item(), rtol=1e-6)
    checked = 0
    for hf_name, path, transposed, _ in param_map(ours.config):
        ours_grad = grads
        for key in path:
            ours_grad = ours_grad[key]
        ours_grad = np.asarray(ours_grad)
        want = torch_grads[hf_name]
        if transposed:
            ours_grad = ours_grad.T
        scale = np.abs(want).max()
        np.testing.assert_allclose(ours_grad, want, rtol=0, atol=1e-5 * scale, err_msg=hf_name)
        checked += 1
    assert checked == len(torch_grads)
