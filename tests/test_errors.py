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


# --------------------------------------------------------------------------------------------------
# issue 12: one clear ValueError per bad input, naming the culprit
# --------------------------------------------------------------------------------------------------


def nan_twist(state, t):
    return jnp.where(state.last == 0, jnp.nan, 0.0)


def inf_twist(state, t):
    return jnp.where(state.last == 0, jnp.inf, 0.0)


@pytest.mark.parametrize("twist", [nan_twist, inf_twist])
@pytest.mark.parametrize("optimal", [True, False])
def test_nonfinite_twist_names_the_twist(target, twist, optimal):
    """A NaN/+inf twist used to be blamed on the reward."""
    with pytest.raises(ValueError, match=f"twist {twist.__name__!r}") as err:
        pplalign.smc(jax.random.PRNGKey(0), target, 64, twist=twist, optimal_proposal=optimal)
    assert "reward" not in str(err.value).split("twist")[0]


def minus_inf_twist(state, t):
    return jnp.where(state.last == 0, -jnp.inf, 0.0)


@pytest.mark.parametrize("optimal", [True, False])
def test_minus_inf_twist_is_a_legal_zero_weight(target, optimal):
    """−inf at consecutive steps (ψ_t/ψ_{t−1} = −inf − −inf) is a dead particle, not a NaN weight."""
    result = pplalign.smc(jax.random.PRNGKey(0), target, 64, twist=minus_inf_twist, ess_threshold=0.0,
                          optimal_proposal=optimal)
    assert not bool(result.nonfinite_reward) and not bool(result.nonfinite_twist)
    assert not np.isnan(np.asarray(result.log_weights)).any()


class NotADistribution:
    """A Sequential program whose transition returns logits instead of a numpyro distribution."""

    num_steps = 2

    def init(self, key):
        return jnp.zeros((), jnp.int32)

    def transition(self, state, t):
        return jnp.zeros((3,))

    def update(self, state, x, t):
        return state + x

    def output(self, state):
        return state


def test_transition_that_is_not_a_distribution():
    target = pplalign.tilt(NotADistribution(), lambda x: jnp.zeros(()), 1.0)
    with pytest.raises(ValueError, match="transition must return a numpyro distribution"):
        pplalign.smc(jax.random.PRNGKey(0), target, 4)
    with pytest.raises(ValueError, match="transition must return a numpyro distribution"):
        pplalign.dts(jax.random.PRNGKey(0), target, 2)


@pytest.mark.parametrize("name", ["systematic", "multinomial", "stratified", "residual"])
def test_resampling_by_name(target, name):
    by_name = pplalign.smc(jax.random.PRNGKey(0), target, 16, resampling=name, ess_threshold=1.0)
    by_fn = pplalign.smc(jax.random.PRNGKey(0), target, 16, resampling=getattr(pplalign, name), ess_threshold=1.0)
    assert float(by_name.log_Z) == float(by_fn.log_Z)


@pytest.mark.parametrize("bad", ["sytematic", 3])
def test_unknown_resampling(target, bad):
    with pytest.raises(ValueError, match="resampling"):
        pplalign.smc(jax.random.PRNGKey(0), target, 16, resampling=bad)


@pytest.mark.parametrize("key", [0, np.int64(3), jnp.zeros((3,), jnp.uint32), 1.5])
def test_key_that_is_not_a_prng_key(target, key):
    with pytest.raises(ValueError, match=r"jax\.random\.key"):
        pplalign.smc(key, target, 4)
    with pytest.raises(ValueError, match=r"jax\.random\.key"):
        pplalign.best_of_n(key, target, 4)
    with pytest.raises(ValueError, match=r"jax\.random\.key"):
        pplalign.dts(key, target, 2)


def test_typed_keys_are_accepted(target):
    a = pplalign.smc(jax.random.key(0), target, 8)
    assert np.isfinite(float(a.log_Z))


def test_dts_zero_iterations(target):
    """dts(num_iterations=0) reported a capacity it was never given."""
    with pytest.raises(ValueError, match="num_iterations"):
        pplalign.dts(jax.random.PRNGKey(0), target, 0)


def test_best_of_n_names_n(target):
    with pytest.raises(ValueError, match=r"\bn must be") as err:
        pplalign.best_of_n(jax.random.PRNGKey(0), target, 0)
    assert "num_particles" not in str(err.value)


def test_numpy_counts_and_0d_thresholds_are_accepted(target):
    a = pplalign.smc(jax.random.PRNGKey(0), target, np.int64(8), ess_threshold=jnp.asarray(0.5))
    b = pplalign.smc(jax.random.PRNGKey(0), target, 8, ess_threshold=0.5)
    assert float(a.log_Z) == float(b.log_Z)
    pplalign.best_of_n(jax.random.PRNGKey(0), target, np.int32(4))
    pplalign.importance_sampling(jax.random.PRNGKey(0), target, np.int64(4))
    pplalign.csmc(jax.random.PRNGKey(0), target, np.int64(4), jnp.zeros((5,), jnp.int32), ess_threshold=np.float32(1.0))
    pplalign.island_smc(jax.random.PRNGKey(0), target, np.int64(8), num_islands=np.int64(2))


def test_dts_under_jit_is_a_clear_error(target):
    with pytest.raises(ValueError, match="jit"):
        jax.jit(lambda k: pplalign.dts(k, target, 3)[0].log_Z)(jax.random.PRNGKey(0))


def test_tempered_smc_with_all_minus_inf_reward_has_zero_ess():
    """Tempered SMC whose reward is −∞ everywhere reported ESS = N on the stages after the collapse."""
    import numpyro
    import numpyro.distributions as dist

    def model():
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    target = pplalign.tilt(model, lambda z: -jnp.inf * jnp.ones(()), 1.0)
    result = pplalign.tempered_smc(jax.random.PRNGKey(0), target, 16, max_stages=4)
    assert bool(result.all_zero) and float(result.log_Z) == -np.inf
    np.testing.assert_array_equal(np.asarray(result.ess), 0.0)


def test_many_names_the_invalid_beta_of_a_batch(markov):
    lm, reward, _ = markov
    targets = jax.vmap(lambda b: pplalign.Tilted(lm, reward, b))(jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="target 1 of the batch: beta"):
        pplalign.many(jax.random.PRNGKey(0), targets, 4)


def test_last_step_with_no_candidate_mass_is_a_zero_weight_not_nan():
    """A twist whose candidates give every next value ψ = 0 at the last step: the particle's weight is zero
    (all_zero, log Z = −inf), not −inf − (−inf) = NaN blamed on the twist."""
    import jax
    import jax.numpy as jnp

    import pplalign
    from models.markov_lm import random_markov_lm

    class Doomed:
        def __call__(self, state, t):
            return jnp.zeros(())

        def candidates(self, state, t):
            return jnp.where(t == 2, -jnp.inf, 0.0) * jnp.ones((3,))

    jax.tree_util.register_pytree_node(Doomed, lambda d: ((), None), lambda _, c: Doomed())
    lm = random_markov_lm(jax.random.key(0), vocab_size=3, num_steps=3)
    out = pplalign.smc(jax.random.key(1), pplalign.tilt(lm, lambda x: jnp.zeros(()), 1.0), 8, twist=Doomed())
    assert bool(out.all_zero) and float(out.log_Z) == -float("inf") and not bool(out.nonfinite_twist)
