"""Model merging against independent numpy oracles of each paper's formula.

* Task arithmetic (Ilharco et al., 2023): θ_b + λ Σ_i w_i (θ_i − θ_b).
* TIES-Merging (Yadav et al., 2023): per task vector keep the top-k fraction by magnitude (over
  the whole vector, as the paper's code, by default; or per tensor, as mergekit), elect the sign
  of Σ_i τ̂_i per parameter, average the entries that agree with it, θ_b + λ τ_m.
* DARE (Yu et al., 2024): m ~ Bernoulli(p), τ̃ = (1 − m) ⊙ τ / (1 − p), then task arithmetic or
  TIES' election; the mask drawn from the documented key, reproducible, and unbiased over seeds.
* SLERP (Shoemake, 1985): sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b on the flattened tensor, and
  (1−t) a + t b when the tensors are nearly colinear (mergekit's |cos Ω| > 0.9995).

Then the streaming merge of HF folders (``jaxcl merge``): the output loads in transformers with
jaxcl's logits, equals the tree-level merge, refuses other shapes and tokenizers, gives the same
files when every tensor is sharded over an 8-device (fake CPU) mesh, and the recipe methods
``ties`` and ``dare`` merge per-task fine-tunes at the stage's end through the task-boundary
protocol.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxcl.cli import main
from jaxcl.methods import merge as M
from jaxcl.methods import merge_specs as MS
from jaxcl.methods import ties_trim as T
from jaxcl.methods.specs import validate_methods
from jaxcl.methods.weights import TaskArithmeticSpec
from tests.fake_devices import run_on_fake_devices
from tests.test_fidelity_weights import assert_close, np_problem, np_train, problem, run_stage

ROOT = Path(__file__).parent.parent
SHAPES = {"embed": (7, 5), "layers": {0: {"q": (5, 6)}}, "head": (2, 3, 4)}


def tree(rng, scale=1.0, dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), dtype),
        SHAPES,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def flat(t) -> dict[str, np.ndarray]:
    return {
        M.path_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_leaves_with_path(t)
    }


def models(seed=0, n=3, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    base = tree(rng, dtype=dtype)
    fts = [
        jax.tree.map(lambda b, d: (b + d).astype(b.dtype), base, tree(rng, 0.3)) for _ in range(n)
    ]
    return base, fts


# ----------------------------------------------------------------------------- numpy oracles


def np_topk(v: np.ndarray, density: float) -> np.ndarray:
    """Keep the ⌊density·n⌋ (at least 1) entries of largest magnitude."""
    flat_v = v.ravel()
    k = max(1, int(density * flat_v.size)) if density < 1 else flat_v.size
    keep = np.zeros(flat_v.size, bool)
    keep[np.argsort(-np.abs(flat_v), kind="stable")[:k]] = True
    return np.where(keep, flat_v, 0.0).reshape(v.shape)


def np_elect_merge(taus: list[np.ndarray], w, normalize=True, consensus="sum") -> np.ndarray:
    """TIES' steps 2-3: γ = sgn(Σ w_i τ_i) (0 → +), mean of the agreeing w_i τ_i."""
    weighted = [wi * t for wi, t in zip(w, taus)]
    if consensus == "sum":
        gamma = np.where(sum(weighted) >= 0, 1.0, -1.0)
    else:
        gamma = np.where(sum(np.sign(x) for x in weighted) >= 0, 1.0, -1.0)
    num, den = np.zeros_like(taus[0]), np.zeros_like(taus[0])
    for wi, x in zip(w, weighted):
        agree = np.sign(x) == gamma
        num += np.where(agree, x, 0.0)
        den += np.where(agree, wi, 0.0)
    den = np.where(den == 0, 1.0, den)
    return num / den if normalize else num


