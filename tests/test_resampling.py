"""Resamplers: unbiased counts, valid indices, never a zero-weight particle, the float32 CDF boundary."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pplalign
from pplalign.resampling import _inverse_cdf

RESAMPLERS = {
    "multinomial": pplalign.multinomial,
    "stratified": pplalign.stratified,
    "systematic": pplalign.systematic,
    "residual": pplalign.residual,
}
DRAWS = 4000


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _batched(resampler, log_w, num, draws, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), draws)
    idx = jax.vmap(lambda k: resampler(k, log_w, num))(keys)
    return jax.vmap(lambda i: jnp.bincount(i, length=log_w.shape[0]))(idx), idx


def _counts(resampler, log_w, num, draws=DRAWS, seed=0):
    counts, idx = _batched(resampler, log_w, num, draws, seed)
    return np.asarray(counts), np.asarray(idx)


_jit_inverse_cdf = jax.jit(_inverse_cdf)

weights_strategy = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1.0)), min_size=1, max_size=8
).filter(lambda w: sum(w) > 0)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
@settings(max_examples=12, deadline=None)
@given(weights=weights_strategy)
def test_resampler_is_unbiased_and_valid(name, weights):
    # pad to a fixed size with zero weights: one compile per resampler, and trailing zeros test the boundary
    w = np.zeros(8)
    w[: len(weights)] = weights
    w = w / w.sum()
    log_w = jnp.log(jnp.asarray(w, jnp.float32))
    n = len(w)
    counts, idx = _counts(RESAMPLERS[name], log_w, n)
    assert idx.dtype == np.int32 and idx.shape == (DRAWS, n)
    assert idx.min() >= 0 and idx.max() < n
    # zero-weight particles are never picked
    assert counts[:, w == 0].sum() == 0
    # E[count_i] = n w_i; the multinomial variance n w (1 - w) bounds every scheme here
    se = np.sqrt(n * w * (1 - w) / DRAWS) + 1e-3
    assert np.all(np.abs(counts.mean(0) - n * w) <= 5 * se + 2e-3), (counts.mean(0), n * w)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_resampler_other_output_size(name):
    log_w = jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4]))
    counts, _ = _counts(RESAMPLERS[name], log_w, 10, draws=2000, seed=3)
    np.testing.assert_allclose(counts.mean(0), 10 * np.array([0.1, 0.2, 0.3, 0.4]), atol=0.15)


def test_inverse_cdf_clips_at_float32_boundary():
    # float32 cumulative sums of these weights end below 1, and the last particle has zero weight
    log_w = jnp.log(jnp.asarray([1 / 3, 1 / 3, 1 / 3, 0.0], jnp.float32))
    cdf_end = jnp.cumsum(jax.nn.softmax(log_w))[-1]
    u = jnp.asarray([0.0, 0.5, jnp.nextafter(cdf_end, 2.0), 1.0 - 1e-9, 1.0], jnp.float32)
    idx = np.asarray(_inverse_cdf(log_w, u))
    assert idx.max() == 2, idx  # never N, never the trailing zero-weight particle
    assert idx[0] == 0 and idx[1] == 1


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 64), seed=st.integers(0, 2**16))
def test_systematic_boundary_many_particles(n, seed):
    # random float32 weights with a run of trailing zeros: the largest uniform must still land on a live one
    w = np.zeros(64, np.float32)
    w[: n // 2] = np.random.default_rng(seed).uniform(size=n // 2)
    w[0] = max(w[0], 1e-3)
    log_w = jnp.log(jnp.asarray(w, jnp.float32))
    idx = np.asarray(_jit_inverse_cdf(log_w, jnp.asarray([1.0 - 1e-12, 1.0], jnp.float32)))
    assert (w[idx] > 0).all()


def test_all_minus_inf_weights_do_not_nan():
    log_w = jnp.full((5,), -jnp.inf)
    for resampler in RESAMPLERS.values():
        idx = np.asarray(jax.jit(resampler, static_argnums=2)(jax.random.PRNGKey(0), log_w, 5))
        assert ((idx >= 0) & (idx < 5)).all()
