"""Property test of the public surface (issue 12): over generated bad and extreme arguments — β, N, ESS
thresholds, rewards and twists of extreme magnitude, ±inf and NaN — every public sampler either raises
``ValueError`` or returns a result with no NaN in ``log_Z``/``log_weights``, its flags set where their
condition was met; never another exception type.

Cheap by construction (compiles dominate): two tiny programs, N from a small set, and the extreme values
enter through pytree leaves (reward tables, twist tables, β as an array), so a new example reuses the
compiled samplers. Traced β goes through the caller's ``jit``, where nothing can raise and flags report.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pplalign
from models.markov_lm import TableReward, random_markov_lm

V, T = 3, 3
LM = random_markov_lm(jax.random.PRNGKey(7), vocab_size=V, num_steps=T)
KEY = jax.random.PRNGKey(0)
SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableTwist:
    """log ψ_t = table[t, last token]: extreme values come in as the table, not as new code."""

    table: jax.Array  # [T, V]

    def __call__(self, state, t):
        return self.table[t, jnp.maximum(state.last, 0)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Walk:
    """p₀: x = x_0 + x_1, x_t ~ N(0, 1); the state is the running sum."""

    num_steps: int = dataclasses.field(default=2, metadata=dict(static=True))

    def init(self, key):
        return jnp.zeros(())

    def transition(self, state, t):
        return dist.Normal(0.0, 1.0)

    def update(self, state, x, t):
        return state + x

    def output(self, state):
        return state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Affine:
    """r(x) = a·x + b (a reward of the walk and of the static model, or a twist of the walk's state)."""

    a: jax.Array
    b: jax.Array

    def __call__(self, x, t=None):
        return self.a * jnp.asarray(x, jnp.float32) + self.b


def static_model():
    return numpyro.sample("z", dist.Normal(0.0, 1.0))


SPECIALS = [np.nan, np.inf, -np.inf]
magnitudes = st.sampled_from([0.0, 1.0, 1e-30, 1e3, 1e30, 3e38])
betas = st.sampled_from([1.0, 0.5, 1e-3, 1e-30, 1e30, 1e-37, 0.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, 1e39])
counts = st.sampled_from([1, 4, np.int64(4), 0, -1, 2.5, True, None])
thresholds = st.sampled_from([0.0, 0.5, 1.0, np.float32(0.5), "array", -0.1, 1.5, np.nan])
ARGUMENTS = dict(beta=betas, n=counts, threshold=thresholds)  # what every untraced property draws


@st.composite
def tables(draw, shape):
    """A table of the given shape: a random draw times an extreme magnitude, some entries ±inf or NaN."""
    seed = draw(st.integers(0, 3))
    values = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape), np.float64) * draw(magnitudes)
    flat = values.reshape(-1)
    for i in draw(st.lists(st.integers(0, flat.size - 1), max_size=3)):
        flat[i] = draw(st.sampled_from(SPECIALS))
    if draw(st.booleans()) and draw(st.booleans()):
        flat[:] = draw(st.sampled_from(SPECIALS))  # the whole table at once: all-zero weights, all NaN
    with np.errstate(over="ignore"):  # beyond float32: +-inf, one more extreme
        return jnp.asarray(values.astype(np.float32))


def f32(x) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(x)


def _threshold(value):
    return jnp.asarray(0.5) if isinstance(value, str) else value


def valid_beta(beta) -> bool:
    f32 = np.finfo(np.float32)
    return bool(float(f32.tiny) <= float(beta) <= float(f32.max))  # NaN compares False


def check_result(result, beta_is_valid: bool) -> None:
    """No NaN; the flags say what happened."""
    log_Z, log_w = np.asarray(result.log_Z), np.asarray(result.log_weights)
    assert not np.isnan(log_Z).any(), log_Z
    assert not np.isnan(log_w).any(), log_w
    assert not np.isnan(np.asarray(result.ess)).any()
    assert bool(np.all(np.asarray(result.invalid_beta) == (not beta_is_valid)))
    if not beta_is_valid:
        assert np.all(log_Z == -np.inf) and np.all(np.asarray(result.all_zero))
    assert np.all(np.asarray(result.all_zero)[log_Z == -np.inf])


def run_or_value_error(call):
    """The call's result, or None if it raised ValueError; any other exception fails the test."""
    try:
        return call()
    except ValueError:
        return None