def np_global_topk(tau: dict[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
    """The paper's trim: one flattened vector per task (leaves in sorted path order, which is
    the per-layer tree's here), its top ⌊density·n⌋ magnitudes kept (ties: earlier entry)."""
    keys = sorted(tau)
    v = np_topk(np.concatenate([tau[k].ravel() for k in keys]), density)
    parts = np.split(v, np.cumsum([tau[k].size for k in keys])[:-1])
    return {k: p.reshape(tau[k].shape) for k, p in zip(keys, parts)}


def np_ties(base, fts, density, lam, w=None, normalize=True, consensus="sum", scope="model"):
    w = w or [1.0] * len(fts)
    taus = [{k: f[k] - base[k] for k in base} for f in fts]
    if scope == "model":
        trimmed = [np_global_topk(t, density) for t in taus]
    else:
        trimmed = [{k: np_topk(t[k], density) for k in t} for t in taus]
    return {
        k: base[k] + lam * np_elect_merge([t[k] for t in trimmed], w, normalize, consensus)
        for k in base
    }


def dare_mask(seed: int, path: str, i: int, shape, p: float) -> np.ndarray:
    """The documented key: fold_in(fold_in(key(seed), crc32(path)), i); True = kept."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return np.asarray(jax.random.bernoulli(jax.random.fold_in(key, i), 1 - p, shape))


def np_mask(seed: int, path: str, i: int, shape, p: float) -> np.ndarray:
    """``dare_mask`` of a leaf; a stacked ``layers/<name>`` leaf (``scan_layers``) draws layer
    l's mask from its per-layer path ``layers/<l>/<name>``."""
    parts = path.split("/")
    if parts[0] != "layers" or len(parts) < 2 or parts[1].isdigit():
        return dare_mask(seed, path, i, shape, p)
    return np.stack(
        [
            dare_mask(seed, "/".join(["layers", str(n), *parts[1:]]), i, shape[1:], p)
            for n in range(shape[0])
        ]
    )


def np_dare_taus(base, fts, p, seed):
    return [
        {
            k: np.where(np_mask(seed, k, i, base[k].shape, p), (f[k] - base[k]) / (1 - p), 0.0)
            for k in base
        }
        for i, f in enumerate(fts)
    ]


def np_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    cos = float(np.sum(ua * ub))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def close(tree_, expected: dict, atol=1e-5):
    got = flat(tree_)
    assert sorted(got) == sorted(expected)
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_and_linear_match_their_formulas(normalize):
    base, fts = models(0)
    b, fs, w, lam = flat(base), [flat(f) for f in fts], [1.0, 0.5, 2.0], 0.7
    div = sum(w) if normalize else 1.0
    got = M.merge_trees("task_arithmetic", base, fts, weights=w, lam=lam, normalize=normalize)
    close(got, {k: b[k] + lam * sum(wi * (f[k] - b[k]) for wi, f in zip(w, fs)) / div for k in b})
    soup = M.linear(fts, w, normalize=normalize)
    close(soup, {k: sum(wi * f[k] for wi, f in zip(w, fs)) / div for k in b})


@pytest.mark.parametrize("scope", ["model", "leaf"])
@pytest.mark.parametrize(
    "density,lam,consensus,weights",
    [(0.2, 1.0, "sum", None), (0.35, 1.2, "count", [1.0, 0.5, 2.0])],
)
def test_ties_matches_trim_elect_disjoint_mean(density, lam, consensus, weights, scope):
    base, fts = models(1)
    kw = dict(density=density, lam=lam, consensus=consensus, weights=weights)
    got = M.ties(base, fts, **kw) if scope == "model" else M.ties(base, fts, **kw, scope="leaf")
    b, fs = flat(base), [flat(f) for f in fts]
    close(got, np_ties(b, fs, density, lam, weights, True, consensus, scope))
    if scope == "leaf":  # the trim keeps ⌊density·n⌋ entries of each tensor
        tau = M.task_vector(fts[0]["embed"], base["embed"])
        assert int(jnp.sum(M.trim(tau, density) != 0)) == int(density * 35)
    else:  # ... of the whole task vector (35 + 30 + 24 entries), not of each tensor
        tau = jax.tree.map(M.task_vector, fts[0], base)
        assert sum(int(jnp.sum(x != 0)) for x in jax.tree.leaves(T.trim_model(tau, density))) == (
            int(density * 89)
        )
        assert not np.allclose(flat(M.ties(base, fts, **kw, scope="leaf"))["embed"], got["embed"])


def test_ties_model_scope_breaks_ties_by_leaf_then_entry():
    """Magnitudes tied at the threshold go to the earlier leaf (per-layer tree order), then the
    earlier entry, exactly ⌊density·n⌋ kept: the stable sort of the concatenated vector; the
    threshold path and a host buffer's ``np.partition`` find the same cut."""
    rng = np.random.default_rng(7)
    vec = {
        k: jnp.asarray(rng.choice([-2.0, -1.0, 1.0, 0.5], size=s), jnp.float32)
        for k, s in (("a", (5, 4)), ("b", (7,)), ("c", (3, 3)))
    }
    for density in (0.2, 0.5, 0.9):
        expected = np_global_topk({k: np.asarray(v) for k, v in vec.items()}, density)
        got = flat(T.trim_model(vec, density))
        for k in vec:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{density} {k}")
        cut = T.tree_cut(vec, density)
        buffer = np.concatenate([np.abs(np.asarray(vec[k])).ravel() for k in sorted(vec)])

        def leaf_ties(thr):
            return [(k, int(np.sum(np.abs(np.asarray(vec[k])) == thr))) for k in sorted(vec)]

        assert T.host_cut(buffer, density, leaf_ties) == cut
    assert T.tree_cut(vec, 0.5).quotas is not None  # the partial tie path was exercised


def _layered(rng, n_layers=3, scale=1.0):
    layer = {"attn": {"q": (4, 6), "k": (4, 2)}, "norm": (4,)}
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32),
        {"embed": (9, 4), "layers": {i: layer for i in range(n_layers)}, "head": (4, 9)},
        is_leaf=lambda s: isinstance(s, tuple),
    )


