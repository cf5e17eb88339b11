"""Inputs that used to give a finite, wrong answer with no flag (issue 12): each must now raise a
``ValueError`` naming what is wrong, or be reported in the result.

* a DTS tree resumed under another β, variant, reward, program or twist (in memory and from a checkpoint);
* a traced β (under the caller's ``vmap``/``jit``) that is ≤ 0, non-finite, or too small for float32;
* a conditional-SMC reference outside a step's support, or of the wrong dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.markov_lm import MarkovLM, TableReward
from pplalign import search
from pplalign.search import DTSConfig

ITERS = 20


@pytest.fixture(scope="module")
def target(markov):
    lm, reward, beta = markov
    return pplalign.tilt(lm, reward, beta)


@pytest.fixture(scope="module")
def grown(target):
    """A tree grown at β = 1 by the published variant, and its key."""
    key = jax.random.PRNGKey(3)
    _, tree = pplalign.dts(key, target, ITERS, capacity=search.nodes_needed(target.num_steps, 2 * ITERS))
    return key, tree


# --------------------------------------------------------------------------------------------------
# DTS resume with another setup
# --------------------------------------------------------------------------------------------------


def test_dts_resume_with_the_same_setup_is_accepted(target, grown):
    key, tree = grown
    _, resumed = pplalign.dts(key, target, ITERS, tree=tree)
    assert int(resumed.iteration) == 2 * ITERS


def test_dts_resume_under_another_beta_is_refused(markov, grown):
    """A tree grown at β = 1 and grown on at β = 0.1 reported the β = 0.1 log Ẑ of a β = 1 tree."""
    lm, reward, _ = markov
    key, tree = grown
    with pytest.raises(ValueError, match="beta"):
        pplalign.dts(key, pplalign.tilt(lm, reward, 0.1), ITERS, tree=tree)


def test_dts_resume_with_another_variant_is_refused(target, grown):
    key, tree = grown
    with pytest.raises(ValueError, match="config"):
        pplalign.dts(key, target, ITERS, tree=tree, variant="consistent")


def test_dts_resume_with_other_reward_weights_is_refused(markov, grown):
    lm, reward, beta = markov
    key, tree = grown
    other = TableReward(reward.values + 1.0, reward.vocab_size)
    with pytest.raises(ValueError, match="reward"):
        pplalign.dts(key, pplalign.tilt(lm, other, beta), ITERS, tree=tree)


def test_dts_resume_with_other_program_weights_is_refused(markov, grown):
    lm, reward, beta = markov
    key, tree = grown
    other = MarkovLM(lm.log_init[::-1], lm.log_trans, lm.num_steps)
    with pytest.raises(ValueError, match="program"):
        pplalign.dts(key, pplalign.tilt(other, reward, beta), ITERS, tree=tree)


def test_dts_resume_with_another_twist_is_refused(target):
    key = jax.random.PRNGKey(4)
    cap = search.nodes_needed(target.num_steps, 2 * ITERS)
    zero = search.CalibratedTwist(lambda s, t: jnp.zeros(()), jnp.zeros(6), jnp.zeros(6), jnp.asarray(0))
    _, tree = pplalign.dts(key, target, ITERS, capacity=cap, variant="consistent", twist=zero)
    other = zero.__class__(zero.twist, jnp.ones(6), zero.log_means, zero.pilot_nfe)
    with pytest.raises(ValueError, match="twist"):
        pplalign.dts(key, target, ITERS, tree=tree, variant="consistent", twist=other)


def test_load_tree_with_other_reward_weights_is_refused(markov, grown, tmp_path):
    lm, reward, beta = markov
    key, tree = grown
    path = str(tmp_path / "tree.npz")
    cfg = DTSConfig("published")
    search.save_tree(path, tree, key, cfg, pplalign.tilt(lm, reward, beta))
    loaded, _ = search.load_tree(path, cfg, pplalign.tilt(lm, reward, beta))
    other = TableReward(reward.values * 2.0, reward.vocab_size)
    with pytest.raises(ValueError, match="reward"):
        search.load_tree(path, cfg, pplalign.tilt(lm, other, beta))
    # the loaded tree carries its setup, so an in-memory resume under another β is refused too
    with pytest.raises(ValueError, match="beta"):
        pplalign.dts(key, pplalign.tilt(lm, reward, 0.5), ITERS, tree=loaded)


# --------------------------------------------------------------------------------------------------
# traced β
# --------------------------------------------------------------------------------------------------

BETAS = jnp.array([0.5, 1.0, -1.0, 0.0, jnp.inf, jnp.nan, 1e-40], jnp.float32)
VALID = np.array([True, True, False, False, False, False, False])


def _sequential_runs(lm, reward):
    key = jax.random.PRNGKey(0)
    ref = jnp.zeros((lm.num_steps,), jnp.int32)
    return {
        "smc": lambda b: pplalign.smc(key, pplalign.Tilted(lm, reward, b), 32),
        "importance_sampling": lambda b: pplalign.importance_sampling(key, pplalign.Tilted(lm, reward, b), 32),
        "best_of_n": lambda b: pplalign.best_of_n(key, pplalign.Tilted(lm, reward, b), 32),
        "csmc": lambda b: pplalign.csmc(key, pplalign.Tilted(lm, reward, b), 32, ref),
    }


@pytest.mark.parametrize("name", ["smc", "importance_sampling", "best_of_n", "csmc"])
def test_traced_invalid_beta_is_flagged(markov, name):
    """vmap over β = [0.5, 1, −1, 0, …] returned log Ẑ [−1.90, −1.57, 31.36, −∞] with no flag."""
    lm, reward, _ = markov
    result = jax.vmap(_sequential_runs(lm, reward)[name])(BETAS)
    np.testing.assert_array_equal(np.asarray(result.invalid_beta), ~VALID)
    log_Z = np.asarray(result.log_Z)
    assert not np.isnan(log_Z).any() and not np.isnan(np.asarray(result.log_weights)).any()
    assert np.all(log_Z[~VALID] == -np.inf) and np.all(np.isfinite(log_Z[VALID]))
    assert np.all(np.asarray(result.all_zero)[~VALID])
    assert not np.asarray(result.nonfinite_reward).any()  # a bad β is reported as itself, not as a NaN reward


def test_traced_beta_is_flagged_under_jit(markov):
    lm, reward, _ = markov
    run = jax.jit(lambda b: pplalign.smc(jax.random.PRNGKey(0), pplalign.Tilted(lm, reward, b), 32))
    assert bool(run(jnp.float32(-1.0)).invalid_beta)
    assert not bool(run(jnp.float32(2.0)).invalid_beta)


@pytest.mark.parametrize("beta", [1e-40, 1e-39, 1e39, np.float64(1e-300)])
def test_beta_outside_float32_is_refused(markov, beta):
    """β = 1e-40 passed validation, then became 0 in float32 and r/β turned into a NaN 'reward'."""
    lm, reward, _ = markov
    with pytest.raises(ValueError, match="float32"):
        pplalign.tilt(lm, reward, beta)


# --------------------------------------------------------------------------------------------------
# conditional SMC references
# --------------------------------------------------------------------------------------------------


def test_csmc_reference_outside_the_vocabulary_is_refused(target):
    ref = jnp.array([0, 1, 7, 2, 3], jnp.int32)
    with pytest.raises(ValueError, match="step 2"):
        pplalign.csmc(jax.random.PRNGKey(0), target, 8, ref)


def test_csmc_float_reference_for_a_categorical_step_is_refused(target):
    ref = jnp.array([0.0, 1.0, 2.0, 2.0, 3.0], jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        pplalign.csmc(jax.random.PRNGKey(0), target, 8, ref)


def test_csmc_reference_of_zero_prior_probability_is_refused(markov):
    lm, reward, beta = markov
    log_trans = lm.log_trans.at[1, 2].set(-jnp.inf)  # 1 → 2 impossible
    sparse = dataclasses.replace(lm, log_trans=log_trans)
    ref = jnp.array([0, 1, 2, 2, 3], jnp.int32)
    with pytest.raises(ValueError, match="step 2"):
        pplalign.csmc(jax.random.PRNGKey(0), pplalign.tilt(sparse, reward, beta), 8, ref)


def test_csmc_valid_reference_is_accepted(target):
    ref = jnp.array([0, 1, 2, 2, 3], jnp.int32)
    result = pplalign.csmc(jax.random.PRNGKey(0), target, 8, ref)
    np.testing.assert_array_equal(np.asarray(result.samples[0]), np.asarray(ref))


def test_dts_resume_of_a_tree_grown_by_run_loop_needs_a_stamp(target, grown):
    """A tree grown by run_loop/run (under the caller's jit) carries no setup; dts refuses it until marked."""
    key, _ = grown
    cfg = DTSConfig("published")
    empty = search.init(target, search.nodes_needed(target.num_steps, 2 * ITERS))
    tree = search.run(key, empty, target, jnp.asarray(ITERS, jnp.int32), cfg, None)
    with pytest.raises(ValueError, match="stamp_tree"):
        pplalign.dts(key, target, ITERS, tree=tree)
    _, resumed = pplalign.dts(key, target, ITERS, tree=search.stamp_tree(tree, target, cfg))
    assert int(resumed.iteration) == 2 * ITERS
