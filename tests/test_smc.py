"""SMC, twisted SMC, IS, best-of-N and CSMC against the exact Markov-LM testbed (enumeration)."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from pplalign.metrics import empirical_pmf, tv_distance

SEEDS = 200
CSMC_SEEDS = 200


@pytest.fixture(scope="module")
def exact(markov):
    lm, reward, beta = markov
    target = pplalign.tilt(lm, reward, beta)
    return dict(
        lm=lm,
        reward=reward,
        target=target,
        log_Z=float(lm.log_Z(reward, beta)),
        posterior=np.asarray(lm.posterior(reward, beta)),
        twist=lm.optimal_twist(reward, beta),
    )


def _many(fn, seeds=SEEDS, base=0):
    keys = jax.random.split(jax.random.PRNGKey(base), seeds)
    return jax.jit(jax.vmap(fn))(keys)


class CallableTwist:
    """The exact twist without its all-candidates form: SMC must score each candidate itself."""

    def __init__(self, twist):
        self.twist = twist

    def __call__(self, state, t):
        return self.twist(state, t)


@pytest.mark.parametrize("resampler", ["systematic", "multinomial", "stratified", "residual"])
def test_exact_twist_gives_exact_log_Z(exact, resampler):
    result = pplalign.smc(
        jax.random.PRNGKey(7),
        exact["target"],
        16,
        twist=exact["twist"],
        resampling=getattr(pplalign, resampler),
        ess_threshold=1.0,
    )
    assert abs(float(result.log_Z) - exact["log_Z"]) < 1e-4
    # every incremental weight is the same constant, so the ESS stays N
    np.testing.assert_allclose(np.asarray(result.ess), 16.0, rtol=1e-4)


def test_exact_twist_gives_exact_log_Z_at_every_seed(exact):
    many = _many(lambda k: pplalign.smc(k, exact["target"], 16, twist=exact["twist"]).log_Z, seeds=64)
    np.testing.assert_allclose(np.asarray(many), exact["log_Z"], atol=1e-4)


def test_callable_twist_scores_candidates_like_the_vectorised_form(exact):
    key = jax.random.PRNGKey(3)
    a = pplalign.smc(key, exact["target"], 16, twist=exact["twist"])
    b = pplalign.smc(key, exact["target"], 16, twist=CallableTwist(exact["twist"]))
    assert abs(float(b.log_Z) - exact["log_Z"]) < 1e-4
    np.testing.assert_array_equal(np.asarray(a.samples), np.asarray(b.samples))


@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.0])
def test_bootstrap_Z_hat_is_unbiased(exact, threshold):
    log_Z = _many(lambda k: pplalign.smc(k, exact["target"], 8, ess_threshold=threshold).log_Z)
    ratio = np.exp(np.asarray(log_Z, np.float64) - exact["log_Z"])
    se = ratio.std(ddof=1) / math.sqrt(SEEDS)
    assert abs(ratio.mean() - 1.0) < 4 * se + 1e-3, (ratio.mean(), se)
    # Jensen: the mean of log Z-hat is a lower bound
    assert np.mean(np.asarray(log_Z)) < exact["log_Z"]


def test_weighted_samples_converge_to_exact_law(exact):
    lm = exact["lm"]

    def tv_at(n, seed):
        p = pplalign.smc(jax.random.PRNGKey(seed), exact["target"], n)
        pmf = empirical_pmf(lm.codes(p.samples), lm.num_sequences, p.log_weights)
        return float(tv_distance(pmf, exact["posterior"]))

    small = np.mean([tv_at(128, s) for s in range(3)])
    large = np.mean([tv_at(8192, s) for s in range(3)])
    assert large < 0.6 * small, (small, large)
    # Tolerance from the sample size: n i.i.d. draws give E|p̂_k − p_k| ≈ sqrt(2 p_k(1 − p_k)/(π n)) (half-normal),
    # so E[TV] ≈ ½ Σ_k sqrt(2 p_k(1 − p_k)/(π n)). Bootstrap SMC's final weights are r/β of N = 8192 resampled
    # particles, Kish ESS ≈ 2900 (measured); taking n = 2500 < ESS over-states the noise (measured TV ≈ 0.07
    # against 0.125 here). A sampler aimed at β = 1.5 instead of 1 sits at TV ≥ 0.14 from σ even with
    # infinitely many particles (checked below), so it fails this bound.
    post = exact["posterior"]
    bound = 0.5 * np.sum(np.sqrt(2 * post * (1 - post) / (np.pi * 2500)))
    assert large < bound, (large, bound)
    wrong_beta = np.asarray(lm.posterior(exact["reward"], 1.5))
    assert float(tv_distance(wrong_beta, post)) > bound


def test_twisted_smc_samples_follow_exact_law(exact):
    lm = exact["lm"]
    p = pplalign.smc(jax.random.PRNGKey(11), exact["target"], 8192, twist=exact["twist"])
    pmf = empirical_pmf(lm.codes(p.samples), lm.num_sequences, p.log_weights)
    # with N draws over K=1024 cells, E[TV] ≈ 0.5 Σ sqrt(2 p (1-p) / (π N)); allow 1.5x that
    post = exact["posterior"]
    expected = 0.5 * np.sum(np.sqrt(2 * post * (1 - post) / (np.pi * 8192)))
    assert float(tv_distance(pmf, post)) < 1.5 * expected


def test_importance_sampling_is_smc_without_resampling(exact):
    # IS weights are the full path weights r/β (prior proposal) and no particle is ever moved
    key = jax.random.PRNGKey(5)
    is_ = pplalign.importance_sampling(key, exact["target"], 64)
    r = jax.vmap(exact["reward"])(is_.samples)
    np.testing.assert_allclose(np.asarray(is_.log_weights), np.asarray(r), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(is_.ancestors) == np.arange(64))


ADAPTIVE_SEEDS = 512


@pytest.fixture(scope="module")
def noisy_twist(exact):
    """The exact twist plus N(0, 0.7²) noise on every table entry (all steps, the last included): the weights
    vary at every step after the first, so adaptive resampling has weights to carry and the last step's
    correction exp(r/β)/ψ_{T-1} is not 1."""
    tw = exact["twist"]
    noise = 0.7 * jax.random.normal(jax.random.PRNGKey(21), tw.table.shape)
    return type(tw)(tw.table + noise, tw.offsets, tw.vocab_size)


@pytest.fixture(scope="module")
def adaptive_runs(exact, noisy_twist):
    """ADAPTIVE_SEEDS independent runs (N = 8, ESS threshold 0.5) of twisted SMC with the noisy twist, with the
    locally optimal proposal and with p₀ proposals (optimal_proposal=False), and of the latter with the exact
    twist; each configuration compiled once, on first use."""
    target = exact["target"]
    configs = {
        "optimal": dict(twist=noisy_twist),
        "p0": dict(twist=noisy_twist, optimal_proposal=False),
        "p0_exact": dict(twist=exact["twist"], optimal_proposal=False),
    }
    cache = {}

    def get(name):
        if name not in cache:
            run = lambda key: pplalign.smc(key, target, 8, ess_threshold=0.5, **configs[name])
            p = _many(run, seeds=ADAPTIVE_SEEDS, base=17)
            cache[name] = tuple(np.asarray(v) for v in (p.log_Z, p.ancestors, p.ess))
        return cache[name]

    return get


def _z_ratio_z_score(log_Z, exact_log_Z):
    """(mean of Ẑ/Z − 1) in standard errors over independent runs: Ẑ is unbiased, so by the CLT this is ≈ N(0, 1)."""
    ratio = np.exp(np.asarray(log_Z, np.float64) - exact_log_Z)
    return (ratio.mean() - 1.0) / (ratio.std(ddof=1) / math.sqrt(ratio.size))


@pytest.mark.parametrize("proposal", ["optimal", "p0", "p0_exact"])
def test_adaptive_twisted_smc_carries_weights_and_is_unbiased(exact, adaptive_runs, proposal):
    """Adaptive resampling with weights that are not zero before the last step: runs where some steps resample
    and some do not. Steps that keep their particles must add the carried weights into the next increment;
    dropping them, or forgetting ψ_{t−1}, biases Ẑ (E[Ẑ] = Z only with the telescoping weights)."""
    log_Z, ancestors, ess = adaptive_runs(proposal)
    moved = np.any(ancestors[:, :-1] != np.arange(8), axis=-1)  # [runs, T-1]: did step t resample
    # the test reaches both branches: in a sizeable share of the runs some step resamples and another does not
    assert np.mean(moved.any(1) & (~moved).any(1)) > 0.05, moved.mean(0)
    # and the weights are not uniform before the last step (ESS < N somewhere in steps 1..T-2)
    assert np.mean(ess[:, 1:-1] < 8 - 1e-3) > 0.5
    # E[Ẑ/Z] = 1: |z| < 4 (a false alarm has probability 6e-5 under the CLT)
    z = _z_ratio_z_score(log_Z, exact["log_Z"])
    assert abs(z) < 4, z


def test_optimal_proposal_flag_selects_the_proposal(exact, adaptive_runs):
    """With the exact twist, the locally optimal proposal makes every weight equal (ESS = N at every step,
    tested above); optimal_proposal=False proposes from p₀ and weights by ψ_t/ψ_{t−1}, which varies."""
    _, _, ess = adaptive_runs("p0_exact")
    assert np.mean(ess.min(axis=1) < 7.0) > 0.5, ess.min(axis=1)


def test_smc_step_carries_weights_when_not_resampling_and_resets_when_resampling(exact):
    smc_lib = importlib.import_module("pplalign.smc")

    target = exact["target"]
    state = smc_lib.init(jax.random.PRNGKey(0), target, 8)

    def one_step(prior):
        return smc_lib.step(
            jax.random.PRNGKey(1), state._replace(log_weights=prior), jnp.asarray(0), target, twist=exact["twist"], ess_threshold=0.5
        )

    # ESS of these weights ≈ 7.7 > 0.5·8: the step does not resample (the branch that keeps particles). With
    # the exact twist the step-0 increment is log Σ p₀ ψ*_0 = log Z for every particle: weights shift, never reset
    spread = jnp.linspace(-1.0, 0.0, 8)
    new, info = one_step(spread)
    assert np.all(np.asarray(info.ancestors) == np.arange(8)) and float(new.log_Z) == 0.0
    np.testing.assert_allclose(np.asarray(new.log_weights) - np.asarray(spread), exact["log_Z"], atol=1e-5)
    # one particle holds nearly all the weight (ESS ≈ 1): the step resamples, every copy is of particle 0, the
    # weights reset to zero and log Ẑ gains log-mean-exp of the carried weights
    peaked = jnp.asarray([0.0] + [-30.0] * 7)
    new, info = one_step(peaked)
    assert np.all(np.asarray(info.ancestors) == 0)
    np.testing.assert_allclose(np.asarray(new.log_weights), 0.0)
    want = exact["log_Z"] + float(jax.nn.logsumexp(peaked)) - math.log(8)
    np.testing.assert_allclose(float(new.log_Z), want, atol=1e-5)


def test_same_key_same_result_and_nfe(exact):
    a = pplalign.smc(jax.random.PRNGKey(1), exact["target"], 32)
    b = pplalign.smc(jax.random.PRNGKey(1), exact["target"], 32)
    c = pplalign.smc(jax.random.PRNGKey(2), exact["target"], 32)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.samples), np.asarray(c.samples))
    assert int(a.nfe) == 32 * exact["lm"].num_steps
    assert a.ess.shape == (exact["lm"].num_steps,) and a.ancestors.shape == (exact["lm"].num_steps, 32)


def test_user_proposal_is_importance_corrected(exact):
    import numpyro.distributions as dist

    uniform = lambda state, t: dist.CategoricalLogits(jnp.zeros(4))
    log_Z = _many(lambda k: pplalign.importance_sampling(k, exact["target"], 64, proposal=uniform).log_Z, seeds=100)
    ratio = np.exp(np.asarray(log_Z, np.float64) - exact["log_Z"])
    se = ratio.std(ddof=1) / 10
    assert abs(ratio.mean() - 1) < 4 * se + 1e-3
    p = pplalign.smc(jax.random.PRNGKey(0), exact["target"], 8192, proposal=uniform)
    pmf = empirical_pmf(exact["lm"].codes(p.samples), exact["lm"].num_sequences, p.log_weights)
    # E[TV] of n i.i.d. draws ≈ ½ Σ_k sqrt(2 p_k(1 − p_k)/(π n)) (see above), at n = the Kish ESS of the final
    # weights (≈ 1450 here: measured TV ≈ 0.11 against a bound ≈ 0.165). Without the p₀/q correction the
    # particles would follow q·exp(r/β) ∝ exp(r/β) (q uniform), which is further from σ than the bound.
    post = exact["posterior"]
    w = np.exp(np.asarray(p.log_weights, np.float64) - float(np.max(p.log_weights)))
    bound = 0.5 * np.sum(np.sqrt(2 * post * (1 - post) / (np.pi * w.sum() ** 2 / np.sum(w**2))))
    assert float(tv_distance(pmf, post)) < bound, bound
    uncorrected = jax.nn.softmax(exact["reward"].values / 1.0)
    assert float(tv_distance(uncorrected, post)) > bound


def test_best_of_n_picks_highest_reward_among_the_same_draws(exact):
    key = jax.random.PRNGKey(9)
    best = pplalign.best_of_n(key, exact["target"], 50)
    draws = pplalign.importance_sampling(key, exact["target"], 50)
    rewards = np.asarray(jax.vmap(exact["reward"])(draws.samples))
    assert best.samples.shape == (1, exact["lm"].num_steps)
    assert float(exact["reward"](best.samples[0])) == pytest.approx(rewards.max())
    assert int(best.nfe) == 50 * exact["lm"].num_steps
    assert float(best.log_Z) == pytest.approx(float(draws.log_Z))


def test_csmc_pins_reference_and_bounds_log_Z(exact):
    lm, reward = exact["lm"], exact["reward"]
    refs = lm.sample_posterior(jax.random.PRNGKey(4), CSMC_SEEDS, reward, 1.0)
    keys = jax.random.split(jax.random.PRNGKey(5), CSMC_SEEDS)
    run = jax.jit(jax.vmap(lambda k, r: pplalign.csmc(k, exact["target"], 8, r)))
    out = run(keys, refs)
    np.testing.assert_array_equal(np.asarray(out.samples[:, 0]), np.asarray(refs))
    ups = np.asarray(out.log_Z, np.float64)
    lows = np.asarray(_many(lambda k: pplalign.smc(k, exact["target"], 8).log_Z, seeds=CSMC_SEEDS), np.float64)
    se = lambda v: v.std(ddof=1) / math.sqrt(v.size)
    upper, lower = ups.mean(), lows.mean()
    # E[lower] ≤ log Z ≤ E[upper], each mean within 3 standard errors of its side (CLT over independent runs)
    assert lower - 3 * se(lows) <= exact["log_Z"] <= upper + 3 * se(ups), (lower, exact["log_Z"], upper)
    # and the bracket is real at N = 8 (measured gap ≈ 0.23 nats ≈ 5 standard errors of the difference): an
    # unconditional SMC in place of CSMC (E[upper] = E[lower]) fails this
    assert upper - lower > 3 * math.hypot(se(ups), se(lows)), (upper - lower, se(ups), se(lows))
    # one particle: CSMC log Z-hat is the reference's own log-weight r/β, so its mean - log Z = KL(σ‖p0)
    one = jax.jit(jax.vmap(lambda k, r: pplalign.csmc(k, exact["target"], 1, r)))(keys, refs)
    np.testing.assert_allclose(np.asarray(one.log_Z), np.asarray(jax.vmap(reward)(refs)), atol=1e-5)


def test_csmc_with_exact_twist_is_exact(exact):
    ref = exact["lm"].sample_posterior(jax.random.PRNGKey(8), 1, exact["reward"], 1.0)[0]
    out = pplalign.csmc(jax.random.PRNGKey(0), exact["target"], 8, ref, twist=exact["twist"])
    assert abs(float(out.log_Z) - exact["log_Z"]) < 1e-4


def test_targets_batch_over_beta_under_vmap(exact):
    lm, reward = exact["lm"], exact["reward"]
    betas = jnp.asarray([0.5, 1.0, 2.0])

    def run(beta):
        target = pplalign.tilt(lm, reward, beta)
        return pplalign.smc(jax.random.PRNGKey(0), target, 8, twist=lm.optimal_twist(reward, beta)).log_Z

    got = jax.jit(jax.vmap(run))(betas)
    want = jnp.stack([lm.log_Z(reward, b) for b in betas])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
