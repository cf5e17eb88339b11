"""Island SMC and many-targets-in-one-call on one device: each island is exactly a single run with its key,
the pooled log Ẑ is the log-mean-exp of the islands', pooled weights are Ẑ_i·W_ij, and island log Ẑ is
unbiased (checked against the Markov LM's exact log Z)."""

import math

import jax
import numpy as np
import pytest

import pplalign
from models.markov_lm import TableReward
from pplalign.islands import island_smc, many, pool_islands


@pytest.fixture(scope="module")
def setup(markov):
    lm, reward, beta = markov
    return lm, reward, pplalign.tilt(lm, reward, beta)


def test_each_island_is_a_single_run(setup):
    lm, reward, target = setup
    key, n, islands = jax.random.key(0), 32, 4  # N/I = 8: the single runs share one compile with test_many
    pooled, per = island_smc(key, target, n, num_islands=islands, return_islands=True)
    keys = jax.random.split(key, islands)
    for i in range(islands):
        single = pplalign.smc(keys[i], target, n // islands)
        np.testing.assert_allclose(float(per.log_Z[i]), float(single.log_Z), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(per.samples[i]), np.asarray(single.samples))
    lme = float(jax.nn.logsumexp(per.log_Z) - math.log(islands))
    assert abs(float(pooled.log_Z) - lme) < 1e-5
    # pooled weights: softmax over all particles = Ẑ_i W_ij / Σ_k Ẑ_k
    w = np.asarray(pooled.normalized_weights).reshape(islands, -1)
    z_share = np.asarray(jax.nn.softmax(per.log_Z))
    np.testing.assert_allclose(w.sum(1), z_share, rtol=1e-4, atol=1e-6)
    assert pooled.samples.shape == (n, lm.num_steps)
    assert pooled.ancestors.shape == (lm.num_steps, n)
    assert int(pooled.ancestors.max()) < n and int(pooled.ancestors[:, -1].min()) >= n - n // islands
    assert int(pooled.nfe) == n * lm.num_steps


def test_island_estimate_unbiased(setup):
    """Mean over runs of Ẑ/Z (4 islands of 8-particle bootstrap SMC) is 1 within 4 standard errors.
    Reuses the compile of the test above."""
    lm, reward, target = setup
    log_Z = float(lm.log_Z(reward, 1.0))
    runs = 120
    keys = jax.random.split(jax.random.key(1), runs)
    log_Zs = np.asarray([float(island_smc(k, target, 32, num_islands=4).log_Z) for k in keys])
    ratios = np.exp(log_Zs - log_Z)
    se = ratios.std(ddof=1) / math.sqrt(runs)
    assert abs(ratios.mean() - 1.0) < 4 * se
    # pooling is the log-mean-exp of the islands: check once against pool_islands itself
    pooled, per = island_smc(keys[0], target, 32, num_islands=4, return_islands=True)
    assert abs(float(pool_islands(per).log_Z) - float(pooled.log_Z)) < 1e-6


def test_many_targets_equal_single_runs(setup):
    lm, _, _ = setup
    tables = jax.random.normal(jax.random.key(9), (3, 4**5))
    targets = jax.vmap(lambda v: pplalign.tilt(lm, TableReward(v, 4), 1.0))(tables)
    key = jax.random.key(4)
    out = many(key, targets, 8)
    assert out.log_Z.shape == (3,) and out.samples.shape == (3, 8, lm.num_steps)
    for b, k in enumerate(jax.random.split(key, 3)):
        single = pplalign.smc(k, pplalign.tilt(lm, TableReward(tables[b], 4), 1.0), 8)
        np.testing.assert_allclose(float(out.log_Z[b]), float(single.log_Z), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.samples[b]), np.asarray(single.samples))


def test_island_bad_input(setup):
    _, _, target = setup
    with pytest.raises(ValueError, match="num_particles=30 is not divisible by num_islands=4"):
        island_smc(jax.random.key(0), target, 30, num_islands=4)
    with pytest.raises(ValueError, match="num_islands"):
        island_smc(jax.random.key(0), target, 32, num_islands=0)
    with pytest.raises(ValueError, match="sampler"):
        island_smc(jax.random.key(0), target, 32, num_islands=4, sampler="tempered")
    with pytest.raises(ValueError, match="batch"):
        many(jax.random.key(0), target, 32)  # β is a scalar: no batch axis


def test_mesh_must_be_a_mesh(setup):
    _, _, target = setup
    with pytest.raises(ValueError, match="Mesh"):
        pplalign.smc(jax.random.key(0), target, 8, mesh="cpu")


def test_tempered_islands_on_a_static_target():
    """Static targets run tempered-SMC islands (a regression: the argument check once raised TypeError here).
    Conjugate Gaussian, exact log Z; I = 4 islands of 64 particles, 8 seeds: the mean of log Ẑ over seeds
    has se ≈ sd/√8 and must lie within 4·se + 0.05 of the truth (the 0.05 is tempered SMC's O(1/N) bias at
    N = 256); move options are validated as in tempered_smc."""
    import numpyro
    import numpyro.distributions as dist

    def model():
        return numpyro.sample("z", dist.Normal(0.0, 1.0))

    y, s = 1.5, 0.5  # likelihood N(y; z, s²): log Z = log N(y; 0, 1 + s²)
    target = pplalign.tilt(model, lambda z: -0.5 * ((y - z) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi)), 1.0)
    exact = -0.5 * y**2 / (1 + s**2) - 0.5 * math.log(2 * math.pi * (1 + s**2))
    keys = jax.random.split(jax.random.key(3), 8)
    log_Zs = np.asarray([float(island_smc(k, target, 256, num_islands=4, num_mcmc_steps=2).log_Z) for k in keys])
    se = log_Zs.std(ddof=1) / math.sqrt(len(log_Zs))
    assert abs(log_Zs.mean() - exact) < 4 * se + 0.05, (log_Zs.mean(), exact, se)
    with pytest.raises(ValueError, match="step_size"):
        island_smc(keys[0], target, 256, num_islands=4, step_size=-1.0)
    with pytest.raises(ValueError, match="waste_free"):
        island_smc(keys[0], target, 256, num_islands=4, waste_free=5)
