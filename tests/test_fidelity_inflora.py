"""InfLoRA (Liang & Li, CVPR 2024): each task's LoRA down-projection A_t is designed from the task's
inputs outside the earlier tasks' input subspace M and fixed; only B_t trains.

Oracles: numpy implementations of the paper's design formula (top-r eigenvectors of
(I − M Mᵀ) C (I − M Mᵀ)), of the reference code's variant (SVD of (I − M Mᵀ) C) and of the
reference ``update_DualGPM`` loop; and the weights of a recipe stage: every task's change
ΔW_t = W_after − W_before lies in span(A_t) and leaves the earlier tasks' inputs alone
(M_{t-1}ᵀ ΔW_t = 0)."""

import numpy as np
import pytest

from jaxcl import checkpoint
from jaxcl.methods import inflora as inflora_mod
from jaxcl.methods.inflora import dualgpm_update, inflora_design, stage_threshold
from jaxcl.recipe import RecipeError, validate


def _inputs(seed: int, n: int = 300, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.exp(-np.arange(d) / 3.0)[None, :]  # a decaying spectrum
    return rng.normal(size=(n, d)) @ mix.T


def _basis(m: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((d, d), np.float32)
    out[:, : m.shape[1]] = m
    return out


def _span(x: np.ndarray) -> np.ndarray:
    """Orthogonal projector onto the column span of x."""
    q, _ = np.linalg.qr(x)
    return q @ q.T


def _np_design(h: np.ndarray, m: np.ndarray, rank: int) -> np.ndarray:
    """The paper: top-r eigenvectors of (I − M Mᵀ) H Hᵀ (I − M Mᵀ), H the inputs as columns."""
    p = np.eye(h.shape[1]) - m @ m.T
    w, v = np.linalg.eigh(p @ (h.T @ h / len(h)) @ p)
    return v[:, np.argsort(w)[::-1][:rank]]


def _np_design_code(h: np.ndarray, m: np.ndarray, rank: int) -> np.ndarray:
    """The reference code: ``cur_matrix - feature_mat @ cur_matrix``, its SVD, ``U[:, :r]``."""
    cur = h.T @ h / len(h)
    u, _, _ = np.linalg.svd(cur - m @ m.T @ cur, full_matrices=False)
    return u[:, :rank]


def _np_dualgpm(m: np.ndarray, h: np.ndarray, threshold: float) -> np.ndarray:
    """The reference ``update_DualGPM`` ('remove' branch) on the representation R = Hᵀ; from the
    first task on the paper's count (the smallest set reaching the threshold)."""
    r_mat = h.T
    total = (np.linalg.svd(r_mat, compute_uv=False) ** 2).sum()
    hat = r_mat - m @ m.T @ r_mat
    u, s, _ = np.linalg.svd(hat, full_matrices=False)
    ratio = s**2 / total
    accumulated = (total - (s**2).sum()) / total
    r = 0
    for value in ratio:
        if accumulated < threshold:
            accumulated += value
            r += 1
        else:
            break
    return np.hstack([m, u[:, :r]])


@pytest.mark.parametrize("spectrum", ["inputs", "covariance"])
def test_design_matches_the_numpy_oracle_and_is_orthogonal_to_m(spectrum):
    d, rank = 16, 4
    h_old, h_new = _inputs(1), _inputs(2)
    m = np.linalg.svd(h_old.T, full_matrices=False)[0][:, :5]  # an earlier subspace, rank 5
    cov = (h_new.T @ h_new / len(h_new)).astype(np.float32)
    a = np.asarray(inflora_design(cov, _basis(m, d), rank, spectrum=spectrum, scale=0.5))
    assert a.shape == (d, rank)
    np.testing.assert_allclose(a.T @ a, 0.25 * np.eye(rank), atol=1e-5)  # scaled orthonormal
    assert np.abs(m.T @ a).max() < 1e-5  # A_t ⟂ M
    oracle = (_np_design if spectrum == "inputs" else _np_design_code)(h_new, m, rank)
    np.testing.assert_allclose(_span(a), _span(oracle), atol=2e-4)
    # the first task (M empty): the task's leading input directions, both spectra alike
    first = np.asarray(inflora_design(cov, np.zeros((d, d), np.float32), rank, spectrum=spectrum))
    top = np.linalg.eigh(cov.astype(np.float64))[1][:, ::-1][:, :rank]
    np.testing.assert_allclose(_span(first), _span(top), atol=2e-4)
    # stacked per layer ([layers, in, in]) as scanned models hold them
    stacked = np.asarray(
        inflora_design(np.stack([cov, cov]), np.stack([_basis(m, d)] * 2), rank, spectrum=spectrum)
    )
    np.testing.assert_allclose(_span(stacked[1]), _span(oracle), atol=2e-4)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_dualgpm_update_matches_the_reference_loop(threshold):
    d = 16
    h1, h2 = _inputs(3), _inputs(4)
    m1 = _np_dualgpm(np.zeros((d, 0)), h1, threshold)
    b1 = np.asarray(dualgpm_update(np.zeros((d, d), np.float32), h1.T @ h1 / len(h1), threshold))
    assert np.linalg.matrix_rank(b1, tol=1e-3) == m1.shape[1]
    np.testing.assert_allclose(_span(b1[:, np.abs(b1).sum(0) > 0]), _span(m1), atol=2e-4)
    m2 = _np_dualgpm(m1, h2, threshold)
    b2 = np.asarray(dualgpm_update(b1, h2.T @ h2 / len(h2), threshold))
    kept = b2[:, np.abs(b2).sum(0) > 0]
    assert kept.shape[1] == m2.shape[1] and m2.shape[1] >= m1.shape[1]
    np.testing.assert_allclose(_span(kept), _span(m2), atol=2e-4)


def test_threshold_schedule_is_the_references():
    # (lame - lamb) * cur_task / total_sessions + lamb, lamb 0.95, lame 1.0, 10 sessions
    assert [round(stage_threshold(0.95, 1.0, t, 10), 6) for t in (0, 5, 9)] == [0.95, 0.975, 0.995]


# ----------------------------------------------------------------------------- recipe


def _recipe(out, lora=None, method=None, steps=3):
    return {
        "name": "inflora",
        "out_dir": str(out),
        "seed": 0,
        "model": {"preset": "test-micro"},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1},
        "probes": False,
        "log_every": 1,
        "stall_steps": 0,
        "stages": [
            {
                "name": "cpt",
                "kind": "pretrain",
                "seq_len": 32,
                "batch_size": 4,
                "eval_batch_size": 8,
                "steps_per_task": steps,
                "lora": lora if lora is not None else {"rank": 4, "targets": ["q", "v"]},
                "tasks": [
                    {
                        "name": name,
                        "data": {"bundled": f"cpt/{name}", "train_size": 64, "eval_size": 8},
                    }
                    for name in ("recipes", "starlog")
                ],
                "methods": [method or {"name": "inflora", "batches": 2, "threshold": 0.9}],
            }
        ],
    }


def test_bad_stage_is_refused_naming_the_field(tmp_path):
    raw = _recipe(tmp_path / "run")
    raw["stages"][0].pop("lora")
    with pytest.raises(RecipeError, match=r"lora\.per_task"):
        validate(raw)
    with pytest.raises(RecipeError, match=r"lora\.per_task"):
        validate(_recipe(tmp_path / "run", lora={"rank": 4, "per_task": False}))
    bad = {"name": "inflora", "threshold": 0.99, "threshold_end": 0.9}
    with pytest.raises(RecipeError, match="threshold_end"):
        validate(_recipe(tmp_path / "run", method=bad))


def test_a_stage_updates_lie_in_the_designed_subspace(tmp_path, monkeypatch):
    from jaxcl.train.runner import make_context, run_recipe

    designs, updates = [], []
    design, update = inflora_mod.inflora_design, inflora_mod.dualgpm_update

    def spy_design(cov, basis, rank, **kw):
        a = design(cov, basis, rank, **kw)
        designs.append((np.asarray(cov), np.asarray(basis), np.asarray(a)))
        return a

    def spy_update(basis, cov, threshold, **kw):
        new = update(basis, cov, threshold, **kw)
        updates.append((np.asarray(new), float(threshold)))
        return new

    monkeypatch.setattr(inflora_mod, "inflora_design", spy_design)
    monkeypatch.setattr(inflora_mod, "dualgpm_update", spy_update)
    out = tmp_path / "run"
    recipe = validate(_recipe(out))
    _, start, _, _ = recipe.model.build(recipe.seed)
    run_recipe(recipe)
    kernels = [(i, p) for i in (0, 1) for p in ("q", "v")]  # the adapters' order in the tree
    assert len(designs) == len(updates) == 2 * len(kernels)  # per task: design, then update
    assert [t for _, t in updates] == [0.9] * 4 + [0.95] * 4  # 0.9 + 0.1·t/2
    ctx, _ = make_context(recipe, console=None)
    stage_dir = out / "checkpoints" / "cpt"
    ends = [ctx.restore_model(stage_dir / str(s)) for s in (3, 6)]  # after each task
    weights = [start, *ends]
    for t in (0, 1):
        for j, (layer, proj) in enumerate(kernels):
            cov, basis, a = designs[4 * t + j]
            m = basis[:, np.abs(basis).sum(0) > 0]
            if t == 0:
                assert m.shape[1] == 0
            else:  # M after task 0 is what task 1's design projected against
                np.testing.assert_allclose(basis, updates[j][0])
                assert 0 < m.shape[1] < 64
                assert np.abs(m.T @ a).max() < 1e-5  # A_1 ⟂ M_0
            # the numpy oracle of the paper's formula on the same covariance and M
            p = np.eye(64) - m @ m.T
            w, v = np.linalg.eigh(p @ cov.astype(np.float64) @ p)
            oracle = v[:, np.argsort(w)[::-1][:4]]
            np.testing.assert_allclose(_span(a), _span(oracle), atol=5e-4)
            w_before = np.asarray(weights[t]["layers"][layer]["attn"][proj], np.float64)
            w_after = np.asarray(weights[t + 1]["layers"][layer]["attn"][proj], np.float64)
            delta = w_after - w_before
            assert np.abs(delta).max() > 1e-6  # B trained
            outside = delta - _span(a) @ delta  # ΔW's input side outside span(A_t)
            assert np.abs(outside).max() <= 1e-5 * np.abs(delta).max() + 1e-7, (t, layer, proj)
            if t == 1:  # interference-free: the earlier inputs' outputs do not move
                assert np.abs(m.T @ delta).max() <= 1e-5 * np.abs(delta).max() + 1e-7
    # the other weights (not adapted) are unchanged
    for t in (0, 1):
        np.testing.assert_array_equal(
            np.asarray(weights[t]["layers"][0]["attn"]["k"]),
            np.asarray(weights[t + 1]["layers"][0]["attn"]["k"]),
        )
    assert checkpoint.latest_step(stage_dir) == 6
