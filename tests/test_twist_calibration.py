"""The Gaussian-posterior twist (pplalign.potentials) and the pilot level calibration of twists for DTS
(pplalign.search.calibrate_twist), checked against closed forms on the exact Gaussian-mixture diffusion."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.gmm_diffusion import GMMDiffusion, GMMState, QuadraticReward, two_mode_problem
from pplalign import search
from pplalign.potentials import GaussianPosteriorTwist, posterior_variance

BETA = 0.5
TREES = 48  # independent twisted trees for the unbiasedness check


@dataclasses.dataclass(frozen=True)
class OpaqueReward:
    """The same reward without its closed-form Gaussian expectation, to force the Monte Carlo path."""

    inner: QuadraticReward

    def __call__(self, x):
        return self.inner(x)


@pytest.fixture(scope="module")
def gaussian_data():
    """One Gaussian component: p(x_0 | x_s) is exactly N(x̂_0, v_s I) with v_s the ΠGDM variance."""
    model = GMMDiffusion.create(np.ones(1), np.array([[1.0, -0.5]]), 1.5, num_steps=10)
    return model, QuadraticReward.create(jnp.array([0.5, 0.5]), 1.0)


@pytest.fixture(scope="module")
def ring():
    model, reward, beta = two_mode_problem(num_steps=8, radius=4.0, std=0.5, gamma=1.0, beta=BETA)
    return model, reward, pplalign.tilt(model, reward, beta)


def test_posterior_variance_is_the_gaussian_posterior(gaussian_data):
    model, _ = gaussian_data
    for s in (1, 4, 10):
        _, _, v = model.posterior_x0(jnp.zeros(2), s)
        np.testing.assert_allclose(float(posterior_variance(model.alpha_bars[s], 1.5**2)), float(v[0]), rtol=1e-5)
    assert float(posterior_variance(1.0, 2.0)) == 0.0
    np.testing.assert_allclose(float(posterior_variance(0.25, None)), 3.0, rtol=1e-6)


def test_gaussian_posterior_twist_is_exact_for_gaussian_data(gaussian_data):
    model, reward = gaussian_data
    twist = GaussianPosteriorTwist.create(model, reward, BETA, data_variance=1.5**2)
    xs = jax.random.normal(jax.random.PRNGKey(0), (5, 2)) * 2.0
    for s in (0, 1, 5, 10):
        got = jax.vmap(lambda x: twist(GMMState(x, jnp.int32(s)), 0))(xs)
        want = jax.vmap(lambda x: model.log_soft_value(x, s, reward, BETA))(xs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # the guidance interface (pplalign.guidance.tds) gives the same value from the point itself
    np.testing.assert_allclose(float(twist.log_psi_at(xs[0], 5, 0)), float(twist(GMMState(xs[0], jnp.int32(5)), 0)), rtol=1e-6)
    # at s = 0 it is the reward over beta
    x = jnp.array([2.0, -1.0])
    np.testing.assert_allclose(float(twist(GMMState(x, jnp.int32(0)), 0)), float(reward(x)) / BETA, rtol=1e-6)


def test_monte_carlo_path_matches_the_closed_form(gaussian_data):
    model, reward = gaussian_data
    closed = GaussianPosteriorTwist.create(model, reward, BETA, data_variance=2.0)
    mc = GaussianPosteriorTwist.create(model, OpaqueReward(reward), BETA, data_variance=2.0, num_draws=20_000)
    assert closed.draws is None and mc.draws.shape == (20_000, 2)
    for s in (2, 6, 10):
        state = GMMState(jnp.array([1.0, 0.3]), jnp.int32(s))
        np.testing.assert_allclose(float(mc(state, 0)), float(closed(state, 0)), atol=0.06)


def test_gaussian_posterior_twist_bad_input(gaussian_data):
    model, reward = gaussian_data
    with pytest.raises(ValueError, match="data_variance"):
        GaussianPosteriorTwist.create(model, reward, BETA, data_variance=-1.0)
    with pytest.raises(ValueError, match="num_draws"):
        GaussianPosteriorTwist.create(model, OpaqueReward(reward), BETA, num_draws=3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShiftedTwist:
    """The exact soft value plus a known constant per level: calibration must undo the shift."""

    inner: object
    slope: jax.Array

    def __call__(self, state, t):
        return self.inner(state, t) + self.slope * (jnp.asarray(t, jnp.float32) + 1.0)


def test_calibration_undoes_a_per_level_shift_of_the_exact_twist(ring):
    model, reward, target = ring
    exact = model.soft_value_twist(reward, BETA)
    log_z = float(model.exact_tilted_target(reward.center, reward.gamma, BETA).log_Z)
    n = 512
    plain = search.calibrate_twist(jax.random.PRNGKey(3), target, exact, n)
    assert int(plain.pilot_nfe) == n * target.num_steps
    # E_{p0}[psi_t] = Z at every level: the pilot's log means are log Z, the offsets ~ 0
    np.testing.assert_allclose(np.asarray(plain.log_means), log_z, atol=0.25)
    np.testing.assert_allclose(np.asarray(plain.offsets), 0.0, atol=0.3)
    shifted = search.calibrate_twist(jax.random.PRNGKey(3), target, ShiftedTwist(exact, jnp.float32(0.7)), n)
    levels = np.arange(-1, target.num_steps)
    # the last level is the reward itself (no shift); level t carried +0.7 (t + 1): the offsets remove it
    want = np.where(levels == target.num_steps - 1, 0.0, -0.7 * (levels + 1))
    np.testing.assert_allclose(np.asarray(shifted.offsets), want, atol=0.35)
    state = model.init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(shifted(state, 3)), float(exact(state, 3) + 0.7 * 4 + shifted.offsets[4]), rtol=1e-5)


def test_calibrated_twist_keeps_twisted_dts_unbiased_and_cheap(ring):
    """Twisted DTS with the calibrated Gaussian-posterior twist: the root estimates Z (E[Ŵ_root] = Z) and the
    samples land on the target's two modes."""
    model, reward, target = ring
    log_z = float(model.exact_tilted_target(reward.center, reward.gamma, BETA).log_Z)
    data_variance = float(np.mean(np.var(np.asarray(model.sample_data(jax.random.PRNGKey(1), 4000)), axis=0)))
    twist = search.calibrate_twist(jax.random.PRNGKey(5), target, GaussianPosteriorTwist.create(model, reward, BETA, data_variance), 64)
    config = search.DTSConfig("twisted")
    # E[Ŵ_root] = Z for any number of iterations: TREES independent small trees (one vmapped compile) give the
    # mean of Ŵ_root/Z with its standard error; by the CLT |mean − 1| < 4 se fails with probability 6e-5.
    # (Measured: log Ŵ_root has sd ≈ 0.65 at 40 iterations, se of the ratio ≈ 0.07: a 30 % bias is caught.)
    small = search.init(target, 40 * 8 * (target.num_steps + 1))  # 8 nodes per step-iteration: 8x what they use
    many = jax.jit(jax.vmap(lambda k: search.run_loop(k, small, target, jnp.asarray(40, jnp.int32), config, twist)))
    trees = many(jax.random.split(jax.random.PRNGKey(0), TREES))
    assert not np.any(np.asarray(trees.full))
    ratio = np.exp(np.asarray(trees.log_value[:, 0], np.float64) - log_z)
    se = ratio.std(ddof=1) / np.sqrt(TREES)
    assert abs(ratio.mean() - 1.0) < 4 * se, (ratio.mean(), se)
    # cheap: the roulette keeps the transitions per iteration below a full rollout's T
    assert float(np.mean(np.asarray(trees.nfe))) < 40 * target.num_steps
    tree = jax.jit(lambda k, tr: search.run_loop(k, tr, target, jnp.asarray(300, jnp.int32), config, twist))(
        jax.random.PRNGKey(0), search.init(target, 200_000)
    )
    assert not bool(tree.full)
    leaves = search.sample_leaves(jax.random.PRNGKey(9), tree, target.num_steps, 400, False)
    x = np.asarray(tree.states.x[leaves])
    err = np.sqrt(np.sum((x - np.asarray(reward.center)) ** 2, -1))
    exact_x = np.asarray(model.sample_tilted(jax.random.PRNGKey(2), 4000, reward.center, reward.gamma, BETA))
    exact_err = np.sqrt(np.sum((exact_x - np.asarray(reward.center)) ** 2, -1))
    assert abs(err.mean() - exact_err.mean()) < 0.25, (err.mean(), exact_err.mean())


def test_calibration_bad_input(ring):
    model, reward, target = ring
    with pytest.raises(ValueError, match="num_particles"):
        search.calibrate_twist(jax.random.PRNGKey(0), target, model.soft_value_twist(reward, BETA), 1)
    with pytest.raises(ValueError, match="needs a twist"):
        search.calibrate_twist(jax.random.PRNGKey(0), target, None, 8)
    dead = lambda state, t: jnp.asarray(-jnp.inf, jnp.float32)
    with pytest.raises(ValueError, match="vanished"):
        search.calibrate_twist(jax.random.PRNGKey(0), target, dead, 8)
