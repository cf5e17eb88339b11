"""Bad input fails early with a clear ValueError; all-zero weights are reported, never NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign


@pytest.fixture(scope="module")
def target(markov):
    lm, reward, beta = markov
    return pplalign.tilt(lm, reward, beta)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta(markov, beta):
    lm, reward, _ = markov
    with pytest.raises(ValueError, match="beta"):
        pplalign.tilt(lm, reward, beta)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_num_particles(target, n):
    with pytest.raises(ValueError, match="num_particles"):
        pplalign.smc(jax.random.PRNGKey(0), target, n)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_bad_ess_threshold(target, threshold):
    with pytest.raises(ValueError, match="ess_threshold"):
        pplalign.smc(jax.random.PRNGKey(0), target, 4, ess_threshold=threshold)


def test_not_a_target(markov):
    with pytest.raises(ValueError, match="pplalign.tilt"):
        pplalign.smc(jax.random.PRNGKey(0), markov[0], 4)


def test_reward_not_callable(markov):
    with pytest.raises(ValueError, match="reward"):
        pplalign.tilt(markov[0], 3.0, 1.0)


def nan_reward(tokens):
    return jnp.where(tokens[0] == 0, jnp.nan, 0.0)


def inf_reward(tokens):
    return jnp.where(tokens[0] == 0, jnp.inf, 0.0)


@pytest.mark.parametrize("reward", [nan_reward, inf_reward])
def test_nonfinite_reward_names_the_reward(markov, reward):
    target = pplalign.tilt(markov[0], reward, 1.0)
    with pytest.raises(ValueError, match=reward.__name__):
        pplalign.smc(jax.random.PRNGKey(0), target, 64)


def test_nonfinite_reward_is_flagged_under_jit(markov):
    target = pplalign.tilt(markov[0], nan_reward, 1.0)
    result = jax.jit(lambda k: pplalign.smc(k, target, 64))(jax.random.PRNGKey(0))
    assert bool(result.nonfinite_reward)
    assert not np.isnan(np.asarray(result.log_weights)).any()


def minus_inf_reward(tokens):
    return jnp.where(tokens[0] == 0, -jnp.inf, 0.0)


def test_minus_inf_is_a_legal_zero_weight(markov):
    lm = markov[0]
    target = pplalign.tilt(lm, minus_inf_reward, 1.0)
    result = pplalign.smc(jax.random.PRNGKey(0), target, 256)
    assert not bool(result.nonfinite_reward)
    alive = np.isfinite(np.asarray(result.log_weights))
    assert np.all(np.asarray(result.samples)[alive, 0] != 0)
    exact = float(jnp.log1p(-jnp.exp(lm.log_init[0])))  # Z = P(x0 != 0)
    assert abs(float(result.log_Z) - exact) < 0.2


def always_minus_inf(tokens):
    return -jnp.inf * jnp.ones(())


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_all_zero_weights_are_reported_without_nan(markov, threshold):
    target = pplalign.tilt(markov[0], always_minus_inf, 1.0)
    result = pplalign.smc(jax.random.PRNGKey(0), target, 16, ess_threshold=threshold)
    assert bool(result.all_zero)
    assert float(result.log_Z) == -np.inf
    for leaf in (result.log_weights, result.ess, result.normalized_weights):
        assert not np.isnan(np.asarray(leaf)).any()
    assert float(result.ess[-1]) == 0.0


def test_twist_with_wrong_candidate_shape(target):
    class BadTwist:
        def __call__(self, state, t):
            return jnp.zeros(())

        def candidates(self, state, t):
            return jnp.zeros((3,))

    with pytest.raises(ValueError, match=r"twist.candidates must return shape \(4,\)"):
        pplalign.smc(jax.random.PRNGKey(0), target, 4, twist=BadTwist())


def test_twist_that_is_not_scalar(target):
    with pytest.raises(ValueError, match="twist must return a scalar"):
        pplalign.smc(jax.random.PRNGKey(0), target, 4, twist=lambda state, t: jnp.zeros((2,)))


def test_reward_that_is_not_scalar(markov):
    target = pplalign.tilt(markov[0], lambda tokens: tokens.astype(jnp.float32), 1.0)
    with pytest.raises(ValueError, match="reward must return a scalar"):
        pplalign.smc(jax.random.PRNGKey(0), target, 4)


def test_csmc_reference_shape(target):
    with pytest.raises(ValueError, match="leading axis T"):
        pplalign.csmc(jax.random.PRNGKey(0), target, 4, jnp.zeros((3,), jnp.int32))


def test_tilt_with_python_beta_inside_a_callers_jit(markov):
    lm, reward, _ = markov

    @jax.jit
    def run(key):
        return pplalign.smc(key, pplalign.tilt(lm, reward, 0.5), 8).log_Z

    assert np.isfinite(float(run(jax.random.PRNGKey(0))))
