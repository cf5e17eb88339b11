"""Static programs (genjax, numpyro) as bases of tilted targets: importance sampling against a conjugate
Gaussian with closed-form log Z and posterior, constraints, user proposals, and the bad-input errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from genjax import gen, normal

import pplalign
from pplalign import static

# Conjugate Gaussian: z ~ N(mu0, s0² I_D), r(z) = −|z − y|²/(2 τ²), β = 1. Then σ = N(m, v I) with
# v = (1/s0² + 1/τ²)⁻¹, m = v (mu0/s0² + y/τ²), and Z = Π_d √(2πτ²) N(y_d; mu0, s0² + τ²).
MU0, S0, TAU = 0.5, 1.5, 0.8
Y = jnp.array([1.5, -0.5])
D = 2


def conjugate_truth(beta=1.0):
    tau2 = TAU**2 * beta  # r/β with r = −|z−y|²/(2τ²) is the same as τ² → τ²β
    log_Z = float(jnp.sum(0.5 * jnp.log(2 * jnp.pi * tau2) + dist.Normal(MU0, math.sqrt(S0**2 + tau2)).log_prob(Y)))
    v = 1.0 / (1.0 / S0**2 + 1.0 / tau2)
    m = np.asarray(v * (MU0 / S0**2 + Y / tau2))
    return log_Z, m, v


def reward(z):
    return -0.5 * jnp.sum((z - Y) ** 2) / TAU**2


@gen
def g_model(mu0):
    return normal(mu0 * jnp.ones(D), S0) @ "z"


def n_model(mu0):
    return numpyro.sample("z", dist.Normal(mu0 * jnp.ones(D), S0).to_event(1))


@pytest.fixture(scope="module", params=["genjax", "numpyro"])
def conjugate(request):
    program = g_model if request.param == "genjax" else n_model
    return pplalign.tilt(program, reward, 1.0, args=(MU0,))


def test_tilt_dispatches_to_static(conjugate):
    assert isinstance(conjugate, static.StaticTilted)
    assert isinstance(conjugate.program, (static.GenJAXProgram, static.NumPyroProgram))


def test_is_matches_conjugate_truth(conjugate):
    n = 4000
    p = pplalign.importance_sampling(jax.random.key(0), conjugate, n)
    log_Z, m, v = conjugate_truth()
    w = np.asarray(p.normalized_weights)
    lw = np.asarray(p.log_weights)
    # Delta-method standard error of log Ẑ: sd(w)/(√N mean(w)).
    ratio = np.exp(lw - lw.max())
    se_log_Z = ratio.std() / (math.sqrt(n) * ratio.mean())
    assert abs(float(p.log_Z) - log_Z) < 5 * se_log_Z + 1e-3
    z = np.asarray(p.samples.retval)
    mean = (w[:, None] * z).sum(0)
    se_mean = np.sqrt((w[:, None] ** 2 * (z - mean) ** 2).sum(0))
    np.testing.assert_array_less(np.abs(mean - m), 5 * se_mean)
    var = (w[:, None] * (z - mean) ** 2).sum(0)
    np.testing.assert_allclose(var, v, rtol=0.2)
    assert p.samples.choices["z"].shape == (n, D)
    assert p.ess.shape == (1,) and p.ancestors.shape == (1, n) and int(p.nfe) == n


def test_is_unbiased_on_Z_scale():
    """mean over R independent runs of Ẑ/Z is 1 within 4 standard errors of that mean."""
    target = pplalign.tilt(n_model, reward, 1.0, args=(MU0,))
    log_Z, _, _ = conjugate_truth()
    runs = 400
    f = jax.jit(jax.vmap(lambda k: static._run_is(k, target, 16, None, None).log_Z))
    ratios = np.exp(np.asarray(f(jax.random.split(jax.random.key(1), runs))) - log_Z)
    se = ratios.std(ddof=1) / math.sqrt(runs)
    assert abs(ratios.mean() - 1.0) < 4 * se
    assert np.log(ratios).mean() < 0.05  # Jensen: E log Ẑ ≤ log Z (up to noise)


# --- constraints (observed values) ---------------------------------------------------------------------

OBS = 1.2


@gen
def g_obs():
    z = normal(0.0, 1.0) @ "z"
    normal(z, 0.5) @ "y"
    return z


def n_obs():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(z, 0.5))
    return z


def obs_reward(z):
    return -0.5 * z**2


@pytest.fixture(scope="module")
def obs_log_Z(observed_normal_posterior):
    """log ∫ N(z;0,1) N(OBS; z, 0.5) exp(−z²/2) dz."""
    return observed_normal_posterior(OBS, 0.5, obs_reward)[0]


@pytest.mark.parametrize("program", [g_obs, n_obs], ids=["genjax", "numpyro"])
def test_constraints_weight_by_likelihood(program, obs_log_Z):
    target = pplalign.tilt(program, obs_reward, 1.0, constraints={"y": jnp.asarray(OBS)})
    p = pplalign.importance_sampling(jax.random.key(2), target, 4000)
    assert abs(float(p.log_Z) - obs_log_Z) < 0.03  # 4000 draws, ESS ≈ 1500: se ≈ 0.01
    # the choices the samples carry include the observed value
    np.testing.assert_allclose(np.asarray(p.samples.choices["y"]), OBS)


def test_reward_on_choices(obs_log_Z):
    target = pplalign.tilt(g_obs, lambda c: -0.5 * c["z"] ** 2, 1.0, constraints={"y": jnp.asarray(OBS)}, reward_on="choices")
    p = pplalign.importance_sampling(jax.random.key(2), target, 4000)
    assert abs(float(p.log_Z) - obs_log_Z) < 0.03


def test_user_proposal_program():
    """A proposal centred near the posterior: weights p/q·e^{r/β}, same Z, larger ESS than the prior."""
    log_Z, m, _ = conjugate_truth()

    @gen
    def q(mu0):
        return normal(jnp.asarray(m), 0.8) @ "z"

    target = pplalign.tilt(g_model, reward, 1.0, args=(MU0,))
    p = pplalign.importance_sampling(jax.random.key(3), target, 4000, proposal=q)
    prior = pplalign.importance_sampling(jax.random.key(3), target, 4000)  # same compile as the fixture's
    assert abs(float(p.log_Z) - log_Z) < 0.02
    assert float(p.ess[0]) > float(prior.ess[0])

    def guide(mu0):
        numpyro.sample("z", dist.Normal(jnp.asarray(m), 0.8).to_event(1))

    nt = pplalign.tilt(n_model, reward, 1.0, args=(MU0,))
    pn = pplalign.importance_sampling(jax.random.key(3), nt, 4000, proposal=guide)
    assert abs(float(pn.log_Z) - log_Z) < 0.02


def test_constrained_support_numpyro_is_unconstrained():
    """A positive latent (LogNormal) is carried unconstrained; IS weights stay those of the prior."""

    def model():
        return numpyro.sample("s", dist.LogNormal(0.0, 0.5))

    target = pplalign.tilt(model, lambda s: -s, 1.0)
    p = pplalign.importance_sampling(jax.random.key(4), target, 4000)
    s = np.exp(np.random.default_rng(0).normal(0.0, 0.5, 400000))
    assert abs(float(p.log_Z) - math.log(np.mean(np.exp(-s)))) < 0.02
    assert float(jnp.min(p.samples.retval)) > 0


# --- bad input ---------------------------------------------------------------------------------------


def test_program_without_random_choices():
    @gen
    def deterministic(a):
        return a * 2.0

    with pytest.raises(ValueError, match="deterministic.*no random choices"):
        pplalign.tilt(deterministic, obs_reward, 1.0, args=(1.0,))

    def n_deterministic(a):
        return a * 2.0

    with pytest.raises(ValueError, match="n_deterministic.*no random choices"):
        pplalign.tilt(n_deterministic, obs_reward, 1.0, args=(1.0,))
    with pytest.raises(ValueError, match="no random choices left"):
        pplalign.tilt(n_obs, obs_reward, 1.0, constraints={"z": 0.0, "y": 1.0})


def test_reward_not_scalar():
    def vector_reward(z):
        return z  # shape (D,)

    for program in (g_model, n_model):
        with pytest.raises(ValueError, match=r"vector_reward.*scalar per sample.*\(2,\)"):
            pplalign.tilt(program, vector_reward, 1.0, args=(MU0,))


def test_unknown_constraint_address(obs_log_Z):
    with pytest.raises(ValueError, match="'w'.*g_obs"):
        pplalign.tilt(g_obs, obs_reward, 1.0, constraints={"w": 1.0})
    with pytest.raises(ValueError, match="'w'.*n_obs"):
        pplalign.tilt(n_obs, obs_reward, 1.0, constraints={"w": 1.0})

    @gen
    def outer():
        return g_obs() @ "inner"

    with pytest.raises(ValueError, match="inner/x"):
        pplalign.tilt(outer, obs_reward, 1.0, constraints={"inner": {"x": 1.0}})
    nested = pplalign.tilt(outer, obs_reward, 1.0, constraints={"inner": {"y": jnp.asarray(OBS)}})
    p = pplalign.importance_sampling(jax.random.key(2), nested, 4000)
    assert abs(float(p.log_Z) - obs_log_Z) < 0.03


def test_other_bad_input():
    with pytest.raises(ValueError, match="beta"):
        pplalign.tilt(g_model, reward, 0.0, args=(MU0,))
    with pytest.raises(ValueError, match="reward_on"):
        pplalign.tilt(g_model, reward, 1.0, args=(MU0,), reward_on="trace")
    with pytest.raises(ValueError, match="args must be a tuple"):
        pplalign.tilt(g_model, reward, 1.0, args=MU0)
    target = pplalign.tilt(g_model, reward, 1.0, args=(MU0,))
    with pytest.raises(ValueError, match="num_particles"):
        pplalign.importance_sampling(jax.random.key(0), target, 0)

    @gen
    def wrong_q(mu0):
        return normal(0.0, 1.0) @ "x"

    with pytest.raises(ValueError, match="wrong_q.*'z'"):
        pplalign.importance_sampling(jax.random.key(0), target, 10, proposal=wrong_q)


def test_nonfinite_reward_raises():
    target = pplalign.tilt(n_model, lambda z: jnp.where(z[0] > 0, jnp.nan, 0.0), 1.0, args=(MU0,))
    with pytest.raises(ValueError, match="NaN"):
        pplalign.importance_sampling(jax.random.key(0), target, 64)


def test_same_key_same_draws(conjugate):
    """The adapters derive every draw from the caller's key (reuses the fixture's compile)."""
    a = pplalign.importance_sampling(jax.random.key(7), conjugate, 4000)
    b = pplalign.importance_sampling(jax.random.key(7), conjugate, 4000)
    c = pplalign.importance_sampling(jax.random.key(8), conjugate, 4000)
    np.testing.assert_array_equal(np.asarray(a.samples.retval), np.asarray(b.samples.retval))
    assert not np.array_equal(np.asarray(a.samples.retval), np.asarray(c.samples.retval))
