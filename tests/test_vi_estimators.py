"""Each gradient estimator is unbiased against the exact gradient (enumeration / closed form).

Tolerance from the sample size: for R independent gradient estimates projected on a fixed direction u,
the mean of g·u has standard error s/√R; we require |mean − exact| ≤ 5·se on each of 4 random directions
(Gaussian tail: a false alarm has probability ~ 6e-7 per check). The same check rejects a deliberately biased
estimator (the pathwise gradient of stop-gradient samples), so it can fail. A 5-se gate is wider than a
(1 − 1/n) bias at n = 8, so the batch-mean baseline's n/(n−1) factor is checked exactly (against leave-one-out)
and at n = 2, where the bias is half the gradient and the test states its own power.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.markov_lm import TableReward, random_markov_lm
from models.markov_vi import prefix_table_family
from pplalign import vi
from pplalign.vi import estimators as est

REPS, N = 400, 8


@pytest.fixture(scope="module")
def small():
    lm = random_markov_lm(jax.random.key(10), 3, 3)
    reward = TableReward(jax.random.normal(jax.random.key(11), (27,)), 3)
    target = pplalign.tilt(lm, reward, 0.7)
    family, theta = prefix_table_family(lm, init="uniform")
    theta = theta + 0.5 * jax.random.normal(jax.random.key(12), theta.shape)  # away from symmetric points
    dirs = jax.random.normal(jax.random.key(13), (4,) + theta.shape)
    return lm, target, family, theta, dirs


def _projected(objective, theta, dirs, reps=REPS):
    grads = jax.jit(jax.vmap(lambda k: jax.grad(lambda p: objective(p, k)[0])(theta)))(
        jax.random.split(jax.random.key(0), reps)
    )
    proj = jnp.einsum("r...,d...->rd", grads, dirs)
    return np.asarray(proj.mean(0)), np.asarray(proj.std(0) / np.sqrt(reps))


def _exact(objective, theta, dirs):
    g = jax.grad(lambda p: objective(p, jax.random.key(0))[0])(theta)
    return np.asarray(jnp.einsum("...,d...->d", g, dirs))


@pytest.mark.parametrize("name", ["reinforce", "reinforce_mean", "reinforce_loo", "sequence_reinforce"])
def test_elbo_gradient_unbiased(small, name):
    _, target, family, theta, dirs = small
    exact = _exact(vi.elbo(family, target, estimator="enum"), theta, dirs)
    mean, se = _projected(vi.elbo(family, target, num_samples=N, estimator=name), theta, dirs)
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-6), (name, mean, exact, se)


def test_reinforce_mean_equals_leave_one_out(small):
    """n/(n−1)·(f_i − mean f) = f_i − Σ_{j≠i} f_j/(n−1) exactly (Kool et al. 2019, eq. 9): with the same draws
    the batch-mean estimator and leave-one-out give the same gradient to float precision. Without its n/(n−1)
    factor the mean baseline's score term shrinks by (1 − 1/n) (12.5 % at n = 8), far above float error."""
    _, target, family, theta, _ = small
    grad = lambda name: jax.jit(jax.vmap(lambda k: jax.grad(lambda p: vi.elbo(family, target, num_samples=N, estimator=name)(p, k)[0])(theta)))(
        jax.random.split(jax.random.key(7), 16)
    )
    mean_b, loo = np.asarray(grad("reinforce_mean")), np.asarray(grad("reinforce_loo"))
    scale = np.max(np.abs(loo))
    assert scale > 1e-2
    np.testing.assert_allclose(mean_b, loo, rtol=0, atol=1e-4 * scale)


def test_reinforce_mean_unbiased_at_two_samples(small):
    """At n = 2 a missing n/(n−1) halves the score term, so the unbiasedness gate resolves it: for the ELBO,
    E[∇f] = −E[∇ log q] = 0 and the whole gradient is the score term, so the biased mean would be exact/2.
    Gate: |mean − exact| ≤ 5·se (se = sd/√REPS of the projected gradient); power: |exact|/2 > 10·se on some
    direction (checked below; ≈ 14 se with 16·REPS draws), so a halved gradient lies ≥ 5 se outside the gate."""
    _, target, family, theta, dirs = small
    exact = _exact(vi.elbo(family, target, estimator="enum"), theta, dirs)
    mean, se = _projected(vi.elbo(family, target, num_samples=2, estimator="reinforce_mean"), theta, dirs, reps=16 * REPS)
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-6), (mean, exact, se)
    assert np.any(np.abs(exact) / 2 > 10 * se), (exact, se)


def test_kl_rl_gradient_unbiased_and_biased_estimator_caught(small):
    _, target, family, theta, dirs = small
    exact = _exact(vi.kl_regularised_rl(family, target, estimator="enum"), theta, dirs)
    mean, se = _projected(vi.kl_regularised_rl(family, target, num_samples=N, estimator="sequence_reinforce"), theta, dirs)
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-6)

    # a biased estimator: differentiate the sample mean, ignoring that the samples depend on θ
    def naive(p, k):
        x = family.sample(p, k, N)
        lt = target.base.log_prob(x) + jax.vmap(target.reward)(x) / target.beta
        return -jnp.mean(target.beta * (lt - family.log_prob(p, x))), {}

    mean_b, se_b = _projected(naive, theta, dirs)
    assert np.any(np.abs(mean_b - exact) > 5 * se_b + 1e-6)