SEQUENTIAL = {
    "smc": lambda target, n, thr, twist: pplalign.smc(KEY, target, n, ess_threshold=thr, twist=twist),
    "smc_fk": lambda target, n, thr, twist: pplalign.smc(
        KEY, target, n, ess_threshold=thr, twist=twist, optimal_proposal=False, resampling="stratified"
    ),
    "csmc": lambda target, n, thr, twist: pplalign.csmc(KEY, target, n, jnp.zeros((T,), jnp.int32), ess_threshold=thr, twist=twist),
    "importance_sampling": lambda target, n, thr, twist: pplalign.importance_sampling(KEY, target, n),
    "best_of_n": lambda target, n, thr, twist: pplalign.best_of_n(KEY, target, n),
    "island_smc": lambda target, n, thr, twist: pplalign.island_smc(KEY, target, n, num_islands=1, ess_threshold=thr, twist=twist),
    "dts": lambda target, n, thr, twist: pplalign.dts(KEY, target, n, num_samples=4, variant="consistent", twist=twist)[0],
}


@SETTINGS
@given(
    name=st.sampled_from(sorted(SEQUENTIAL)),
    **ARGUMENTS,
    reward=tables((V**T,)),
    twist=st.one_of(st.none(), tables((T, V))),
)
def test_sequential_samplers_raise_value_error_or_return_no_nan(name, beta, n, threshold, reward, twist):
    twist = None if twist is None else TableTwist(twist)
    target = run_or_value_error(lambda: pplalign.tilt(LM, TableReward(reward, V), beta))
    if target is None:
        assert not valid_beta(beta)
        return
    result = run_or_value_error(lambda: SEQUENTIAL[name](target, n, _threshold(threshold), twist))
    if result is not None:
        check_result(result, True)
        assert not bool(result.nonfinite_reward) and not bool(result.nonfinite_twist)  # outside jit: raised


_traced_runs = {}


def traced_run(name, n):
    """The sampler under the caller's jit, β and the tables traced; one compile per (sampler, N)."""
    if (name, n) not in _traced_runs:
        run = SEQUENTIAL[name] if name != "many" else None

        def fn(beta, reward, twist):
            target = pplalign.Tilted(LM, TableReward(reward, V), beta)
            if name == "many":
                targets = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf, leaf]), target)
                out = pplalign.many(KEY, targets, n)
                return jax.tree_util.tree_map(lambda leaf: leaf[1], out)
            return run(target, n, 0.5, TableTwist(twist))

        _traced_runs[name, n] = jax.jit(fn)
    return _traced_runs[name, n]


@SETTINGS
@given(
    # smc_fk and island_smc run the same compiled body as smc: covered untraced above, not recompiled here
    name=st.sampled_from(["smc", "csmc", "importance_sampling", "best_of_n", "many", "dts"]),
    beta=betas,
    reward=tables((V**T,)),
    twist=tables((T, V)),
)
def test_traced_beta_and_values_are_flagged_never_nan(name, beta, reward, twist):
    call = lambda: traced_run(name, 4)(f32(beta), reward, twist)
    if name == "dts":  # dts runs Python-side checks: under jit it is a clear ValueError
        assert run_or_value_error(call) is None
        return
    check_result(call(), valid_beta(beta))


def vmapped_smc(betas):
    return jax.vmap(lambda b: pplalign.smc(KEY, pplalign.Tilted(LM, TableReward(jnp.zeros(V**T), V), b), 4))(betas)


@SETTINGS
@given(st.lists(betas, min_size=4, max_size=4))
def test_vmap_over_beta_flags_each_row(beta_list):
    result = vmapped_smc(jnp.asarray([f32(b) for b in beta_list]))
    valid = np.array([valid_beta(b) for b in beta_list])
    np.testing.assert_array_equal(np.asarray(result.invalid_beta), ~valid)
    assert not np.isnan(np.asarray(result.log_Z)).any()
    assert np.all(np.isfinite(np.asarray(result.log_Z))[valid])


STATIC = {
    "walk_smc": lambda b, r, tw, n, thr: pplalign.smc(KEY, pplalign.tilt(Walk(), r, b), n, ess_threshold=thr, twist=tw),
    "static_is": lambda b, r, tw, n, thr: pplalign.importance_sampling(KEY, pplalign.tilt(static_model, r, b), n),
    "tempered_smc": lambda b, r, tw, n, thr: pplalign.tempered_smc(
        KEY, pplalign.tilt(static_model, r, b), n, max_stages=3, num_mcmc_steps=1, ess_target=thr
    ),
}


@SETTINGS
@given(
    name=st.sampled_from(sorted(STATIC)),
    **ARGUMENTS,
    a=magnitudes,
    b=st.sampled_from([0.0, -1e30, 1e30] + SPECIALS),
    twist_scale=st.sampled_from([None, 1.0, 1e30, np.nan, np.inf]),
)
def test_continuous_and_static_samplers_raise_value_error_or_return_no_nan(name, beta, n, threshold, a, b, twist_scale):
    reward = Affine(jnp.float32(a), jnp.float32(b))
    twist = None if twist_scale is None else Affine(jnp.float32(twist_scale), jnp.float32(0.0))
    result = run_or_value_error(lambda: STATIC[name](beta, reward, twist, n, _threshold(threshold)))
    if result is not None:
        check_result(result, True)
