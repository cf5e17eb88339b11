"""Metrics against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from pplalign import metrics


def test_ess_extremes():
    assert float(metrics.ess(jnp.zeros(10))) == pytest.approx(10.0)
    assert float(metrics.ess(jnp.asarray([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(1.0)
    assert float(metrics.ess(jnp.full((4,), -jnp.inf))) == 0.0
    np.testing.assert_allclose(np.asarray(metrics.ess(jnp.zeros((3, 5)))), 5.0)


def test_tv_and_empirical_pmf():
    p = jnp.asarray([0.5, 0.5, 0.0])
    q = jnp.asarray([0.0, 0.5, 0.5])
    assert float(metrics.tv_distance(p, q)) == pytest.approx(0.5)
    pmf = metrics.empirical_pmf(jnp.asarray([0, 0, 1, 2]), 4)
    np.testing.assert_allclose(np.asarray(pmf), [0.5, 0.25, 0.25, 0.0])
    weighted = metrics.empirical_pmf(jnp.asarray([0, 1]), 2, jnp.log(jnp.asarray([0.25, 0.75])))
    np.testing.assert_allclose(np.asarray(weighted), [0.25, 0.75], rtol=1e-6)


def test_energy_distance_and_mmd_separate_laws():
    x = jax.random.normal(jax.random.PRNGKey(0), (400, 2))
    y = jax.random.normal(jax.random.PRNGKey(1), (400, 2))
    z = y + jnp.asarray([1.5, 0.0])
    assert float(metrics.energy_distance(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics.energy_distance(x, y)) < 0.05
    assert float(metrics.energy_distance(x, z)) > 0.5
    assert float(metrics.mmd(x, y)) < 0.02 < float(metrics.mmd(x, z))
    # weights: a sample weighted onto its first point equals that single point
    lw = jnp.where(jnp.arange(400) == 0, 0.0, -jnp.inf)
    d = metrics.energy_distance(x, x[:1], log_wx=lw)
    assert float(d) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_of_gaussians():
    x = jax.random.normal(jax.random.PRNGKey(0), (20000, 3))
    y = x + jnp.asarray([1.0, 2.0, 0.0])
    assert float(metrics.frechet_distance(x, y)) == pytest.approx(5.0, rel=1e-3)
    # scaled covariance: tr(Σx + Σy − 2 (Σx Σy)^{1/2}) = 3 (1 + 4 − 4) = 3
    assert float(metrics.frechet_distance(x, 2 * x)) == pytest.approx(3.0, rel=0.05)


def test_kl_estimators_match_enumeration(markov):
    lm, reward, beta = markov
    target = pplalign.tilt(lm, reward, beta)
    log_Z = lm.log_Z(reward, beta)
    post = lm.posterior(reward, beta)
    log_p0 = lm.log_prob(lm.all_sequences())
    log_post = jnp.log(post)
    kl_p0_sigma = float(jnp.sum(jnp.exp(log_p0) * (log_p0 - log_post)))
    kl_sigma_p0 = float(jnp.sum(post * (log_post - log_p0)))
    # q = p0 (one-particle IS): log w = r/β
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    lw_q = jax.jit(jax.vmap(lambda k: pplalign.importance_sampling(k, target, 1).log_Z))(keys)
    refs = lm.sample_posterior(jax.random.PRNGKey(1), 4000, reward, beta)
    lw_sigma = jax.vmap(reward)(refs) / beta
    assert float(metrics.kl_q_sigma(lw_q, log_Z)) == pytest.approx(kl_p0_sigma, abs=0.05)
    assert float(metrics.kl_sigma_q(lw_sigma, log_Z)) == pytest.approx(kl_sigma_p0, abs=0.05)
    mean, se = metrics.bound(lw_q)
    assert float(mean) < float(log_Z) and float(se) > 0
