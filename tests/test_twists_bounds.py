"""Evaluation of twists on the exact Markov testbed: the SMC lower and CSMC upper bounds sandwich the exact
log Z, collapse onto it for the exact twist, and the one-particle KL estimates agree with enumeration."""

import jax
import numpy as np
import pytest

import pplalign
from models import markov_twists
from models.markov_lm import ExactTwist, random_markov_lm
from pplalign import evaluation

SEEDS = 40


@pytest.fixture(scope="module")
def bed():
    lm = random_markov_lm(jax.random.PRNGKey(0), 4, 6)
    reward, beta = markov_twists.count_reward(lm), 1.0
    target = pplalign.tilt(lm, reward, beta)
    exact = lm.optimal_twist(reward, beta)
    noisy = ExactTwist(exact.table + 0.5 * jax.random.normal(jax.random.PRNGKey(3), exact.table.shape), exact.offsets, exact.vocab_size)
    refs = lm.sample_posterior(jax.random.PRNGKey(4), 200, reward, beta)
    log_sigma = jax.nn.log_softmax(lm.log_target(reward, beta))
    return dict(lm=lm, target=target, exact=exact, noisy=noisy, refs=refs, log_Z=float(lm.log_Z(reward, beta)), log_sigma=log_sigma)


def test_exact_twist_gives_log_Z_at_every_seed(bed):
    b = evaluation.log_z_bounds(jax.random.PRNGKey(0), bed["target"], bed["exact"], 4, bed["refs"], num_seeds=5)
    np.testing.assert_allclose(b["lower_runs"], bed["log_Z"], atol=1e-4)
    np.testing.assert_allclose(b["upper_runs"], bed["log_Z"], atol=1e-4)
    assert b["ess"] > 0.999


@pytest.mark.parametrize("twist", [None, "noisy"])
def test_bounds_sandwich_log_Z(bed, twist):
    tw = None if twist is None else bed[twist]
    b = evaluation.log_z_bounds(jax.random.PRNGKey(1), bed["target"], tw, 4, bed["refs"], num_seeds=SEEDS)
    # E[lower] ≤ log Z ≤ E[upper]; 3 standard errors over 40 seeds for the sampling noise of the means
    assert b["lower"] - 3 * b["lower_se"] <= bed["log_Z"] <= b["upper"] + 3 * b["upper_se"]
    assert b["lower"] < b["upper"]
    if twist is None:  # the bootstrap gap is real, not noise
        assert b["upper"] - b["lower"] > 0.2


def test_noisy_twist_bounds_are_tighter_than_bootstrap(bed):
    gap, var = {}, {}
    for name, tw in (("bootstrap", None), ("noisy", bed["noisy"])):
        b = evaluation.log_z_bounds(jax.random.PRNGKey(1), bed["target"], tw, 4, bed["refs"], num_seeds=SEEDS)
        gap[name] = b["upper"] - b["lower"]
        var[name] = b["upper_se"] ** 2 + b["lower_se"] ** 2
    # each gap is a difference of two means over SEEDS runs; the margin is 3 standard errors of the difference
    # of the two gaps (treating the four means as independent, which over-states the se of a difference of
    # runs sharing their keys)
    margin = 3 * np.sqrt(var["bootstrap"] + var["noisy"])
    assert gap["noisy"] + margin < gap["bootstrap"], (gap, margin)


def test_one_particle_kl_estimates_match_enumeration(bed):
    tg, tw = bed["target"], bed["noisy"]
    exact = evaluation.exact_kl(tg, tw, bed["lm"].all_sequences(), bed["log_sigma"])
    mc = evaluation.kl_estimates(jax.random.PRNGKey(2), tg, tw, bed["refs"], bed["log_Z"])
    # 200 one-particle weights each: within 4 standard errors of the exact value
    assert abs(mc["kl_sigma_q"] - exact["kl_sigma_q"]) < 4 * mc["kl_sigma_q_se"] + 1e-3
    assert abs(mc["kl_q_sigma"] - exact["kl_q_sigma"]) < 4 * mc["kl_q_sigma_se"] + 1e-3
    assert mc["kl_sigma_q_se"] < 0.5 and mc["kl_q_sigma_se"] < 0.5  # the check has power
    assert exact["kl_sigma_q"] > 0 and exact["kl_q_sigma"] > 0


def test_bad_inputs(bed):
    with pytest.raises(ValueError, match="σ samples"):
        evaluation.log_z_bounds(jax.random.PRNGKey(0), bed["target"], None, 4, bed["refs"][:2], num_seeds=5)
    with pytest.raises(ValueError, match="whole support"):
        evaluation.exact_kl(bed["target"], None, bed["lm"].all_sequences()[:10], bed["log_sigma"][:10])
