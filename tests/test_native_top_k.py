"""The native CPU top-k (kernels/native/top_k.cc) behind kernels.top_k and kernels.argmax: the same values
(bit for bit) and indices as jax.lax.top_k, the same index as jnp.argmax, on fresh random rows full of
ties, infinities, NaNs and signed zeros; XLA's own operations where GSPMD partitions the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels

SPECIAL = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0], np.float32)


def random_rows(rng, shape):
    """Values from a few integers (many ties) with specials sprinkled in."""
    x = rng.integers(-3, 4, size=shape).astype(np.float32)
    special = rng.random(shape) < 0.15
    x[special] = rng.choice(SPECIAL, size=int(special.sum()))
    return jnp.asarray(x)


@pytest.mark.parametrize("shape,k", [((7, 16), 1), ((7, 16), 4), ((5, 16), 16), ((3, 5, 64), 8), ((64, 256), 8),
                                     ((1, 3), 2)])
def test_top_k_matches_lax(shape, k):
    rng = np.random.default_rng()
    x = random_rows(rng, shape)
    run = jax.jit(lambda x: kernels.top_k(x, k))
    assert "moejax_top_k" in run.lower(x).as_text()  # the native kernel, not lax.top_k
    values, indices = run(x)
    want_values, want_indices = jax.lax.top_k(x, k)
    assert indices.dtype == jnp.int32 and values.shape == want_values.shape
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    np.testing.assert_array_equal(np.asarray(values).view(np.int32), np.asarray(want_values).view(np.int32))


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 64), (64, 515), (2, 1)])
def test_argmax_matches_jnp(shape):
    rng = np.random.default_rng()
    x = random_rows(rng, shape)
    run = jax.jit(kernels.argmax)
    assert "moejax_top_k" in run.lower(x).as_text()
    got = run(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
    zeros = jnp.asarray([[-0.0, 0.0, -1.0], [-np.nan, 1.0, np.nan]], jnp.float32)  # ties lax.top_k orders otherwise
    np.testing.assert_array_equal(np.asarray(run(zeros)), [0, 0])


def test_top_k_under_gspmd_and_for_other_dtypes_is_lax():
    x = jnp.ones((4, 8), jnp.float32)
    with kernels.for_gspmd():
        assert "moejax_top_k" not in jax.jit(lambda x: kernels.top_k(x, 2)).lower(x).as_text()
        assert "moejax_top_k" not in jax.jit(kernels.argmax).lower(x).as_text()
    assert "moejax_top_k" not in jax.jit(lambda x: kernels.top_k(x, 2)).lower(x.astype(jnp.bfloat16)).as_text()