def test_kl_rl_equals_beta_times_elbo(small):
    lm, target, family, theta, _ = small
    j = -vi.kl_regularised_rl(family, target, estimator="enum")(theta, jax.random.key(0))[0]
    e = -vi.elbo(family, target, estimator="enum")(theta, jax.random.key(0))[0]
    assert np.isclose(float(j), float(target.beta * e), rtol=1e-5)
    s = vi.exact_summary(family, theta, target)
    # J = β log Z − β KL(q‖σ)
    assert np.isclose(float(j), float(target.beta * (s["log_Z"] - s["kl_q_sigma"])), rtol=1e-4)


def test_renyi_enum_limits(small):
    _, target, family, theta, _ = small
    s = vi.exact_summary(family, theta, target)
    l0 = -vi.renyi(family, target, 0.0, estimator="enum")(theta, jax.random.key(0))[0]
    assert np.isclose(float(l0), float(s["log_Z"]), atol=1e-4)  # α = 0: log Z
    l_near1 = -vi.renyi(family, target, 0.999, estimator="enum")(theta, jax.random.key(0))[0]
    assert np.isclose(float(l_near1), float(s["log_Z"] - s["kl_q_sigma"]), atol=2e-2)  # α → 1: ELBO
    # sampled IWAE lies between the ELBO and log Z
    iw = vi.iwae(family, target, num_particles=8, num_samples=256)
    val = float(-iw(theta, jax.random.key(1))[0])
    assert s["log_Z"] - s["kl_q_sigma"] - 0.05 < val < s["log_Z"] + 0.05


def test_reparam_and_reinforce_unbiased_gaussian():
    # target N(m, s²I) unnormalised; q = N(μ, σ²): ∂ELBO/∂μ = −(μ−m)/s², ∂ELBO/∂log σ = 1 − σ²/s²
    m, s2 = jnp.array([1.0, -2.0]), 2.0
    target = lambda x: -0.5 * jnp.sum((x - m) ** 2) / s2
    fam = vi.GaussianFamily(2)
    params = {"loc": jnp.array([0.3, 0.1]), "log_scale": jnp.array([-0.2, 0.4])}
    exact = {"loc": -(params["loc"] - m) / s2, "log_scale": 1 - jnp.exp(2 * params["log_scale"]) / s2}
    for name in ("reparam", "reinforce_loo"):
        obj = vi.elbo(fam, target, num_samples=N, estimator=name)
        g = jax.jit(jax.vmap(lambda k: jax.grad(lambda p: -obj(p, k)[0])(params)))(jax.random.split(jax.random.key(3), REPS))
        for leaf in ("loc", "log_scale"):
            mean, se = g[leaf].mean(0), g[leaf].std(0) / np.sqrt(REPS)
            assert np.all(np.abs(mean - exact[leaf]) <= 5 * se + 1e-6), (name, leaf, mean, exact[leaf])


def test_adev_categorical_reinforce_unbiased():
    # genjax 1.0.14's own categorical_enum_parallel fails inside an expectation (beartype: its continuation
    # receives raw arrays, not Duals), so only the REINFORCE primitive added here is checked
    from genjax.adev import expectation

    from pplalign.vi import adev

    f = jnp.array([1.0, -0.5, 2.0, 0.3])
    logits = jnp.array([0.2, -0.1, 0.5, 0.0])
    exact = jax.grad(lambda l: jnp.sum(jax.nn.softmax(l) * f))(logits)
    for prim in (adev.categorical_reinforce,):
        obj = adev.as_objective(expectation(lambda l, prim=prim: f[prim(l)]), num_samples=1)
        g = jax.jit(jax.vmap(lambda k: jax.grad(lambda l: -obj(l, k)[0])(logits)))(jax.random.split(jax.random.key(4), 4000))
        mean, se = g.mean(0), g.std(0) / np.sqrt(4000)
        assert np.all(np.abs(mean - exact) <= 5 * se + 1e-5), (prim, mean, exact)


def test_reparam_refuses_discrete_and_nondifferentiable():
    lm = random_markov_lm(jax.random.key(0), 3, 3)
    target = pplalign.tilt(lm, TableReward(jnp.zeros(27), 3), 1.0)
    family, theta = prefix_table_family(lm)
    with pytest.raises(ValueError, match="REINFORCE"):
        vi.elbo(family, target, estimator="reparam")(theta, jax.random.key(0))  # no rsample
    fam = vi.GaussianFamily(2)
    step = lambda x: jnp.where(x[0] > 0, 0.0, -1.0) - 0.5 * jnp.sum(x**2)  # a threshold in x... plus smooth part
    thresh = lambda x: jnp.sum((x > 0).astype(jnp.float32))  # zero derivative everywhere
    with pytest.raises(ValueError, match="REINFORCE"):
        vi.elbo(fam, thresh, estimator="reparam")(fam.init_params(), jax.random.key(0))
    with pytest.raises(ValueError, match="REINFORCE"):
        rounded = lambda x: jnp.sum(jnp.round(x))
        vi.elbo(fam, rounded, estimator="reparam")(fam.init_params(), jax.random.key(0))
    # a smooth-but-partly-thresholded log density is differentiable: accepted
    vi.elbo(fam, step, estimator="reparam")(fam.init_params(), jax.random.key(0))
    with pytest.raises(ValueError, match="unknown estimator"):
        vi.elbo(fam, step, estimator="score")
    assert set(est.ESTIMATORS) >= {"reparam", "reinforce_loo", "enum", "sequence_reinforce"}
