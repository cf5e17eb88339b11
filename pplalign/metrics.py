"""Diagnostics and distances: ESS, log Z bounds, KL estimators, TV, energy distance, MMD, Fréchet distance.

Bounds on log Z (Zhao et al. 2024, §5): for any unbiased Ẑ, Jensen gives E[log Ẑ_SMC] ≤ log Z (a lower
bound, tight as N → ∞); conditional SMC pinned to exact σ samples gives E[log Ẑ_CSMC] ≥ log Z. With one
particle these are E_q[log w] = log Z − KL(q‖σ) and E_σ[log w] = log Z + KL(σ‖q), so the KL divergences
follow from the bounds and the (known or bracketed) log Z.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .smc import ess_of

__all__ = [
    "ess",
    "log_mean_exp",
    "bound",
    "kl_q_sigma",
    "kl_sigma_q",
    "tv_distance",
    "empirical_pmf",
    "energy_distance",
    "mmd",
    "frechet_distance",
]


def ess(log_weights: jax.Array) -> jax.Array:
    """Effective sample size (Σw)²/Σw² of log-weights (last axis); 0 when all weights are zero."""
    return jnp.vectorize(ess_of, signature="(n)->()")(log_weights)


def log_mean_exp(x: jax.Array, axis: int = -1) -> jax.Array:
    """log((1/n) Σ exp x) along ``axis``, stable."""
    return jax.nn.logsumexp(x, axis=axis) - math.log(x.shape[axis])


def bound(log_Z_samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and standard error of independent log Ẑ runs: a lower bound on log Z from SMC runs, an upper
    bound from conditional-SMC runs pinned to exact σ samples."""
    x = jnp.asarray(log_Z_samples)
    return jnp.mean(x), jnp.std(x, ddof=1) / math.sqrt(x.shape[0]) if x.shape[0] > 1 else jnp.zeros(())


def kl_q_sigma(log_w_under_q: jax.Array, log_Z: jax.Array) -> jax.Array:
    """KL(q‖σ) = log Z − E_q[log w], from one-particle log-weights w = p₀·e^{r/β}/q of samples of q.
    Passing an upper bound of log Z in place of log Z gives an upper bound on the KL."""
    return log_Z - jnp.mean(log_w_under_q)


def kl_sigma_q(log_w_under_sigma: jax.Array, log_Z: jax.Array) -> jax.Array:
    """KL(σ‖q) = E_σ[log w] − log Z, from one-particle log-weights of exact σ samples (or N=1 CSMC runs).
    Passing a lower bound of log Z gives an upper bound on the KL."""
    return jnp.mean(log_w_under_sigma) - log_Z


def tv_distance(p: jax.Array, q: jax.Array) -> jax.Array:
    """Total variation ½ Σ|p − q| between two probability vectors over the same finite support."""
    return 0.5 * jnp.sum(jnp.abs(jnp.asarray(p) - jnp.asarray(q)), axis=-1)


def empirical_pmf(codes: jax.Array, size: int, log_weights: jax.Array | None = None) -> jax.Array:
    """The (weighted) empirical law of integer codes in [0, size)."""
    codes = jnp.asarray(codes)
    if log_weights is None:
        w = jnp.full(codes.shape, 1.0 / codes.shape[0])
    else:
        w = jax.nn.softmax(log_weights)
        w = jnp.where(jnp.isnan(w), 0.0, w)
    return jnp.zeros((size,)).at[codes].add(w)


def _weights(n: int, log_weights):
    if log_weights is None:
        return jnp.full((n,), 1.0 / n)
    return jax.nn.softmax(log_weights)


def _mean_pairwise(x, y, wx, wy, kernel):
    k = kernel(x[:, None, :] - y[None, :, :])
    return jnp.einsum("i,ij,j->", wx, k, wy)


def energy_distance(x, y, log_wx=None, log_wy=None) -> jax.Array:
    """Energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ between (weighted) samples x [n, d] and y [m, d]
    (Székely & Rizzo 2013); zero iff the laws agree. V-statistic form (includes i = j terms)."""
    x, y = jnp.asarray(x).reshape(x.shape[0], -1), jnp.asarray(y).reshape(y.shape[0], -1)
    wx, wy = _weights(x.shape[0], log_wx), _weights(y.shape[0], log_wy)
    norm = lambda d: jnp.sqrt(jnp.sum(d * d, axis=-1) + 1e-30)
    return 2 * _mean_pairwise(x, y, wx, wy, norm) - _mean_pairwise(x, x, wx, wx, norm) - _mean_pairwise(y, y, wy, wy, norm)


def mmd(x, y, bandwidth: float = 1.0, log_wx=None, log_wy=None) -> jax.Array:
    """Squared maximum mean discrepancy with the Gaussian kernel exp(−‖u‖²/(2h²)) (Gretton et al. 2012)."""
    x, y = jnp.asarray(x).reshape(x.shape[0], -1), jnp.asarray(y).reshape(y.shape[0], -1)
    wx, wy = _weights(x.shape[0], log_wx), _weights(y.shape[0], log_wy)
    gauss = lambda d: jnp.exp(-jnp.sum(d * d, axis=-1) / (2 * bandwidth**2))
    return _mean_pairwise(x, x, wx, wx, gauss) + _mean_pairwise(y, y, wy, wy, gauss) - 2 * _mean_pairwise(x, y, wx, wy, gauss)


def frechet_distance(x, y) -> jax.Array:
    """Fréchet distance ‖μx−μy‖² + tr(Σx + Σy − 2(ΣxΣy)^{1/2}) between Gaussian fits of two feature sets
    (the FID formula of Heusel et al. 2017)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    mx, my = x.mean(0), y.mean(0)
    cx, cy = jnp.cov(x, rowvar=False), jnp.cov(y, rowvar=False)
    # tr (Σx Σy)^{1/2} via the eigenvalues of Σx^{1/2} Σy Σx^{1/2}, which are real and ≥ 0.
    ex, vx = jnp.linalg.eigh(cx)
    sx = (vx * jnp.sqrt(jnp.clip(ex, 0))) @ vx.T
    ev = jnp.linalg.eigvalsh(sx @ cy @ sx)
    return jnp.sum((mx - my) ** 2) + jnp.trace(cx) + jnp.trace(cy) - 2 * jnp.sum(jnp.sqrt(jnp.clip(ev, 0)))
