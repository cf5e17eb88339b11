"""Log-space helpers shared by the samplers: one definition of what a zero weight and a bad value are."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["sanitize_log", "logsumexp_safe", "log_mean_exp_safe"]


def sanitize_log(x) -> tuple[jax.Array, jax.Array]:
    """Map NaN and +inf to −inf (a zero weight); also return, elementwise, where that happened."""
    x = jnp.asarray(x, jnp.float32)
    bad = jnp.isnan(x) | (x == jnp.inf)
    return jnp.where(bad, -jnp.inf, x), bad


def logsumexp_safe(x: jax.Array) -> jax.Array:
    """log Σ exp x over a 1-D array; −inf (not NaN) when every entry is −inf."""
    m = jnp.max(x)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.log(jnp.sum(jnp.exp(x - safe))) + safe


def log_mean_exp_safe(x: jax.Array) -> jax.Array:
    """log((1/n) Σ exp x) over a 1-D array; −inf (not NaN) when every entry is −inf."""
    return logsumexp_safe(x) - math.log(x.shape[0])
