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
    assert large < 0.2


def test_twisted_smc_samples_follow_exact_law(exact):
    lm = exact["lm"]
    p = pplalign.smc(jax.random.PRNGKey(11), exact["target"], 8192, twist=exact["twist"])
    pmf = empirical_pmf(lm.codes(p.samples), lm.num_sequences, p.log_weights)
    # with N draws over K=1024 cells, E[TV] ≈ 0.5 Σ sqrt(2 p (1-p) / (π N)); allow 1.5x that
    post = exact["posterior"]
    expected = 0.5 * np.sum(np.sqrt(2 * post * (1 - post) / (np.pi * 8192)))
    assert float(tv_distance(pmf, post)) < 1.5 * expected


def test_adaptive_resampling_carries_weights(exact):
    # threshold 0.5: steps without resampling must keep accumulating weights. Check unbiasedness
    # (done above) and that a run that never resamples equals importance sampling bit for bit.
    key = jax.random.PRNGKey(5)
    never = pplalign.smc(key, exact["target"], 64, ess_threshold=0.0)
    is_ = pplalign.importance_sampling(key, exact["target"], 64)
    np.testing.assert_array_equal(np.asarray(never.log_weights), np.asarray(is_.log_weights))
    # IS weights are the full path weights r/β (prior proposal)
    r = jax.vmap(exact["reward"])(is_.samples)
    np.testing.assert_allclose(np.asarray(is_.log_weights), np.asarray(r), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(is_.ancestors) == np.arange(64))


def test_smc_step_keeps_weights_when_not_resampling(exact):
    smc_lib = importlib.import_module("pplalign.smc")

    target = exact["target"]
    state = smc_lib.init(jax.random.PRNGKey(0), target, 8)
    state = state._replace(log_weights=jnp.linspace(-1.0, 0.0, 8))
    new, info = smc_lib.step(jax.random.PRNGKey(1), state, jnp.asarray(0), target, twist=exact["twist"], ess_threshold=0.0)
    # with the exact twist, the increment is the same for every particle: weights shift, never reset
    inc = np.asarray(new.log_weights) - np.linspace(-1.0, 0.0, 8)
    np.testing.assert_allclose(inc, inc[0], atol=1e-5)
    assert np.all(np.asarray(info.ancestors) == np.arange(8))


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
    assert float(tv_distance(pmf, exact["posterior"])) < 0.2


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
    refs = lm.sample_posterior(jax.random.PRNGKey(4), 100, reward, 1.0)
    keys = jax.random.split(jax.random.PRNGKey(5), 100)
    run = jax.jit(jax.vmap(lambda k, r: pplalign.csmc(k, exact["target"], 8, r)))
    out = run(keys, refs)
    np.testing.assert_array_equal(np.asarray(out.samples[:, 0]), np.asarray(refs))
    upper = float(np.mean(np.asarray(out.log_Z)))
    lower = float(np.mean(np.asarray(_many(lambda k: pplalign.smc(k, exact["target"], 8).log_Z, seeds=100))))
    assert lower < exact["log_Z"] < upper
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