def test_scanned_layers_merge_as_their_per_layer_tree():
    """A ``scan_layers`` tree (stacked ``layers`` leaves) merges bit for bit as its per-layer
    equivalent: DARE's masks keyed ``layers/<l>/...``, TIES' per-tensor trims per layer and
    the whole-vector cut in the per-layer order; so do the recipe methods."""
    from jaxcl.models.llama import stack_layers

    rng = np.random.default_rng(8)
    base = _layered(rng)
    fts = [jax.tree.map(jnp.add, base, _layered(rng, scale=0.1)) for _ in range(3)]
    merges = {
        "ties model": lambda b, f: M.ties(b, f, density=0.3),
        "ties leaf": lambda b, f: M.ties(b, f, density=0.3, scope="leaf"),
        "dare ties": lambda b, f: M.dare(b, f, drop=0.5, seed=2, combine="ties"),
        "dare linear": lambda b, f: M.dare(b, f, drop=0.5, seed=2),
        "spec ties": MS.TiesSpec(name="ties", density=0.3).merged,
        "spec dare": MS.DareSpec(name="dare", drop=0.5, seed=2).merged,
    }
    for name, merge in merges.items():
        unrolled = stack_layers(merge(base, fts))
        scanned = merge(stack_layers(base), [stack_layers(f) for f in fts])
        assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
        for x, y in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_matches_drop_rescale_then_combine(combine):
    base, fts = models(3)
    b, fs, p, seed, lam = flat(base), [flat(f) for f in fts], 0.6, 11, 0.9
    taus = np_dare_taus(b, fs, p, seed)
    if combine == "linear":
        expected = {k: b[k] + lam * sum(t[k] for t in taus) for k in b}
    else:
        expected = {
            k: b[k] + lam * np_elect_merge([t[k] for t in taus], [1.0] * 3, False) for k in b
        }
    close(M.dare(base, fts, drop=p, seed=seed, lam=lam, combine=combine), expected, atol=1e-4)


