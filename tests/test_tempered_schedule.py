"""The adaptive tempering schedule on asymmetric targets against its infinite-N closed form, waste-free moves
(unbiased Ẑ, kept chain states), step-size adaptation reaching its acceptance target, ESJD-driven moves, and
the bad inputs of issue 15.

Closed form. Prior z ~ N(μ0, s0² I) on R^D and log potential ℓ(z) = −½ Σ_d (z_d − y_d)²/τ_d² (a shifted,
anisotropic Gaussian likelihood: blackjax #914/#915 was a sign error in its ESS solver that symmetric tests
hid). Z(λ) = E_prior[e^{λℓ}] = Π_d (1 + λ s0²/τ_d²)^{-1/2} exp(−λ (y_d − μ0)² / (2(τ_d² + λ s0²))), so for
particles exactly from π_λ the incremental weights w = e^{δℓ} have moments E[w^k] = Z(λ + kδ)/Z(λ), and the
ESS fraction of N weights tends to

    ESS_∞(λ, δ)/N = E[w]² / E[w²] = Z(λ+δ)² / (Z(λ) Z(λ+2δ)).

The sampler sets the *empirical* fraction to the target, so ESS_∞ at its chosen δ misses the target by the
empirical fraction's sampling error, whose sd by the delta method on f = m1²/m2 (m_k the sample means of w^k)
is sd_f = √(g' Σ g / N), g = (2m1/m2, −m1²/m2²), Σ the covariance of (w, w²) — also closed form (E[w³], E[w⁴]).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import pplalign
from pplalign.tempered import run_tempered, tempered_smc

MU0, S0 = 0.5, 1.5
Y = np.array([2.5, -1.0, 0.8])
TAU = np.array([0.3, 1.0, 2.5])  # anisotropic: the likelihood is sharp in z_0, flat in z_2
D = len(Y)
ESS_TARGET = 0.8  # high, so that the path has enough stages to watch the step adaptation settle


def model():
    return numpyro.sample("z", dist.Normal(MU0 * jnp.ones(D), S0).to_event(1))


def log_potential(z):
    return -0.5 * jnp.sum((z - Y) ** 2 / TAU**2)


TARGET = pplalign.tilt(model, log_potential, 1.0)


def log_Z(lam):
    """log E_prior[e^{λℓ}] of the module docstring (λ ≥ 0)."""
    return float(np.sum(-0.5 * np.log1p(lam * S0**2 / TAU**2) - lam * (Y - MU0) ** 2 / (2 * (TAU**2 + lam * S0**2))))


def ess_limit(lam, delta):
    """(ESS_∞/N, sd of the empirical ESS fraction × √N) for particles from π_λ and increment δ."""
    m = [math.exp(log_Z(lam + k * delta) - log_Z(lam)) for k in range(5)]
    f = m[1] ** 2 / m[2]
    g = np.array([2 * m[1] / m[2], -(m[1] ** 2) / m[2] ** 2])
    cov = np.array([[m[2] - m[1] ** 2, m[3] - m[1] * m[2]], [m[3] - m[1] * m[2], m[4] - m[2] ** 2]])
    return f, math.sqrt(max(g @ cov @ g, 0.0))


def closed_form_schedule(target=ESS_TARGET):
    """The infinite-N λ path: each δ solves ESS_∞(λ, δ)/N = target (bisection; ESS_∞ falls with δ)."""
    lams = [0.0]
    while lams[-1] < 1.0:
        lam = lams[-1]
        if ess_limit(lam, 1.0 - lam)[0] >= target:
            lams.append(1.0)
            break
        lo, hi = 0.0, 1.0 - lam
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ess_limit(lam, mid)[0] >= target else (lo, mid)
        lams.append(lam + lo)
    return np.array(lams[1:])


def test_closed_form_is_asymmetric_and_consistent():
    """The derivation's own checks: ESS_∞(λ, 0) = 1, it falls with δ, and the path is not the symmetric one
    (with all τ_d equal the same total precision would give a different first step)."""
    assert ess_limit(0.2, 0.0)[0] == pytest.approx(1.0)
    assert ess_limit(0.0, 0.01)[0] > ess_limit(0.0, 0.05)[0] > ess_limit(0.0, 0.2)[0]
    sched = closed_form_schedule()
    assert 3 <= len(sched) <= 8 and sched[-1] == 1.0 and np.all(np.diff(sched) > 0)


# --- the sampler's schedule against the closed form ----------------------------------------------------

RUNS, N, STAGES = 8, 2048, 20
MAX_MOVES, BAD_STEP = 10, 3 * D**-0.25  # HMC started at 3× its optimal-scaling step: acceptance ≈ 0 at first


@pytest.fixture(scope="module")
def schedules():
    """RUNS runs of N particles, HMC from a bad step, 4 to MAX_MOVES moves per stage by the ESJD rule (so that
    once the step is adapted the cloud is close to π_λ): λ [R, STAGES], stages [R], empirical ESS fraction
    after each reweighting [R, STAGES], log Ẑ [R], acceptance, multipliers and moves [R, STAGES], nfe [R]."""

    def one(key):
        p, info = run_tempered(key, TARGET, N, ess_target=ESS_TARGET, mcmc="hmc", num_mcmc_steps=4,
                               max_mcmc_steps=MAX_MOVES, esjd_target=1.0, num_leapfrog=3, step_size=BAD_STEP,
                               max_stages=STAGES)
        return (info.lambdas, info.num_stages, p.ess / N, p.log_Z, info.acceptance, info.step_multiplier,
                info.num_moves, p.nfe)

    out = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(3), RUNS))
    return tuple(np.asarray(x) for x in out)


def test_first_increment_matches_closed_form(schedules):
    """Stage 1 reweights exact prior draws, so ESS_∞(0, λ_1) misses the target only by sampling error:
    within 4 sd_f/√N for every run (a sign error in the solver gives a wholly different λ_1)."""
    lambdas, _, ess = schedules[:3]
    for lam1 in lambdas[:, 0]:
        f, sd = ess_limit(0.0, float(lam1))
        assert abs(f - ESS_TARGET) < 4 * sd / math.sqrt(N), (lam1, f, sd)
    np.testing.assert_allclose(ess[:, 0], ESS_TARGET, atol=1e-3)  # the empirical rule holds its target


def test_later_increments_match_closed_form(schedules):
    """Every adaptive stage before the last: ESS_∞(λ_{k−1}, δ_k) within 4 sd_f/√N of the target, plus 0.05 for
    a cloud that the moves bring close to, not exactly to, π_{λ_{k−1}} (resampled duplicates; the first
    stage's moves, at the bad step, barely move)."""
    lambdas, stages = schedules[:2]
    for lam, k in zip(lambdas, stages):
        for prev, cur in zip(lam[: k - 2], lam[1 : k - 1]):
            f, sd = ess_limit(float(prev), float(cur - prev))
            assert abs(f - ESS_TARGET) < 4 * sd / math.sqrt(N) + 0.05, (prev, cur, f)


def test_stage_count_and_path_match_closed_form(schedules):
    """The number of stages is the infinite-N path's, ±1, and the mean λ_k of the shared stages lie within
    0.05 + 4 se of its λ*_k (se over the RUNS runs)."""
    lambdas, stages, _, log_z = schedules[:4]
    star = closed_form_schedule()
    assert np.all(np.abs(stages - len(star)) <= 1), (stages, star)
    shared = min(len(star), int(stages.min())) - 1  # the last stage of either may be the forced jump to 1
    mean, se = lambdas[:, :shared].mean(0), lambdas[:, :shared].std(0, ddof=1) / math.sqrt(RUNS)
    np.testing.assert_array_less(np.abs(mean - star[:shared]), 0.05 + 4 * se)
    # and the estimate is of the right Z: log Ẑ within 4 se + 0.02 of log Z(1)
    assert abs(log_z.mean() - log_Z(1.0)) < 4 * log_z.std(ddof=1) / math.sqrt(RUNS) + 0.02


# --- waste-free --------------------------------------------------------------------------------------

WF_RUNS, WF_N, WF_M = 64, 256, 16
WF_SCHEDULE = jnp.asarray([0.01, 0.03, 0.08, 0.2, 0.45, 1.0] + [1.0] * 2)


@pytest.fixture(scope="module")
def waste_free_runs():
    """WF_RUNS runs at a fixed schedule, waste-free with M = 16 chains of N/M − 1 = 15 RWMH moves:
    (log Ẑ [R], distinct final positions [R], particle means [R, D], nfe [R], moves [R, stages])."""

    def one(key):
        p, info = run_tempered(key, TARGET, WF_N, mcmc="rwmh", max_stages=len(WF_SCHEDULE),
                               schedule=WF_SCHEDULE, waste_free=WF_M)
        z = p.samples.retval
        distinct = jnp.sum(jnp.any(jnp.abs(z[:, None] - z[None]) > 0, axis=-1), axis=1)  # per particle
        return p.log_Z, jnp.sum(1.0 / (WF_N - distinct)), z.mean(0), p.nfe, info.num_moves

    out = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(21), WF_RUNS))
    return tuple(np.asarray(x) for x in out)


