"""flaxlora.dropout: the hashed mask keeps each element with probability 1 - rate, independently
of its neighbours and of other keys' masks; one mask per key, on any mesh."""

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlora.dropout import Dropout, dropout, keep_mask

SHAPE = (16, 4, 64, 64)  # 262,144 elements


def _sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_and_independence(rate):
    p, n = 1 - rate, int(np.prod(SHAPE))
    keep = np.asarray(keep_mask(jax.random.key(3), SHAPE, rate))
    other = np.asarray(keep_mask(jax.random.key(4), SHAPE, rate))
    flat = keep.reshape(-1)
    assert keep.shape == SHAPE and keep.dtype == bool
    assert _sigmas(flat.mean(), p, n) < 5
    # Pairs of elements at strides within a row, across rows and across the batch: P(both) = p^2.
    for stride in (1, 2, 64, 64 * 64, 4 * 64 * 64):
        both = (flat[:-stride] & flat[stride:]).mean()
        assert _sigmas(both, p * p, n - stride) < 5, stride
    # A different key gives an unrelated mask, also along each axis.
    assert _sigmas((keep & other).mean(), p * p, n) < 5
    for axis in range(len(SHAPE)):
        assert _sigmas((keep & np.roll(other, 1, axis)).mean(), p * p, n) < 5


def test_same_key_same_mask_and_bits_spread():
    key = jax.random.key(11)
    a, b = keep_mask(key, SHAPE, 0.1), keep_mask(key, SHAPE, 0.1)
    assert bool(jnp.all(a == b))
    # Every threshold gives its rate: the hashed words are uniform over the whole 32-bit range.
    for rate in (1 / 256, 0.25, 0.75, 255 / 256):
        assert _sigmas(float(keep_mask(key, SHAPE, rate).mean()), 1 - rate, int(np.prod(SHAPE))) < 5


def test_dropout_scales_and_edges():
    x = jnp.full((1000,), 2.0)
    y = dropout(x, 0.2, jax.random.key(0))
    kept = y != 0
    np.testing.assert_allclose(np.asarray(y[kept]), 2.0 / 0.8, rtol=1e-6)
    assert bool(jnp.all(dropout(x, 0.0, jax.random.key(0)) == x))
    assert bool(jnp.all(dropout(x, 1.0, jax.random.key(0)) == 0))
    assert dropout(x.astype(jnp.bfloat16), 0.2, jax.random.key(0)).dtype == jnp.bfloat16
    # The gradient flows through the kept elements only, scaled like them.
    g = jax.grad(lambda v: dropout(v, 0.2, jax.random.key(0)).sum())(x)
    np.testing.assert_allclose(np.asarray(g), np.where(np.asarray(kept), 1 / 0.8, 0.0), rtol=1e-6)


def test_module_uses_the_dropout_rng_collection():
    module = Dropout(0.5)
    x = jnp.ones((64, 64))
    assert module.apply({}, x, True) is x
    a = module.apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    b = module.apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    assert not bool(jnp.all(a == b)) and 0.4 < float((a != 0).mean()) < 0.6
    with pytest.raises(flax.errors.InvalidRngError):
        module.apply({}, x, False)


def test_same_mask_on_a_sharded_mesh():
    """The mask is an elementwise function of a global iota: sharding it over 4 devices changes nothing."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from flaxlora.dropout import keep_mask
        mesh = jax.make_mesh((2, 2), ("a", "b"))
        out = NamedSharding(mesh, P("a", None, "b"))
        key = jax.random.key(5)
        sharded = jax.jit(lambda k: keep_mask(k, (8, 3, 16), 0.3), out_shardings=out)(key)
        assert len(sharded.addressable_shards) == 4
        np.testing.assert_array_equal(np.asarray(sharded), np.asarray(keep_mask(key, (8, 3, 16), 0.3)))
        print("ok")
    """)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
