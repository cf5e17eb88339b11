"""The exact Gaussian-mixture diffusion testbed: its kernels, marginals, tilted target and soft values are
checked against identities that hold pointwise, and against exact samples with tolerances from the sample size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.gmm_diffusion import GMMDiffusion, GMMState, QuadraticReward, ring_mixture, two_mode_problem, vp_betas
from pplalign.smc import run_smc

T = 30


@pytest.fixture(scope="module")
def problem():
    return two_mode_problem(num_steps=T, gamma=1.0, beta=1.0)


def _log_normal(y, mean, var):
    d = y.shape[-1]
    return -0.5 * (d * jnp.log(2 * jnp.pi * var) + jnp.sum((y - mean) ** 2, -1) / var)


def _state(x, s):
    return GMMState(jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.int32))


def test_reverse_kernel_satisfies_bayes_pointwise(problem):
    """p(x_{s-1}|x_s) p_s(x_s) = p_{s-1}(x_{s-1}) q(x_s|x_{s-1}) at random points and times (exact identity)."""
    model, _, _ = problem

    @jax.jit
    @jax.vmap
    def gap(x, y, s):
        lhs = model.transition(_state(x, s), 0).log_prob(y) + model.log_marginal(x, s)
        beta = model.betas[s - 1]
        rhs = model.log_marginal(y, s - 1) + _log_normal(x, jnp.sqrt(1 - beta) * y, beta)
        return lhs - rhs

    rng = np.random.default_rng(0)
    xy = jnp.asarray(rng.normal(size=(2, 8, 2)) * 3, jnp.float32)
    s = jnp.asarray([1, 2, 3, 5, 10, 15, 29, T])
    np.testing.assert_allclose(gap(xy[0], xy[1], s), 0.0, atol=2e-3)


def test_tilted_kernel_is_twisted_kernel_and_soft_value_ends_at_reward(problem):
    """The tilted diffusion's kernel equals p(x_{s-1}|x_s) ψ_{s-1}(x_{s-1}) / ψ_s(x_s) pointwise, and ψ_0 = exp(r/β)."""
    model, reward, beta = problem
    tilted = model.tilted(reward.center, reward.gamma, beta)
    twist = model.soft_value_twist(reward, beta)

    @jax.jit
    @jax.vmap
    def gap(x, y, s):
        lhs = tilted.transition(_state(x, s), 0).log_prob(y)
        return lhs - (model.transition(_state(x, s), 0).log_prob(y) + twist.at(y, s - 1) - twist.at(x, s))

    rng = np.random.default_rng(1)
    xy = jnp.asarray(reward.center + rng.normal(size=(2, 6, 2)), jnp.float32)
    s = jnp.asarray([1, 2, 3, 10, 20, T])
    np.testing.assert_allclose(gap(xy[0], xy[1], s), 0.0, atol=2e-3)
    x = jnp.asarray([0.3, -1.2])
    np.testing.assert_allclose(jax.jit(twist.at)(x, 0), reward(x) / beta, rtol=1e-6)


@pytest.fixture(scope="module")
def replicate_runs(problem):
    """96 independent runs of N = 64 of importance sampling (= ancestral sampling, weighted) and of SMC with the
    exact soft-value twist and bootstrap proposals; one compile for both."""
    model, reward, beta = problem
    target = pplalign.tilt(model, reward, beta)
    twist = model.soft_value_twist(reward, beta)

    def run(key):
        k1, k2 = jax.random.split(key)
        is_run = run_smc(k1, target, 64, ess_threshold=0.0)
        tw_run = run_smc(k2, target, 64, twist=twist, ess_threshold=0.5)
        return is_run.samples, is_run.log_Z, tw_run.log_Z, tw_run.nfe

    samples, is_log_Z, tw_log_Z, nfe = jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(10), 96))
    assert int(nfe[0]) == 64 * T
    return samples.reshape(-1, 2), {"is": is_log_Z, "twisted_bootstrap": tw_log_Z}


def test_ancestral_sampling_ends_at_data(problem, replicate_runs):
    """Exact kernels from the exact x_T: the final marginal is p_data (energy distance at the null level,
    component frequencies and means within 4 standard errors). The unweighted IS particles are ancestral draws."""
    model, _, _ = problem
    x = replicate_runs[0][:3000]
    n = x.shape[0]
    ref = model.sample_data(jax.random.PRNGKey(1), n)

    @jax.jit
    def stats(x, ref):
        delta = jnp.mean(jnp.linalg.norm(ref[:, None] - ref[None], axis=-1)) * n / (n - 1)
        label = jnp.argmin(jnp.linalg.norm(x[:, None] - model.means[None], axis=-1), axis=1)
        counts = jax.ops.segment_sum(jnp.ones(n), label, model.num_components)
        sums = jax.ops.segment_sum(x, label, model.num_components)
        return pplalign.metrics.energy_distance(x, ref), delta, counts, sums / counts[:, None]

    ed, delta, counts, means = (np.asarray(v) for v in stats(x, ref))
    # Under the null, E[energy distance] (V-statistic, n = m) = 2·E‖X−X'‖/n.
    assert ed < 5 * 2 * delta / n, (ed, 2 * delta / n)
    p = 1 / model.num_components
    assert np.all(np.abs(counts / n - p) < 4 * np.sqrt(p * (1 - p) / n)), counts / n
    se = np.asarray(model.stds)[:, None] / np.sqrt(counts)[:, None]
    assert np.all(np.abs(means - np.asarray(model.means)) < 4 * se), means


