"""FK steering, the twisted diffusion sampler and reward guidance on the exact Gaussian-mixture testbed, whose
tilted target is closed form: corrected samplers must hit it (tolerances from the ESS), the uncorrected one
must not, and every sampler counts its NFEs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.gmm_diffusion import two_mode_problem
from pplalign.guidance import reward_guidance, tds
from pplalign.potentials import fk_steering

T = 20
N = 3000


@pytest.fixture(scope="module")
def problem():
    """A milder two-mode problem (γ/β = 0.5) so that plain IS is a fair check too; exact answers alongside."""
    model, reward, beta = two_mode_problem(num_steps=T, gamma=0.5, beta=1.0)
    exact = model.exact_tilted_target(reward.center, reward.gamma, beta)
    w = np.exp(np.asarray(exact.log_weights))
    d = model.dim
    # E_σ‖x − c‖² = Σ_k w_k (‖m_k − c‖² + d v_k)
    sq = float(np.sum(w * (np.sum((np.asarray(exact.means) - np.asarray(reward.center)) ** 2, -1) + d * np.asarray(exact.variances))))
    return model, reward, beta, exact, sq


def _check_target(p, model, reward, exact, sq_exact, label):
    """Weighted E‖x−c‖² and the mass of the two modes agree with the closed form within 5 standard errors."""
    w = np.asarray(p.normalized_weights)
    ess = 1.0 / np.sum(w**2)
    x = np.asarray(p.samples)
    sq = np.sum((x - np.asarray(reward.center)) ** 2, -1)
    se = np.sqrt(np.sum(w * (sq - sq_exact) ** 2) / ess)
    assert abs(np.sum(w * sq) - sq_exact) < 5 * se + 1e-3, (label, np.sum(w * sq), sq_exact, se)
    comp = np.argmin(np.linalg.norm(x[:, None] - np.asarray(model.means)[None], axis=-1), axis=1)
    mass0 = np.sum(w * (comp == 0))
    p0 = float(np.exp(exact.log_weights[0]))
    assert abs(mass0 - p0) < 5 * np.sqrt(p0 * (1 - p0) / ess) + 0.01, (label, mass0, p0, ess)
    return ess


@pytest.mark.parametrize("potential", ["difference", "max"])
def test_fk_steering_targets_the_exact_tilt(problem, potential):
    model, reward, beta, exact, sq = problem
    target = pplalign.tilt(model, reward, beta)
    p = fk_steering(jax.random.PRNGKey(1), target, N, potential=potential)
    assert int(p.nfe) == N * T
    _check_target(p, model, reward, exact, sq, potential)
    # log Ẑ is a (downward-biased in log) estimate of log Z: within a loose band at this N.
    assert abs(float(p.log_Z - exact.log_Z)) < 0.3


def test_tds_with_exact_soft_value_is_nearly_perfect(problem):
    """With the exact soft value as twist, the guided Gaussian proposal is close to the optimal one: high ESS
    at every step, log Ẑ ≈ log Z, and the weighted samples hit the target."""
    model, reward, beta, exact, sq = problem
    target = pplalign.tilt(model, reward, beta)
    p = tds(jax.random.PRNGKey(2), target, N, twist=model.soft_value_twist(reward, beta))
    assert int(p.nfe) == 2 * N * T
    assert float(p.ess.min()) > 0.5 * N
    assert abs(float(p.log_Z - exact.log_Z)) < 0.05
    _check_target(p, model, reward, exact, sq, "tds-exact")


def test_reward_guidance_is_uncorrected_and_tds_corrects_it(problem):
    """The same guided proposal, unweighted (reward guidance) over-tilts with the plug-in twist r(x̂_0): its
    E‖x−c‖² misses the exact value by many standard errors. TDS's weights move it most of the way back (at
    finite N it keeps some bias: the plug-in twist is far from the soft value at high noise)."""
    model, reward, beta, exact, sq = problem
    target = pplalign.tilt(model, reward, beta)
    g = reward_guidance(jax.random.PRNGKey(3), target, N)
    assert int(g.nfe) == 2 * N * T
    np.testing.assert_array_equal(np.asarray(g.log_weights), 0.0)
    x = np.asarray(g.samples)
    d2 = np.sum((x - np.asarray(reward.center)) ** 2, -1)
    assert abs(d2.mean() - sq) > 10 * d2.std() / np.sqrt(N), (d2.mean(), sq)
    t = tds(jax.random.PRNGKey(3), target, N)
    w = np.asarray(t.normalized_weights)
    tds_d2 = np.sum(w * np.sum((np.asarray(t.samples) - np.asarray(reward.center)) ** 2, -1))
    assert abs(tds_d2 - sq) < 0.5 * abs(d2.mean() - sq), (tds_d2, d2.mean(), sq)


def test_bad_input(problem):
    model, reward, beta, _, _ = problem
    target = pplalign.tilt(model, reward, beta)
    with pytest.raises(ValueError, match="potential"):
        fk_steering(jax.random.PRNGKey(0), target, 8, potential="sum")
    with pytest.raises(ValueError, match="lambdas"):
        fk_steering(jax.random.PRNGKey(0), target, 8, lambdas=jnp.ones(T + 1))
    with pytest.raises(ValueError, match="scale"):
        tds(jax.random.PRNGKey(0), target, 8, scale=-1.0)
    with pytest.raises(ValueError, match="pplalign.tilt"):
        fk_steering(jax.random.PRNGKey(0), model, 8)
    with pytest.raises(ValueError, match="lacks"):
        markov_like = pplalign.tilt(_NoDenoiser(), lambda x: jnp.zeros(()), 1.0)
        tds(jax.random.PRNGKey(0), markov_like, 8)


class _NoDenoiser:
    num_steps = 2

    def init(self, key):
        return jnp.zeros(())

    def transition(self, state, t):
        import numpyro.distributions as dist

        return dist.Normal(0.0, 1.0)

    def update(self, state, x, t):
        return x

    def output(self, state):
        return state
