"""Noise schedules of the variance-preserving (DDPM) forward process q(x_s | x_0) = N(√ᾱ_s x_0, (1 − ᾱ_s) I)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["vp_betas", "alpha_bars_of"]


def vp_betas(num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0) -> jax.Array:
    """Discretised VP schedule (Song et al. 2021): β_s = 1 − exp(−∫ β(u) du over ((s−1)/T, s/T]) with
    β(u) = β_min + u (β_max − β_min). Stays in (0, 1) for any T; ᾱ_T = exp(−(β_min + β_max)/2)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}")
    if not 0 < beta_min <= beta_max:
        raise ValueError(f"need 0 < beta_min <= beta_max; got {beta_min}, {beta_max}")
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    integral = beta_min * u + 0.5 * (beta_max - beta_min) * u**2
    return jnp.asarray(-np.expm1(-np.diff(integral)), jnp.float32)


def alpha_bars_of(betas) -> jax.Array:
    """[T+1] ᾱ_0 = 1, ᾱ_s = ∏_{u≤s}(1 − β_u), computed in float64 on the host."""
    ab = np.cumprod(1.0 - np.asarray(betas, np.float64))
    return jnp.asarray(np.concatenate([[1.0], ab]), jnp.float32)