def test_closed_form_tilted_target_matches_importance_sampling(problem):
    """Weights, mean and log Z of the closed-form tilted mixture agree with 400k-sample importance sampling."""
    model, reward, beta = problem
    exact = model.exact_tilted_target(reward.center, reward.gamma, beta)

    @jax.jit
    def stats(key):
        x, comp = model.sample_data(key, 400_000, return_components=True)
        log_w = reward(x) / beta
        w = jax.nn.softmax(log_w)
        exact_mean = jnp.sum(jnp.exp(exact.log_weights)[:, None] * exact.means, 0)
        w_raw = jnp.exp(log_w - exact.log_Z)
        return dict(
            ess=1 / jnp.sum(w**2),
            weights=jax.ops.segment_sum(w, comp, model.num_components),
            mean=jnp.sum(w[:, None] * x, 0),
            exact_mean=exact_mean,
            var=jnp.sum(w[:, None] * (x - exact_mean) ** 2, 0),
            z_ratio=jnp.mean(w_raw),
            z_se=jnp.std(w_raw) / jnp.sqrt(400_000.0),
        )

    st = {k: np.asarray(v) for k, v in stats(jax.random.PRNGKey(2)).items()}
    ess = float(st["ess"])
    assert ess > 5000
    p = np.exp(np.asarray(exact.log_weights))
    assert np.all(np.abs(st["weights"] - p) < 4 * np.sqrt(p * (1 - p) / ess) + 1e-6), (st["weights"], p)
    np.testing.assert_allclose(st["mean"], st["exact_mean"], atol=float(4 * np.sqrt(st["var"].max() / ess)))
    assert abs(float(st["z_ratio"]) - 1) < 4 * float(st["z_se"]), (st["z_ratio"], st["z_se"])
    # The two equal-mass modes of the helper.
    np.testing.assert_allclose(p[0], p[1], rtol=1e-5)
    assert p[0] + p[1] > 0.99
    # The exact sampler draws from the same mixture.
    xs, cs = model.sample_tilted(jax.random.PRNGKey(3), 20_000, reward.center, reward.gamma, beta, return_components=True)
    np.testing.assert_allclose(np.bincount(np.asarray(cs), minlength=8)[:2] / 20_000, p[:2], atol=4 * np.sqrt(0.25 / 20_000))


def test_twisted_smc_with_optimal_proposal_is_exact(problem):
    """With ψ_t the exact soft value and the tilted kernels as proposal every weight after step 0 is 1; the only
    randomness left is ψ_T(x_T) at the untilted init, which is nearly constant (ᾱ_T ≈ 4e-5)."""
    model, reward, beta = problem
    target = pplalign.tilt(model, reward, beta)
    twist = model.soft_value_twist(reward, beta)
    tilted = model.tilted(reward.center, reward.gamma, beta)
    exact = model.exact_tilted_target(reward.center, reward.gamma, beta)
    for seed in range(2):
        p = pplalign.smc(jax.random.PRNGKey(seed), target, 128, twist=twist, proposal=tilted.transition)
        assert abs(float(p.log_Z - exact.log_Z)) < 5e-3
        assert float(p.ess.min()) > 0.99 * 128


@pytest.mark.parametrize("method", ["twisted_bootstrap", "is"])
def test_log_Z_estimates_are_unbiased(problem, replicate_runs, method):
    """E[Ẑ/Z] = 1 within 3 standard errors over 96 independent runs of N = 64."""
    model, reward, beta = problem
    exact = model.exact_tilted_target(reward.center, reward.gamma, beta)
    log_Z = replicate_runs[1][method]
    ratio = np.exp(np.asarray(log_Z - exact.log_Z))
    se = ratio.std() / np.sqrt(len(ratio))
    assert abs(ratio.mean() - 1) < 3 * se + 1e-3, (ratio.mean(), se)


def test_denoiser_is_posterior_mean(problem):
    """Tweedie's formula ties the closed-form denoiser to the closed-form marginal:
    E[x_0 | x_s] = (x_s + (1 − ᾱ_s) ∇ log p_s(x_s)) / √ᾱ_s, pointwise; at s = 0 the denoiser is the identity."""
    model, _, _ = problem

    @jax.jit
    @jax.vmap
    def gap(x, s):
        ab = model.alpha_bars[s]
        tweedie = (x + (1 - ab) * model.score(x, s)) / jnp.sqrt(ab)
        return model.denoiser()(x, s) - tweedie

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 2)) * 2, jnp.float32)
    s = jnp.asarray([1, 2, 5, 10, 15, 20])  # ᾱ_s ≥ 0.1: Tweedie divides by √ᾱ_s
    np.testing.assert_allclose(gap(x, s), 0.0, atol=1e-3)
    point = jnp.asarray([1.0, 0.5])
    np.testing.assert_allclose(model.denoiser()(point, 0), point, rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError):
        GMMDiffusion.create([1.0, 1.0], [[0.0, 0.0]], 1.0, 10)
    with pytest.raises(ValueError):
        GMMDiffusion.create([1.0], [[0.0, 0.0]], -1.0, 10)
    with pytest.raises(ValueError):
        QuadraticReward.create([0.0, 0.0], 0.0)
    with pytest.raises(ValueError):
        ring_mixture(num_steps=10).exact_tilted_target(jnp.zeros(3), 1.0, 1.0)
    with pytest.raises(ValueError):
        vp_betas(0)