def test_dare_mask_is_reproducible_per_leaf_and_model():
    base, fts = models(4)
    one = M.dare(base, fts, drop=0.5, seed=5)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(M.dare(base, fts, drop=0.5, seed=5)))
    )
    # the mask of a leaf depends on its path, not on which other leaves are merged with it
    alone = M.dare({"head": base["head"]}, [{"head": f["head"]} for f in fts], drop=0.5, seed=5)
    np.testing.assert_array_equal(alone["head"], one["head"])
    other = M.dare(base, fts, drop=0.5, seed=6)
    assert not np.array_equal(other["head"], one["head"])
    delta = jnp.ones((200, 50))
    masks = [M.dare_drop(delta, 0.5, M.leaf_key(5, "x", i)) != 0 for i in range(3)]
    assert not np.array_equal(masks[0], masks[1])  # every model draws its own mask
    assert abs(float(jnp.mean(masks[0])) - 0.5) < 0.02


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dare_is_unbiased_over_seeds(p):
    """E[τ̃] = τ: the mean over N = 2,000 seeds is within 5 standard errors
    (σ = |τ| √(p/(1−p)/N)) of τ entry by entry, and its relative L2 error is below 1.3 × the
    expected √(p/((1−p)N)) (0.022 at p = 0.5, 0.067 at p = 0.9)."""
    n = 2000
    delta = jnp.asarray(np.random.default_rng(0).normal(size=(10, 20)), jnp.float32)
    draws = jax.vmap(lambda s: M.dare_drop(delta, p, M.leaf_key(s, "layers/0/q", 0)))(jnp.arange(n))
    mean, d = np.asarray(jnp.mean(draws, axis=0), np.float64), np.asarray(delta, np.float64)
    se = np.abs(d) * np.sqrt(p / (1 - p) / n)
    assert np.max(np.abs(mean - d) / se) < 5
    expected = np.sqrt(p / ((1 - p) * n))
    assert np.linalg.norm(mean - d) / np.linalg.norm(d) < 1.3 * expected