def test_waste_free_unbiased_on_Z_scale(waste_free_runs):
    """At a fixed schedule Ẑ is unbiased (Dau & Chopin 2022, Prop. 1): mean Ẑ/Z over 64 seeds within 4 of its
    standard errors of 1 (se = sd/√64; a false alarm under normality has probability < 1e-4)."""
    log_z = waste_free_runs[0]
    ratios = np.exp(log_z - log_Z(1.0))
    se = ratios.std(ddof=1) / math.sqrt(WF_RUNS)
    assert abs(ratios.mean() - 1.0) < 4 * se, (ratios.mean(), se)
    assert se < 0.1  # the test has power: Ẑ/Z is resolved to 10%


def test_waste_free_keeps_every_chain_state(waste_free_runs):
    """Every chain's states are kept: more than 2M distinct particles (≈ M·(1 + 15·acceptance), 44 to 100 here); a version that
    kept only the M resampled starts (or one state per chain) has at most M. NFE = 2N + stages·(N − M)."""
    _, distinct, means, nfe, moves = waste_free_runs
    assert np.all(distinct > 2 * WF_M), distinct.min()
    # the schedule reaches 1 at its 6th entry, so 6 stages of N − M new states each after the 2N initial NFE
    np.testing.assert_array_equal(nfe, 2 * WF_N + 6 * (WF_N - WF_M))
    np.testing.assert_array_equal(moves[:, :6], WF_N // WF_M - 1)
    post_var = 1.0 / (1.0 / S0**2 + 1.0 / TAU**2)
    post_mean = post_var * (MU0 / S0**2 + Y / TAU**2)
    se = means.std(0, ddof=1) / math.sqrt(WF_RUNS)
    np.testing.assert_array_less(np.abs(means.mean(0) - post_mean), 4 * se + 0.02)


# --- step-size adaptation and ESJD-driven moves --------------------------------------------------------


def test_step_adaptation_reaches_acceptance_target(schedules):
    """From a step 3× the optimal-scaling one (acceptance < 0.05 at stage 1: the leapfrog is unstable), the
    multiplier c falls at once and every stage after the second accepts within 0.3 of the target 0.65, their
    mean within 0.15. Each stage's acceptance averages ≥ 4·N = 8192 accept/reject draws (binomial sd ≤
    0.006); the rest is the adaptation's scatter, ≈ 0.1–0.15 per stage here (one update per stage at gain
    γ = 2, chasing a geometry that changes with λ and a cloud whose spread is under-estimated after the
    failed first stage), so the mean of the ≥ 2 late stages has sd ≈ 0.08–0.1: 0.15 is about 2 of them.
    Without adaptation the acceptance would stay < 0.05 at every stage."""
    _, stages, _, _, acc, mult, _, _ = schedules
    for a, m, k in zip(acc, mult, stages):
        assert a[0] < 0.05 and m[1] < 0.5 * m[0], (a, m)
        late = a[2:k]
        assert len(late) >= 2, k
        np.testing.assert_array_less(np.abs(late - 0.65), 0.3, err_msg=str((a[:k], m[:k], schedules[0][0][:k], schedules[6][0][:k], k)))
        assert abs(late.mean() - 0.65) < 0.15, late


def test_esjd_rule_sets_the_number_of_moves(schedules):
    """The ESJD rule: MAX_MOVES while the bad step accepts almost nothing (the population does not travel),
    fewer once it is adapted, never fewer than 4; NFE = 2N + N·3·Σ moves (3 leapfrog steps per HMC move)."""
    _, stages, _, _, _, _, moves, nfe = schedules
    for m, k, f in zip(moves, stages, nfe):
        m = m[:k]
        assert m[0] == MAX_MOVES and np.all(m >= 4) and np.all(m <= MAX_MOVES) and m[2:].min() < MAX_MOVES, m
        assert f == 2 * N + N * 3 * m.sum()


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs():
    key = jax.random.key(0)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="step_size"):
            tempered_smc(key, TARGET, 64, step_size=bad)
    with pytest.raises(ValueError, match="waste_free M must divide"):
        tempered_smc(key, TARGET, 64, waste_free=5)
    with pytest.raises(ValueError, match="waste_free M must divide"):
        tempered_smc(key, TARGET, 64, waste_free=64)
    with pytest.raises(ValueError, match="max_mcmc_steps"):
        tempered_smc(key, TARGET, 64, num_mcmc_steps=3, max_mcmc_steps=2)
    with pytest.raises(ValueError, match="esjd_target"):
        tempered_smc(key, TARGET, 64, esjd_target=0.0)
    with pytest.raises(ValueError, match="target_acceptance"):
        tempered_smc(key, TARGET, 64, target_acceptance=1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        tempered_smc(key, TARGET, 64, step=0.1)


def test_nan_log_density_at_initial_particles_names_the_site():
    def broken():
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        return numpyro.sample("x", dist.Normal(0.0, jnp.sqrt(s - 10.0)))  # scale NaN for every s < 10

    target = pplalign.tilt(broken, lambda x: -x * x, 1.0)
    with pytest.raises(ValueError, match=r"NaN at 8 of 8 initial particles.*\['x'\]"):
        tempered_smc(jax.random.key(0), target, 8, num_mcmc_steps=0, max_stages=1)
