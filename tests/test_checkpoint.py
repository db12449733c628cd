"""The parameter digest tells bits apart, whatever the layout."""

import jax.numpy as jnp
import numpy as np

from jaxcl.checkpoint import params_digest


def test_digest_sees_one_ulp_swaps_and_reshapes_but_not_copies():
    p = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.bfloat16)}
    d = params_digest(p)
    assert params_digest({k: jnp.array(v) for k, v in p.items()}) == d
    one_ulp = np.nextafter(np.float32(6.0), np.float32(7.0))
    assert params_digest({**p, "a": p["a"].at[1, 2].set(one_ulp)}) != d
    assert params_digest({**p, "a": p["a"].at[0, 1].set(2.0).at[0, 2].set(1.0)}) != d  # swap
    assert params_digest({**p, "a": p["a"].reshape(4, 3)}) != d
    assert params_digest({**p, "b": p["b"].at[4].set(-1.0)}) != d