def test_slerp_matches_the_formula_and_falls_back_to_lerp():
    rng = np.random.default_rng(5)
    a = {"x": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    b = {"x": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    a["y"] = jnp.asarray(rng.normal(size=(9,)), jnp.float32)
    b["y"] = (3.0 * a["y"] + 1e-4 * rng.normal(size=9)).astype(jnp.float32)  # nearly colinear
    a["z"], b["z"] = jnp.ones((3, 3, 2), jnp.bfloat16), -jnp.ones((3, 3, 2), jnp.bfloat16)
    for t in (0.0, 0.3, 1.0):
        got = M.slerp(a, b, t)
        for k in ("x", "y"):
            expected = np_slerp(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64), t)
            np.testing.assert_allclose(np.asarray(got[k]), expected, rtol=1e-5, atol=1e-5)
        assert got["z"].dtype == jnp.bfloat16  # each leaf in its own dtype
    assert not np.allclose(np.asarray(M.slerp(a, b, 0.3)["x"]), 0.7 * a["x"] + 0.3 * b["x"])


def test_merges_return_each_leaf_in_its_own_dtype():
    base, fts = models(6)
    for t in (base, fts[0]):  # one bfloat16 leaf in the base and the first model
        t["head"] = t["head"].astype(jnp.bfloat16)
    wanted = [x.dtype for x in jax.tree.leaves(base)]
    assert jnp.bfloat16 in wanted and jnp.float32 in wanted
    for merge in (
        lambda: M.ties(base, fts),
        lambda: M.dare(base, fts, combine="ties"),
        lambda: M.linear(fts),  # no base: the first model's dtypes
        lambda: M.slerp(base, fts[1], 0.5),
    ):
        assert [x.dtype for x in jax.tree.leaves(jax.eval_shape(merge))] == wanted


# ----------------------------------------------------------------------------- HF folders


def _saved_models(root: Path, preset: str) -> Path:
    """``preset`` saved as a base and two fine-tunes (the base plus small noise) under root."""
    from jaxcl.models import from_pretrained, load_params, save_pretrained
    from jaxcl.models.hf import save_hf

    save_pretrained(from_pretrained(preset, seed=0), root / "base")
    cfg, params = load_params(root / "base")
    rng = np.random.default_rng(100)
    for i in range(2):
        noisy = jax.tree.map(lambda x: x + 0.02 * rng.normal(size=x.shape).astype(x.dtype), params)
        save_hf(cfg, noisy, root / f"ft{i}")
    return root


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """The tiny preset saved as a base and two fine-tunes."""
    return _saved_models(tmp_path_factory.mktemp("merge"), "tiny")


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_merged_hf_folder_loads_in_transformers_with_jaxcl_logits(hf_models, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from jaxcl.models import from_pretrained, load_params

    out = tmp_path / "ties"
    config = {
        "method": "ties",
        "base": str(hf_models / "base"),
        "models": [
            {"source": str(hf_models / "ft0")},
            {"source": str(hf_models / "ft1"), "weight": 0.5},
        ],
        "parameters": {"density": 0.2},  # the documented example's (one compile for both)
        "out": str(out),
        "shard_gb": 0.005,  # several safetensors files and an index
    }
    code, text = _run(["merge", _write(tmp_path / "m.yaml", config)], capsys)
    assert code == 0, text
    assert (out / "model.safetensors.index.json").is_file()
    ids = np.random.default_rng(0).integers(0, 384, size=(2, 16))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(str(out))(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(from_pretrained(out)(jnp.asarray(ids)))
    assert np.abs(theirs - ours).max() < 1e-4
    # the streamed merge is the tree-level one, tensor for tensor
    trees = [load_params(hf_models / n)[1] for n in ("base", "ft0", "ft1")]
    expected = M.ties(trees[0], trees[1:], density=0.2, weights=[1.0, 0.5])
    got = load_params(out)[1]
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_inputs_merge_like_their_hf_folders(hf_models, tmp_path):
    from jaxcl.checkpoint import save_checkpoint
    from jaxcl.merging import merge_sources
    from jaxcl.models import load_params
    from jaxcl.models.llama import stack_layers

    trees = [load_params(hf_models / n)[1] for n in ("base", "ft0", "ft1")]
    step = save_checkpoint(
        tmp_path / "run" / "checkpoints" / "cit",
        7,
        jax.tree.map(jnp.asarray, stack_layers(trees[2])),  # scan_layers: stacked leaves
        {"count": jnp.zeros(())},
        {"stage": "cit"},
    )
    common = {"method": "dare_ties", "base": str(hf_models / "base"), "seed": 3, "model": "tiny"}
    common["parameters"] = {"drop": 0.5}
    merge_sources(
        {
            **common,
            "models": [{"source": str(hf_models / "ft0")}, {"source": str(step)}],
            "out": str(tmp_path / "a"),
        }
    )
    got = load_params(tmp_path / "a")[1]
    expected = M.dare(trees[0], trees[1:], drop=0.5, seed=3, combine="ties")
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_streamed_ties_cuts_each_task_vector_as_the_tree_merge(hf_models, tmp_path):
    """``jaxcl merge``'s TIES (``scope: model``: a first pass per task into one float32 buffer,
    ``np.partition``, then every tensor trimmed against the task's threshold) equals
    ``merge.ties`` bit for bit, with fine-tunes whose magnitudes tie massively at the threshold
    (ties shared out by leaf, then entry); ``scope: leaf`` too."""
    from jaxcl.merging import merge_sources
    from jaxcl.models import load_params
    from jaxcl.models.hf import save_hf

    cfg, base = load_params(hf_models / "base")
    rng = np.random.default_rng(3)
    fts = []
    for i in range(2):
        step = jax.tree.map(lambda x: np.sign(rng.normal(size=x.shape)).astype(x.dtype), base)
        fts.append(jax.tree.map(lambda x, s: x + (0.0625 * s).astype(x.dtype), base, step))
        save_hf(cfg, fts[-1], tmp_path / f"q{i}")
    assert T.tree_cut(fts[0], 0.3, base).quotas is not None  # some tied entries dropped
    for scope in ("model", "leaf"):
        out = tmp_path / scope
        merge_sources(
            {
                "method": "ties",
                "base": str(hf_models / "base"),
                "models": [{"source": str(tmp_path / "q0")}, {"source": str(tmp_path / "q1")}],
                "parameters": {"density": 0.3, "scope": scope},
                "out": str(out),
            }
        )
        expected = M.ties(base, fts, density=0.3, scope=scope)
        got = load_params(out)[1]
        for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=scope)


def _tokenizer(folder: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))


def test_merge_refuses_other_shapes_and_tokenizers_naming_both(hf_models, tmp_path, capsys):
    from jaxcl.models import from_pretrained, save_pretrained

    micro = tmp_path / "micro"
    save_pretrained(from_pretrained("test-micro"), micro)
    out = tmp_path / "out"
    config = {"method": "task_arithmetic", "base": str(hf_models / "base"), "out": str(out)}
    config["models"] = [{"source": str(hf_models / "ft0")}, {"source": str(micro)}]
    code, text = _run(["merge", _write(tmp_path / "shape.yaml", config)], capsys)
    assert code == 2 and "Traceback" not in text
    assert "different shapes" in text and "model.embed_tokens.weight" in text
    assert str(hf_models / "base") in text and str(micro) in text
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, name, words in ((a, "base", "world"), (b, "ft0", "there"), (c, "ft1", "world")):
        shutil.copytree(hf_models / name, folder)
        _tokenizer(folder, ["hello", words])
    config = {"method": "ties", "base": str(a), "models": [{"source": str(b)}, {"source": str(c)}]}
    config |= {"parameters": {"density": 0.2}, "out": str(out)}
    code, text = _run(["merge", _write(tmp_path / "tok.yaml", config)], capsys)
    assert code == 2 and "Traceback" not in text
    assert "different tokenizers" in text and str(a) in text and str(b) in text
    assert not out.exists()

    _tokenizer(b, ["hello", "world"])  # the same vocabulary: merged, the tokenizer copied
    code, text = _run(["merge", _write(tmp_path / "tok.yaml", config)], capsys)
    assert code == 0, text
    assert (out / "tokenizer.json").is_file()


def test_merge_config_errors_name_the_field(hf_models, tmp_path, capsys):
    config = {"method": "ties", "base": str(hf_models / "base"), "out": str(tmp_path / "o")}
    config |= {"models": [{"source": str(hf_models / "ft0")}], "parameters": {"density": 1.5}}
    code, text = _run(["merge", _write(tmp_path / "c.yaml", config)], capsys)
    assert code == 2 and "parameters.density" in text and "Traceback" not in text
    config |= {"parameters": {"t": 0.5}, "method": "linear", "models": [{"sorce": "x"}]}
    code, text = _run(["merge", _write(tmp_path / "c.yaml", config)], capsys)
    assert code == 2 and "models[0].sorce" in text and "models[0].source" in text
    config = {"method": "ties", "models": [{"source": "x"}], "out": "o"}
    code, text = _run(["merge", _write(tmp_path / "c.yaml", config)], capsys)
    assert code == 2 and "base:" in text
    config |= {"base": "b", "rules": [["embed", "fsdp"]]}
    code, text = _run(["merge", _write(tmp_path / "c.yaml", config)], capsys)
    assert code == 2 and "rules: logical rules place tensors on a mesh" in text
    config["mesh"] = {"data": 1, "fsdp": 2, "tensor": 1}
    config["rules"] = [["embed", "model"]]
    code, text = _run(["merge", _write(tmp_path / "c.yaml", config)], capsys)
    assert code == 2 and "rules: 'embed' maps to 'model', not a mesh axis" in text
    config = {"method": "ties", "base": str(hf_models / "base"), "out": str(tmp_path / "o")}
    config |= {"models": [{"source": str(hf_models / "ft0")}], "parameters": {"density": 0.2}}
    config["mesh"] = {"data": jax.device_count() + 1, "fsdp": 1, "tensor": 1}
    code, text = _run(["merge", _write(tmp_path / "c.yaml", config)], capsys)
    assert code == 2 and "mesh: axes" in text and "devices" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


MESH_SCRIPT = """
import json, sys
from jaxcl.merging import merge_sources
reports = {}
for name, config in json.loads(sys.argv[1]).items():
    reports[name] = {}
    merge_sources(config, report=reports[name])
print("REPORT" + json.dumps(reports))
"""


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def test_merge_on_a_mesh_equals_the_unsharded_merge(tmp_path):
    """TIES and DARE with ``mesh: {data: 1, fsdp: 4, tensor: 2}`` on 8 fake CPU devices (a
    subprocess) write the same tensors as the one-device merge, every tensor placed with its
    parameter's sharding (embed -> fsdp, mlp / heads / vocab -> tensor) and merged sharded.
    The test-micro preset (untied: its ``lm_head`` is merged too) keeps it quick."""
    from jaxcl.merging import merge_sources

    hf_models = _saved_models(tmp_path, "test-micro")

    common = {
        "base": str(hf_models / "base"),
        "models": [
            {"source": str(hf_models / "ft0")},
            {"source": str(hf_models / "ft1"), "weight": 0.5},
        ],
    }
    merges = {
        "ties": {"method": "ties", "parameters": {"density": 0.2}},
        "dare": {"method": "dare_ties", "parameters": {"drop": 0.5}, "seed": 3},
    }
    sharded = {}
    for name, extra in merges.items():
        merge_sources({**common, **extra, "out": str(tmp_path / name)})  # one device
        sharded[name] = {**common, **extra, "out": str(tmp_path / f"{name}_mesh")}
        sharded[name]["mesh"] = {"data": 1, "fsdp": 4, "tensor": 2}
    stdout = run_on_fake_devices(MESH_SCRIPT, json.dumps(sharded))
    reports = json.loads(stdout.split("REPORT")[-1])
    for name in merges:
        one, mesh = _tensors(tmp_path / name), _tensors(tmp_path / f"{name}_mesh")
        assert sorted(one) == sorted(mesh) and len(one) == 21
        for k in one:
            np.testing.assert_allclose(mesh[k], one[k], rtol=0, atol=1e-6, err_msg=f"{name} {k}")
        report = reports[name]
        assert len(report) == 21
        split = {"input": "P('fsdp', 'tensor')", "output": "P('fsdp', 'tensor')", "devices": 8}
        assert report["layers/0/mlp/gate"] == {**split, "split": True}  # [embed, mlp]: 4 × 2
        assert report["lm_head"]["input"] == "P('fsdp', 'tensor')"  # [embed, vocab]
        assert report["layers/1/attn/o"]["input"] == "P('tensor', 'fsdp')"  # [heads, embed]
        assert report["embed"]["input"] == "P('tensor', 'fsdp')"  # [vocab, embed]
        assert report["final_norm/scale"]["input"] == "P(None,)"  # norms replicated
        assert sum(r["split"] for r in report.values()) == 21 - 5  # all but the 5 norms
        assert all(r["output"] == r["input"] and r["devices"] == 8 for r in report.values())


def test_the_documented_merge_config_runs(hf_models, tmp_path, capsys):
    """docs/methods.md's ``jaxcl merge`` example, its paths pointed at the tiny models."""
    doc = (ROOT / "docs" / "methods.md").read_text()
    section = doc.split("### jaxcl merge", 1)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S)[1])
    names = iter(["ft0", "ft1"])
    example["base"] = str(hf_models / "base")
    example["models"] = [{**m, "source": str(hf_models / next(names))} for m in example["models"]]
    example["out"] = str(tmp_path / "merged")
    code, text = _run(["merge", _write(tmp_path / "doc.yaml", example)], capsys)
    assert code == 0, text
    assert json.loads((tmp_path / "merged" / "jaxcl_merge.json").read_text())["method"]

    # --overwrite replaces an earlier merge's output; any other folder is refused untouched
    code, text = _run(["merge", str(tmp_path / "doc.yaml"), "--overwrite"], capsys)
    assert code == 0, text
    other = tmp_path / "run"
    (other / "checkpoints").mkdir(parents=True)
    example["out"] = str(other)
    code, text = _run(["merge", _write(tmp_path / "other.yaml", example), "--overwrite"], capsys)
    assert code == 2 and "not the output of an earlier jaxcl merge" in text, text
    assert (other / "checkpoints").is_dir()


