"""Training twists on the exact Markov testbed: the losses decrease, the learned twist's proposal gets closer
to σ (exact KL, i.e. the one-particle bounds tighten), and an interrupted run resumes exactly."""

import jax
import numpy as np
import pytest

import pplalign
from models import markov_twists
from models.markov_lm import random_markov_lm
from pplalign import evaluation, twists

STEPS = 60


@pytest.fixture(scope="module")
def setup():
    lm = random_markov_lm(jax.random.PRNGKey(0), 4, 6)
    reward, beta = markov_twists.count_reward(lm), 1.0
    target = pplalign.tilt(lm, reward, beta)
    log_sigma = jax.nn.log_softmax(lm.log_target(reward, beta))
    sample_sigma = lambda k, n: lm.sample_posterior(k, n, reward, beta)
    init = markov_twists.mlp_twist(jax.random.PRNGKey(1), lm, hidden=32)
    return dict(lm=lm, target=target, log_sigma=log_sigma, sample_sigma=sample_sigma, init=init)


@pytest.fixture(scope="module")
def trained(setup):
    out = {}
    # DPG (no sampler inside its step: the cheapest compile); the quick experiment's test checks all four
    # methods' losses and KLs on the same testbed (tests/test_twists_experiment.py)
    for method in ("dpg",):
        loss_fn = twists.make_loss_fn(method, setup["target"], setup["sample_sigma"], batch_size=32, num_negatives=32)
        twist, history = twists.fit(loss_fn, setup["init"], jax.random.PRNGKey(2), STEPS, progress=False)
        out[method] = (loss_fn, twist, history)
    return out


@pytest.mark.parametrize("method", ["dpg"])
def test_loss_decreases_and_proposal_approaches_sigma(setup, trained, method):
    _, twist, history = trained[method]
    assert history.shape == (STEPS,) and np.all(np.isfinite(history))
    # 10-step means; measured drops are several nats, batch-to-batch noise ≈ 0.6 nat (s.e. of a mean ≈ 0.2)
    assert history[-10:].mean() < history[:10].mean() - 0.5
    seqs = setup["lm"].all_sequences()
    before = evaluation.exact_kl(setup["target"], setup["init"], seqs, setup["log_sigma"])
    after = evaluation.exact_kl(setup["target"], twist, seqs, setup["log_sigma"])
    # KL(σ‖q) = E[upper_1] − log Z and KL(q‖σ) = log Z − E[lower_1]: the one-particle bounds tighten
    assert after["kl_sigma_q"] < 0.25 * before["kl_sigma_q"]
    assert after["kl_q_sigma"] < 0.25 * before["kl_q_sigma"]


def test_resume_continues_exactly(setup, trained, tmp_path):
    loss_fn, _, _ = trained["dpg"]  # the same loss_fn and optimiser reuse the compiled step
    ckpt = str(tmp_path / "twist.npz")
    full, hist_full = twists.fit(loss_fn, setup["init"], jax.random.PRNGKey(2), 30, progress=False)
    twists.fit(loss_fn, setup["init"], jax.random.PRNGKey(2), 20, checkpoint=ckpt, checkpoint_every=10, progress=False)
    resumed, hist = twists.fit(loss_fn, setup["init"], jax.random.PRNGKey(2), 30, checkpoint=ckpt, progress=False)
    np.testing.assert_allclose(hist, hist_full, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    small = markov_twists.mlp_twist(jax.random.PRNGKey(1), setup["lm"], hidden=8)
    with pytest.raises(ValueError, match="shape"):
        twists.fit(loss_fn, small, jax.random.PRNGKey(2), 31, checkpoint=ckpt, progress=False)
