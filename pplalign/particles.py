"""The result every sampler returns (DESIGN §3)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .programs import invalid_beta

__all__ = ["Particles", "raise_on_nonfinite", "mark_invalid_beta"]


class Particles(NamedTuple):
    """Weighted particles approximating σ, with the evidence estimate and the bookkeeping of the run.

    Fields:
      samples:     each particle's ``output(state)``; every leaf has leading axis N.
      log_weights: [N] log-weights carried since the last resampling; σ-expectations are
                   ``sum(softmax(log_weights) * f(samples))``.
      log_Z:       [] log Ẑ. Ẑ (not log Ẑ) is unbiased for Z, so E[log Ẑ] ≤ log Z.
      ess:         [T] effective sample size after weighting at each step, before any resampling.
      ancestors:   [T, N] int32; ``ancestors[t, i]`` is the index, before the resampling that followed step t,
                   of particle i's parent (identity where no resampling happened).
      nfe:         [] int32 number of transition evaluations (particles × steps).
      nonfinite_reward: [] bool; the reward returned NaN or +inf for some particle. Outside jit the
                   samplers raise ``ValueError`` instead; inside a caller's jit/vmap it is reported here.
      all_zero:    [] bool; every weight is zero (log Ẑ = −inf, log_weights all −inf, no NaN).
      nonfinite_twist: [] bool; the twist (or a proposal's log-density) made some weight NaN or +inf; raised
                   or reported as ``nonfinite_reward`` is. The particle got weight zero.
      invalid_beta: [] bool; the target's β, traced under the caller's jit/vmap, is not a finite float32
                   ≥ 2⁻¹²⁶ (≤ 0, NaN, ±inf, or too small for r/β). The target is then undefined: the run
                   uses β = 1 in its place and its result is masked, ``log_weights`` all −inf,
                   ``log_Z`` = −inf, ``ess`` 0 and ``all_zero`` set (no NaN). A concrete bad β raises
                   ``ValueError`` before running.
    """

    samples: Any
    log_weights: jax.Array
    log_Z: jax.Array
    ess: jax.Array
    ancestors: jax.Array
    nfe: jax.Array
    # numpy defaults: importing pplalign must not start a JAX backend (jax.distributed.initialize comes first)
    nonfinite_reward: jax.Array = np.asarray(False)
    all_zero: jax.Array = np.asarray(False)
    nonfinite_twist: jax.Array = np.asarray(False)
    invalid_beta: jax.Array = np.asarray(False)

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[-1]

    @property
    def normalized_weights(self) -> jax.Array:
        """softmax of the log-weights; uniform zeros-safe (all −inf gives zeros, not NaN)."""
        lw = self.log_weights
        m = jnp.max(lw, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.exp(lw - m)
        s = jnp.sum(w, axis=-1, keepdims=True)
        return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 0.0)


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def raise_on_nonfinite(result: Particles, reward: Any, twist: Any = None) -> Particles:
    """Raise a ValueError naming the culprit, the reward or the twist (a proposal's log-density without
    one), when the (concrete) result flags NaN/+inf values; under a caller's jit the flags stay in the result."""
    flags = (result.nonfinite_reward, result.nonfinite_twist)
    if any(isinstance(flag, jax.core.Tracer) for flag in flags):
        return result
    if bool(jnp.any(result.nonfinite_twist)):
        culprit = f"twist {_name(twist)!r}" if twist is not None else "a proposal's or the program's log-density"
        raise ValueError(
            f"{culprit} returned NaN or +inf for some particles; twists and log-densities must be finite or -inf "
            "(a legal zero weight)."
        )
    if bool(jnp.any(result.nonfinite_reward)):
        raise ValueError(
            f"reward {_name(reward)!r} returned NaN or +inf for some particles; rewards must be finite or -inf "
            "(a legal zero weight)."
        )
    return result


def mark_invalid_beta(result: Particles, beta: Any) -> Particles:
    """Mask and flag a result whose traced β is invalid (see the ``invalid_beta`` field): log-weights −inf,
    log Ẑ = −inf, ESS 0, ``all_zero`` and ``invalid_beta`` set. A no-op for a valid β."""
    bad = invalid_beta(beta)
    return result._replace(
        log_weights=jnp.where(bad, -jnp.inf, result.log_weights),
        log_Z=jnp.where(bad, -jnp.inf, result.log_Z),
        ess=jnp.where(bad, 0.0, result.ess),
        all_zero=result.all_zero | bad,
        invalid_beta=result.invalid_beta | bad,
    )