# ----------------------------------------------------------------------------- recipe methods


def _task_models(params, targets, noise, steps):
    """The numpy fine-tunes: every task trained from the base."""
    base, T, N = np_problem(params, targets, noise)
    out = []
    for t in range(len(targets)):
        theta = dict(base)
        for k in range(steps):
            theta = np_train(theta, T[t], N[t][k])
        out.append(theta)
    return base, out


def test_ties_recipe_method_merges_the_fine_tunes_of_one_base():
    n_tasks, steps = 3, 4
    params, targets, noise = problem(8, n_tasks, steps)
    spec = MS.TiesSpec(name="ties", density=0.4, lam=0.9)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    base, thetas = _task_models(params, targets, noise, steps)
    for t in range(n_tasks):
        merged = np_ties(base, thetas[: t + 1], 0.4, 0.9)  # the tasks seen so far
        for view in scored[t]:
            assert_close(view, merged, atol=1e-5)
        assert_close(after[t], merged if t == n_tasks - 1 else base, atol=1e-5)
    assert not [k for k in carry.frozen if k.startswith("ties_")]  # kept models dropped


def test_dare_recipe_method_merges_the_fine_tunes_of_one_base():
    """``combine: ties`` (``linear`` is the same drop, checked in the pure-function tests)."""
    n_tasks, steps, p, seed = 2, 3, 0.5, 4
    params, targets, noise = problem(9, n_tasks, steps)
    spec = MS.DareSpec(name="dare", drop=p, seed=seed, combine="ties", lam=0.8)
    scored, after, carry = run_stage(spec, params, targets, noise, steps)
    base, thetas = _task_models(params, targets, noise, steps)
    taus = np_dare_taus(base, thetas, p, seed)
    first = {k: base[k] + 0.8 * taus[0][k] for k in base}  # row 0: task 0 alone
    merged = {
        k: base[k] + 0.8 * np_elect_merge([t[k] for t in taus], [1.0] * 2, False) for k in base
    }
    assert_close(scored[0][0], first, atol=1e-4)
    assert_close(after[0], base, atol=1e-6)  # task 1 trains from the base again
    for view in scored[1]:
        assert_close(view, merged, atol=1e-4)
    assert_close(after[1], merged, atol=1e-4)
    assert not [k for k in carry.frozen if k.startswith("dare_")]


def test_merge_methods_are_one_weight_space_method_and_validate_options():
    with pytest.raises(ValueError, match="conflict"):
        validate_methods([MS.TiesSpec(name="ties"), TaskArithmeticSpec(name="task_arithmetic")])
    with pytest.raises(ValueError, match="lora"):
        MS.DareSpec(name="dare").check_stage(n_tasks=2, lora=object())
    for bad in ({"name": "ties", "density": 0}, {"name": "dare", "drop": 1.0}):
        spec = MS.TiesSpec if bad["name"] == "ties" else MS.DareSpec
        with pytest.raises(ValueError):
            spec(**bad)
