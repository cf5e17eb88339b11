"""Reward-tempered SMC against a conjugate Gaussian (closed-form log Z and posterior) and a constrained
genjax model (log Z by quadrature); padding conventions, NFE accounting, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from genjax import gen, normal

import pplalign
from pplalign.tempered import run_tempered, tempered_smc, tempered_smc_with_info

MU0, S0, TAU = 0.5, 1.5, 0.5
Y = jnp.array([2.0, -1.0])
D = 2
LOG_Z = float(jnp.sum(0.5 * jnp.log(2 * jnp.pi * TAU**2) + dist.Normal(MU0, math.sqrt(S0**2 + TAU**2)).log_prob(Y)))
POST_VAR = 1.0 / (1.0 / S0**2 + 1.0 / TAU**2)
POST_MEAN = np.asarray(POST_VAR * (MU0 / S0**2 + Y / TAU**2))


def model():
    return numpyro.sample("z", dist.Normal(MU0 * jnp.ones(D), S0).to_event(1))


def reward(z):
    return -0.5 * jnp.sum((z - Y) ** 2) / TAU**2


TARGET = pplalign.tilt(model, reward, 1.0)
RUNS, N, STAGES = 64, 128, 12
FIXED = jnp.asarray([0.02, 0.06, 0.15, 0.35, 0.7, 1.0] + [1.0] * (STAGES - 6))


@pytest.fixture(scope="module", params=["rwmh", "hmc-fixed-schedule"])  # MALA: test_genjax_constrained_public_api
def replicated(request):
    """RUNS independent runs of N particles: (log Ẑ [R], particle means [R, D], particle variances [R, D])."""
    kind = request.param.split("-")[0]
    schedule = FIXED if "fixed" in request.param else None

    def one(key):
        p, info = run_tempered(key, TARGET, N, mcmc=kind, num_mcmc_steps=4, max_stages=STAGES, schedule=schedule)
        z = p.samples.retval
        return p.log_Z, z.mean(0), z.var(0), info.num_stages

    out = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(11), RUNS))
    return tuple(np.asarray(x) for x in out)


def test_unbiased_on_Z_scale(replicated):
    log_Z, _, _, stages = replicated
    ratios = np.exp(log_Z - LOG_Z)
    se = ratios.std(ddof=1) / math.sqrt(RUNS)
    assert abs(ratios.mean() - 1.0) < 4 * se + 0.01, (ratios.mean(), se)
    assert np.all(stages >= 2)  # the target is far from the prior: one jump would not do


def test_posterior_moments(replicated):
    _, means, variances, _ = replicated
    se = means.std(0, ddof=1) / math.sqrt(RUNS)
    np.testing.assert_array_less(np.abs(means.mean(0) - POST_MEAN), 4 * se + 0.01)
    # N=128 particles per run: the particle variance is biased by (N−1)/N and by MCMC correlation; 10%.
    np.testing.assert_allclose(variances.mean(0), POST_VAR, rtol=0.1)


# --- a genjax model with an observed value -----------------------------------------------------------

OBS = 1.2


@gen
def g_obs():
    z = normal(0.0, 1.0) @ "z"
    normal(z, 0.3) @ "y"
    return z


def test_genjax_constrained_public_api(observed_normal_posterior):
    target = pplalign.tilt(g_obs, lambda z: 2.0 * z, 1.0, constraints={"y": jnp.asarray(OBS)})
    n, steps, stages = 1024, 3, 8
    p, info = tempered_smc_with_info(jax.random.key(5), target, n, mcmc="mala", num_mcmc_steps=steps, max_stages=stages)
    log_Z, mean, var = observed_normal_posterior(OBS, 0.3, lambda z: 2.0 * z)
    assert abs(float(p.log_Z) - log_Z) < 0.05
    z = np.asarray(p.samples.retval)
    assert abs(z.mean() - mean) < 4 * math.sqrt(var / n) * 2  # ×2: MCMC-correlated particles
    assert abs(z.var() - var) < 0.15 * var
    k = int(info.num_stages)
    assert 1 <= k <= stages
    lambdas = np.asarray(info.lambdas)
    assert np.all(np.diff(lambdas[:k]) > 0) and lambdas[k - 1] == 1.0
    # padding: stages that did not run neither weight nor resample
    assert p.ess.shape == (stages,) and p.ancestors.shape == (stages, n)
    np.testing.assert_array_equal(np.asarray(p.ess[k:]), n)
    np.testing.assert_array_equal(np.asarray(p.ancestors[k:]), np.broadcast_to(np.arange(n), (stages - k, n)))
    assert int(p.nfe) == 2 * n + k * n * steps
    np.testing.assert_allclose(np.asarray(p.samples.choices["y"]), OBS)
    assert float(jnp.max(p.ess[:k])) <= n and float(jnp.min(p.ess[:k])) > 0


def test_same_key_same_result_and_padding_after_forced_last_stage():
    """max_stages=1: the only stage jumps to λ = 1 (IS from the prior, resampled and moved)."""
    p1, info = tempered_smc_with_info(jax.random.key(0), TARGET, N, max_stages=1)
    p2 = tempered_smc(jax.random.key(0), TARGET, N, max_stages=1)
    np.testing.assert_array_equal(np.asarray(p1.samples.retval), np.asarray(p2.samples.retval))
    assert int(info.num_stages) == 1 and float(info.lambdas[0]) == 1.0
    assert abs(float(p1.log_Z) - LOG_Z) < 1.0  # IS with N=128 and ESS ≈ 10: rough but finite


def test_bad_input():
    def discrete():
        return numpyro.sample("k", dist.Bernoulli(0.5)) * 1.0

    dt = pplalign.tilt(discrete, lambda k: k, 1.0)
    with pytest.raises(ValueError, match="discrete choices.*k"):
        tempered_smc(jax.random.key(0), dt, 8)
    with pytest.raises(ValueError, match="mcmc"):
        tempered_smc(jax.random.key(0), TARGET, 8, mcmc="nuts")
    with pytest.raises(ValueError, match="ess_target"):
        tempered_smc(jax.random.key(0), TARGET, 8, ess_target=1.5)
    with pytest.raises(ValueError, match="schedule"):
        tempered_smc(jax.random.key(0), TARGET, 8, max_stages=3, schedule=jnp.asarray([0.5, 1.0]))
    with pytest.raises(ValueError, match="schedule"):
        tempered_smc(jax.random.key(0), TARGET, 8, max_stages=2, schedule=jnp.asarray([0.5, 0.9]))
    with pytest.raises(ValueError, match="num_particles"):
        tempered_smc(jax.random.key(0), TARGET, 0)
    with pytest.raises(ValueError, match="static program"):
        from models.markov_lm import TableReward, random_markov_lm

        lm = random_markov_lm(jax.random.PRNGKey(0), 2, 2)
        tempered_smc(jax.random.key(0), pplalign.tilt(lm, TableReward(jnp.zeros(4), 2), 1.0), 8)
