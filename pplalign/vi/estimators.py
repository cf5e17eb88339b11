"""Gradient estimators of ∇_θ E_{q_θ}[f_θ(x)], chosen by one argument.

Each estimator returns a *surrogate*: a scalar whose value is the Monte Carlo estimate of E_q[f] and whose
gradient is an unbiased estimate of ∇_θ E_q[f] (the "magic box" construction; Foerster et al. 2018,
Schulman et al. 2015). Names:

``"reparam"``
    x = g_θ(ε): ∇ E[f] = E_ε[∇_θ f_θ(g_θ(ε))] (Kingma & Welling 2014). Needs ``family.rsample`` and a target
    and reward differentiable in x; a discrete sample or a reward whose value does not depend
    differentiably on x is refused with a ``ValueError`` suggesting REINFORCE.
``"reinforce"``, ``"reinforce_mean"``, ``"reinforce_loo"``
    the score-function identity ∇ E[f] = E[∇f + (f − b) ∇ log q_θ(x)] (Williams 1992) with baseline b = 0,
    the batch mean, or the leave-one-out mean b_i = Σ_{j≠i} f_j /(n−1) (Kool et al. 2019). A batch-mean
    baseline that includes f_i itself biases the score term by the factor (1 − 1/n); ``reinforce_mean``
    rescales it by n/(n−1), which removes the bias — and then coincides algebraically with leave-one-out
    (Kool et al. 2019, eq. 9). Both are kept so that the identity is tested, not assumed.
``"sequence_reinforce"``
    sequence-level REINFORCE for autoregressive categorical families (the RLOO estimator of RL fine-tuning,
    Ahmadian et al. 2024): the score is Σ_t ∇ log q(x_t | x_{<t}) from ``family.token_log_probs``, with a
    leave-one-out baseline, and f enters only as a (stop-gradient) return. Dropping the pathwise term ∇f is
    unbiased when f depends on θ only through −c·log q_θ(x) (then E_q[∇f] = −c·E_q[∇ log q] = 0): true for
    the ELBO and the KL-regularised RL objective, which are the objectives that accept it.
``"enum"``
    exact: E_q[f] = Σ_x q_θ(x) f_θ(x) over ``family.support()`` — the exact gradient on finite supports.

The same choices exist as ADEV primitives for genjax programs (:mod:`pplalign.vi.adev`); this module is the
array form used for batched sequence families, where baselines across samples are needed.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

__all__ = ["ESTIMATORS", "Estimate", "estimate", "check_estimator", "check_reparam_differentiable"]

ESTIMATORS = ("reparam", "reinforce", "reinforce_mean", "reinforce_loo", "sequence_reinforce", "enum")


class Estimate(NamedTuple):
    surrogate: jax.Array  # [] value = MC estimate of E_q[f]; gradient = unbiased estimate of ∇ E_q[f]
    value: jax.Array  # [] stop-gradient estimate of E_q[f]
    samples: Any  # the draws (or the enumerated support)
    f: jax.Array  # [n] stop-gradient per-sample values
    weights: jax.Array  # [n] the probability each entry of ``f`` carries in ``value``


def check_estimator(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {ESTIMATORS}")
    return name


def _tree_reshape(tree: Any, shape: tuple) -> Any:
    return jax.tree_util.tree_map(lambda a: a.reshape(shape + a.shape[1:]), tree)


def _depends_on_input(fn: Callable, x: jax.Array) -> bool:
    """Whether the linearisation of fn at x depends on the input tangent (a symbolic-zero derivative, as for
    a comparison, ``floor``, ``round`` or an integer cast, does not)."""
    _, lin = jax.linearize(fn, x)
    jaxpr = jax.make_jaxpr(lin)(x).jaxpr
    live = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any((not isinstance(v, Literal)) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return any((not isinstance(v, Literal)) and v in live for v in jaxpr.outvars)


def check_reparam_differentiable(log_density_terms: dict[str, Callable], x: Any) -> None:
    """Refuse the pathwise estimator when a sample is discrete or a term is not differentiable in x."""
    leaves = jax.tree_util.tree_leaves(x)
    if any(not jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves):
        raise ValueError(
            "the reparameterisation estimator needs continuous samples; this family draws discrete values "
            "(no pathwise derivative exists). Use estimator='reinforce_loo' (REINFORCE) or 'enum'."
        )
    one = jax.tree_util.tree_map(lambda a: a[0], x)
    for name, fn in log_density_terms.items():
        try:
            ok = _depends_on_input(fn, one)
        except Exception as err:  # e.g. a pure_callback or an integer-valued function: no JVP rule
            raise ValueError(
                f"the {name} is not differentiable in x ({type(err).__name__}: {err}); the reparameterisation "
                "estimator needs ∇_x of it. Use estimator='reinforce_loo' (REINFORCE), which needs only its values."
            ) from err
        if not ok:
            raise ValueError(
                f"the {name} has zero derivative in x almost everywhere (a step, threshold, rounding or integer "
                "cast), so the reparameterisation estimator would silently return a wrong gradient. Use "
                "estimator='reinforce_loo' (REINFORCE), which needs only its values."
            )


def _baseline(fs: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(b, scale) for the score term scale·(f − b)·∇log q."""
    n = fs.shape[0]
    if kind == "reinforce":
        return jnp.zeros_like(fs), jnp.asarray(1.0)
    if n < 2:
        raise ValueError(f"estimator {kind!r} needs at least 2 samples for its baseline; got {n}")
    if kind == "reinforce_mean":
        return jnp.broadcast_to(jnp.mean(fs), fs.shape), jnp.asarray(n / (n - 1))
    total = jnp.sum(fs)
    return (total - fs) / (n - 1), jnp.asarray(1.0)  # leave-one-out


