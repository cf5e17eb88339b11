"""The result every sampler returns (DESIGN §3)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Particles", "raise_on_nonfinite"]


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
      nonfinite_reward: [] bool; a reward (or twist) returned NaN or +inf for some particle. Outside jit the
                   samplers raise ``ValueError`` instead; inside a caller's jit/vmap it is reported here.
      all_zero:    [] bool; every weight is zero (log Ẑ = −inf, log_weights all −inf, no NaN).
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


def raise_on_nonfinite(result: Particles, reward: Any) -> Particles:
    """Raise a ValueError naming the reward when the (concrete) result flags NaN/+inf rewards."""
    flag = result.nonfinite_reward
    if isinstance(flag, jax.core.Tracer):
        return result
    if bool(jnp.any(flag)):
        name = getattr(reward, "__qualname__", None) or type(reward).__name__
        raise ValueError(
            f"reward {name!r} returned NaN or +inf for some particles; rewards must be finite or -inf "
            "(a legal zero weight)."
        )
    return result
