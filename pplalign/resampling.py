"""Resamplers: ``(key, log_weights, num) -> ancestor indices`` (int32 [num]).

Each is unbiased: E[#copies of i] = num · w_i with w = softmax(log_weights) (Douc & Cappé 2005).
Inverse-CDF resamplers clip their indices to the last particle of positive weight, because float32
cumulative sums can end below 1 and ``searchsorted`` would then return N, or a trailing zero-weight index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["multinomial", "stratified", "systematic", "residual", "normalize", "resolve"]


def normalize(log_weights: jax.Array) -> jax.Array:
    """softmax(log_weights); all −inf gives the uniform law (callers must not resample such weights)."""
    m = jnp.max(log_weights)
    finite = jnp.isfinite(m)
    w = jnp.exp(log_weights - jnp.where(finite, m, 0.0))
    w = jnp.where(finite, w, 1.0)
    return w / jnp.sum(w)


def _inverse_cdf(log_weights: jax.Array, u: jax.Array) -> jax.Array:
    w = normalize(log_weights)
    cdf = jnp.cumsum(w)
    idx = jnp.searchsorted(cdf, u, side="right")
    n = w.shape[0]
    last_positive = n - 1 - jnp.argmax((w > 0)[::-1])
    return jnp.clip(idx, 0, last_positive).astype(jnp.int32)


def multinomial(key: jax.Array, log_weights: jax.Array, num: int) -> jax.Array:
    """i.i.d. draws from Categorical(w)."""
    lw = jnp.log(normalize(log_weights))
    return jax.random.categorical(key, lw, shape=(num,)).astype(jnp.int32)


def stratified(key: jax.Array, log_weights: jax.Array, num: int) -> jax.Array:
    """One uniform in each stratum [(i)/num, (i+1)/num)."""
    u = (jnp.arange(num) + jax.random.uniform(key, (num,))) / num
    return _inverse_cdf(log_weights, u)


def systematic(key: jax.Array, log_weights: jax.Array, num: int) -> jax.Array:
    """One shared uniform offset: u_i = (i + U)/num."""
    u = (jnp.arange(num) + jax.random.uniform(key, ())) / num
    return _inverse_cdf(log_weights, u)


def residual(key: jax.Array, log_weights: jax.Array, num: int) -> jax.Array:
    """floor(num·w_i) deterministic copies, the remainder drawn multinomially from the residual weights."""
    w = normalize(log_weights)
    scaled = num * w
    counts = jnp.floor(scaled).astype(jnp.int32)
    deterministic = jnp.repeat(jnp.arange(w.shape[0], dtype=jnp.int32), counts, total_repeat_length=num)
    num_deterministic = jnp.sum(counts)
    res = jnp.clip(scaled - counts, 0.0)
    log_res = jnp.where(res > 0, jnp.log(jnp.where(res > 0, res, 1.0)), -jnp.inf)
    log_res = jnp.where(jnp.any(res > 0), log_res, jnp.log(w))
    drawn = jax.random.categorical(key, log_res, shape=(num,)).astype(jnp.int32)
    return jnp.where(jnp.arange(num) < num_deterministic, deterministic, drawn)


BY_NAME = {"multinomial": multinomial, "stratified": stratified, "systematic": systematic, "residual": residual}


def resolve(resampling):
    """A resampler given as a function or by name (``"systematic"``, …); a ValueError for anything else."""
    if isinstance(resampling, str):
        if resampling not in BY_NAME:
            raise ValueError(f"resampling must be a resampler or one of {sorted(BY_NAME)}; got {resampling!r}")
        return BY_NAME[resampling]
    if not callable(resampling):
        raise ValueError(f"resampling must be a resampler (key, log_weights, num) -> indices or a name; got {resampling!r}")
    return resampling