def estimate(
    f: Callable[[Any, Any], jax.Array],
    family: Any,
    params: Any,
    key: jax.Array,
    num_samples: int,
    estimator: str,
    *,
    group: int = 1,
) -> Estimate:
    """Surrogate for E_{q_θ}[f_θ(x)], with f(params, x) -> [n] per-sample values.

    With ``group = K > 1`` each term of the expectation uses K independent draws: f receives x with leading
    axes [n, K] and the score is Σ_k log q(x_k) (IWAE, Rényi bounds).
    """
    check_estimator(estimator)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")

    if estimator == "enum":
        if group != 1:
            raise ValueError("the enumeration estimator handles one-sample objectives only (group=1)")
        if not hasattr(family, "support"):
            raise ValueError(f"estimator 'enum' needs a family with a finite support(); {family!r} has none")
        xs = family.support()
        lq = family.log_prob(params, xs)
        q = jnp.exp(lq)
        fx = f(params, xs)
        terms = jnp.where(q > 0, q * fx, 0.0)  # 0·(−inf) is 0 here: q puts no mass there
        value = jnp.sum(terms)
        return Estimate(value, jax.lax.stop_gradient(value), xs, jax.lax.stop_gradient(fx), jax.lax.stop_gradient(q))

    n_draw = num_samples * group
    if estimator == "reparam":
        if not hasattr(family, "rsample"):
            raise ValueError(
                f"estimator 'reparam' needs a family with rsample (a pathwise draw x = g_θ(ε)); {family!r} has "
                "none. Use estimator='reinforce_loo' (REINFORCE)."
            )
        xs = family.rsample(params, key, n_draw)
        if group > 1:
            xs = _tree_reshape(xs, (num_samples, group))
        fx = f(params, xs)
        value = jnp.mean(fx)
        w = jnp.full((num_samples,), 1.0 / num_samples)
        return Estimate(value, jax.lax.stop_gradient(value), xs, jax.lax.stop_gradient(fx), w)

    xs = jax.lax.stop_gradient(family.sample(params, key, n_draw))
    if estimator == "sequence_reinforce":
        if not hasattr(family, "token_log_probs"):
            raise ValueError(f"estimator 'sequence_reinforce' needs family.token_log_probs; {family!r} has none")
        lq = jnp.sum(family.token_log_probs(params, xs), axis=-1)
    else:
        lq = family.log_prob(params, xs)
    if group > 1:
        xs = _tree_reshape(xs, (num_samples, group))
        lq = jnp.sum(lq.reshape(num_samples, group), axis=-1)
    fx = f(params, xs)
    fs = jax.lax.stop_gradient(fx)
    kind = "reinforce_loo" if estimator == "sequence_reinforce" else estimator
    b, scale = _baseline(fs, kind)
    score = lq - jax.lax.stop_gradient(lq)  # value 0, gradient ∇ log q
    direct = fs if estimator == "sequence_reinforce" else fx
    surrogate = jnp.mean(direct + scale * (fs - b) * score)
    w = jnp.full((num_samples,), 1.0 / num_samples)
    return Estimate(surrogate, jnp.mean(fs), xs, fs, w)
