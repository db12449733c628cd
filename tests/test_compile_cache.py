"""The persistent compilation cache serves a program compiled before (another closure, same
HLO) and the compile clock counts compiles, hits and seconds."""

import jax
import jax.numpy as jnp
import pytest

from jaxcl import compile_cache


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    yield tmp_path / "xla"
    compile_cache.enable(before)


def _program(scale: float):
    # a fresh closure each call: jax's in-memory caches miss, the persistent cache does not
    return jax.jit(lambda x: jnp.tanh(x @ x.T) * scale + jnp.sin(x).sum())


def test_a_second_closure_with_the_same_hlo_is_a_persistent_cache_hit(cache_dir):
    assert compile_cache.enable(cache_dir) == cache_dir
    x = jnp.arange(48.0).reshape(6, 8) / 48
    with compile_cache.CompileClock() as first:
        expected = _program(3.0)(x)
    with compile_cache.CompileClock() as second:
        got = _program(3.0)(x)
    assert first.compiles >= 1 and first.misses >= 1 and first.total_s > 0
    assert second.hits >= 1 and second.misses == 0
    assert list(cache_dir.iterdir())  # entries kept although they compiled in well under 1 s
    assert jnp.array_equal(expected, got)
    assert "persistent cache" in second.line()
    assert second.summary()["cache_hits"] == second.hits


def test_resolve_names_the_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCL_CACHE_DIR", str(tmp_path))
    assert compile_cache.resolve(True) == tmp_path / "xla"
    assert compile_cache.resolve("run", tmp_path / "out") == tmp_path / "out" / "xla_cache"
    assert compile_cache.resolve(False) is None
    assert compile_cache.resolve(str(tmp_path / "c")) == tmp_path / "c"


def test_the_cache_setting_does_not_change_a_recipes_fingerprint():
    from pathlib import Path

    from jaxcl.recipe import load_recipe

    path = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    on = load_recipe(path)
    off = load_recipe(path, ["compile_cache=false"])
    assert off.compile_cache is False and on.compile_cache is True
    assert on.fingerprint() == off.fingerprint()
