"""Objectives as genjax programs, differentiated by ADEV (Lew et al., POPL 2023; genjax.vi, Becker et al. 2024).

An objective is a genjax ``expectation``: a program that draws from the variational program (each choice
carrying its own gradient strategy: ``normal_reparam``, ``multivariate_normal_diag_reparam``,
``normal_reinforce``, :data:`categorical_reinforce`, ``categorical_enum_parallel``, ...) and returns a
value whose expectation is the objective. ADEV's forward-mode CPS transform then gives an unbiased gradient
estimate; switching estimator means swapping the primitive (one argument of the guide constructor).

Extensions made here to genjax 1.0.14:

* :func:`value` — ``Expectation.estimate`` seeds the tangent of every argument with the Python scalar 0.0,
  which breaks array-valued parameters under ``jax.grad`` (the custom-JVP primal is traced with it). ``value``
  is the same custom JVP with correctly shaped zero tangents, so ``jax.grad(value)`` works on any pytree of
  parameters (and inside ``jit``/``vmap`` with ``genjax.seed``).
* :data:`categorical_reinforce` — the score-function primitive for categorical choices (genjax ships
  REINFORCE for flip/normal/geometric/uniform, and enumeration for categoricals).
* :func:`elbo` / :func:`iwae` — the ELBO and IWAE bounds of a genjax model and guide (genjax.vi ships the ELBO
  for its own optimiser loop; these return ``(params, key) -> (loss, terms)`` objectives for
  :func:`pplalign.vi.fit`).
* :data:`independent_normal` — a model-side Normal over a whole array whose score is the *summed* log density
  Σ_i log N(v_i; μ_i, σ_i). genjax's ``normal`` with array arguments returns an array score (which broadcasts
  against the scalar scores of other addresses), so models used to fall back on ``multivariate_normal`` with a
  diagonal covariance: the same density, but a Cholesky factorisation and triangular solves per draw. This is
  what numpyro's ``Normal(...).to_event(1)`` or a ``plate`` computes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import tensorflow_probability.substrates.jax.distributions as tfd
from genjax import categorical, seed, tfp_distribution
from genjax.adev import Dual, expectation, reinforce
from genjax.core import distribution

__all__ = ["value", "categorical_reinforce", "independent_normal", "elbo", "iwae", "as_objective"]


@jax.custom_jvp
def value(expect: Any, args: tuple) -> jax.Array:
    """E[f] of a genjax ``expectation`` (one Monte Carlo draw; call under ``genjax.seed``)."""
    zeros = jtu.tree_map(jnp.zeros_like, args)
    return expect.jvp_estimate(*Dual.dual_tree(args, zeros)).primal


@value.defjvp
def _value_jvp(primals, tangents):
    expect, args = primals
    _, arg_tangents = tangents
    out = expect.jvp_estimate(*Dual.dual_tree(args, arg_tangents))
    return out.primal, out.tangent


def _categorical_keyful_sample(key, logits, sample_shape=()):
    return jax.random.categorical(key, logits, shape=sample_shape + jnp.shape(logits)[:-1])


categorical_reinforce = distribution(
    reinforce(categorical.sample, categorical.logpdf, _categorical_keyful_sample),
    categorical.logpdf,
)
"""Categorical(logits) whose gradient is the score-function (REINFORCE) estimator."""


def _independent_normal(loc, scale):
    base = tfd.Normal(loc, scale)
    # every batch axis is an event axis, so log_prob is one scalar: the sum over elements
    return tfd.Independent(base, reinterpreted_batch_ndims=len(base.batch_shape))


independent_normal = tfp_distribution(_independent_normal, name="IndependentNormal")
"""Independent Normal(loc, scale) over an array (loc, scale broadcast); score Σ_i log N(v_i; loc_i, scale_i)."""


def _total(x: Any) -> jax.Array:
    return jnp.sum(jnp.asarray(x))


def elbo(model: Any, guide: Any, observations: dict, model_args: tuple = ()) -> Any:
    """The ELBO E_{q_θ}[log p(obs, z) − log q_θ(z)] as an ADEV ``expectation`` of the guide's parameters.

    ``guide(*params)`` is a genjax program whose choices are the model's latent addresses; the estimator of
    each choice is the primitive the guide uses for it.
    """

    @expectation
    def objective(*params):
        trace = guide.simulate(*params)
        choices = trace.get_choices()
        log_p, _ = model.assess({**observations, **choices}, *model_args)
        # get_score() is log 1/q (genjax convention)
        return _total(log_p) + trace.get_score()

    return objective


def iwae(model: Any, guide: Any, observations: dict, model_args: tuple = (), num_particles: int = 8) -> Any:
    """The IWAE bound E[log (1/K) Σ_k p(obs, z_k)/q(z_k)] (Burda et al. 2016) as an ADEV ``expectation``."""
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1; got {num_particles!r}")

    @expectation
    def objective(*params):
        log_ws = []
        for _ in range(num_particles):  # K is small and static; each draw is its own ADEV site
            trace = guide.simulate(*params)
            log_p, _ = model.assess({**observations, **trace.get_choices()}, *model_args)
            log_ws.append(_total(log_p) + trace.get_score())
        return jax.nn.logsumexp(jnp.stack(log_ws)) - math.log(num_particles)

    return objective


def as_objective(expect: Any, num_samples: int = 1, name: str = "adev_elbo") -> Callable:
    """``(params, key) -> (−mean of num_samples seeded draws, {name: mean})`` for :func:`pplalign.vi.fit`.

    ``params`` is passed to the expectation as its single argument (a pytree)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
    # genjax's sampling sites must be seeded *outside* any JAX transformation, so the gradient is taken
    # inside ``seed`` and handed to JAX as this function's JVP rule. Both call ADEV's forward-mode estimate
    # directly: ``seed`` does not reach into a ``custom_jvp`` primal (``seed(value)`` alone neither lowers
    # under ``jit`` nor uses its key), and one dual evaluation gives the primal and the tangent together.
    def _estimate(p, dp):
        out = expect.jvp_estimate(*Dual.dual_tree((p,), (dp,)))
        return out.primal, out.tangent

    forward = seed(lambda p: _estimate(p, jtu.tree_map(jnp.zeros_like, p))[0])
    tangent = seed(_estimate)

    @jax.custom_jvp
    def draw(key, params):
        return forward(key, params)

    @draw.defjvp
    def _draw_jvp(primals, tangents):
        key, params = primals
        _, d_params = tangents
        d_params = jtu.tree_map(lambda p, t: jnp.zeros_like(p) if t.dtype == jax.dtypes.float0 else t, params, d_params)
        return tangent(key, params, d_params)

    def objective(params, key):
        vals = jax.vmap(lambda k: draw(k, params))(jax.random.split(key, num_samples))
        mean = jnp.mean(vals)
        return -mean, {name: jax.lax.stop_gradient(mean)}

    objective.name = name
    return objective
