"""Small flax.nnx networks: an ε-prediction MLP denoiser with a sinusoidal time embedding (optionally
class-conditional, with a null class for classifier-free use) and an MLP classifier whose log p(c|x) is a reward
and whose penultimate features serve the Fréchet distance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["sinusoidal_embedding", "MLPDenoiser", "EpsDenoiser", "MLPClassifier", "ClassifierReward"]


def sinusoidal_embedding(s: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """[..., dim] sin/cos features of the (float) time s at geometric frequencies (Vaswani et al. 2017; the
    time embedding of Ho et al. 2020)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(s, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class MLPDenoiser(nnx.Module):
    """ε̂(x_s, s, c): an MLP on [x, emb(s), emb(c)] with SiLU activations and residual hidden blocks.

    ``num_classes`` > 0 adds a label embedding with one extra *null* label (index ``num_classes``) used for
    unconditional prediction (label dropout in training gives classifier-free guidance its two heads).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32, num_classes: int = 0,
                 *, rngs: nnx.Rngs):
        self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
        self.inp = nnx.Linear(dim + time_dim, hidden, rngs=rngs)
        self.label = nnx.Embed(num_classes + 1, hidden, rngs=rngs) if num_classes > 0 else None
        self.blocks = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(depth)])
        self.out = nnx.Linear(hidden, dim, rngs=rngs, kernel_init=nnx.initializers.zeros)

    def __call__(self, x: jax.Array, s: jax.Array, label: jax.Array | None = None) -> jax.Array:
        emb = sinusoidal_embedding(s, self.time_dim)
        emb = jnp.broadcast_to(emb, x.shape[:-1] + emb.shape[-1:])
        h = self.inp(jnp.concatenate([x, emb], axis=-1))
        if self.label is not None:
            lab = jnp.full(x.shape[:-1], self.num_classes, jnp.int32) if label is None else label
            h = h + self.label(jnp.where(lab < 0, self.num_classes, lab))
        for block in self.blocks:
            h = h + block(nnx.silu(h))
        return self.out(nnx.silu(h))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EpsDenoiser:
    """``(x, s) -> x̂_0 = (x − √(1−ᾱ_s) ε̂)/√ᾱ_s`` from an ε-prediction network (the posterior-mean denoiser
    by Tweedie's formula). ``label`` ≥ 0 conditions on a class (−1: unconditional, the null label); a static
    ``guidance`` w ≠ 0 applies classifier-free guidance ε̂ = (1 + w) ε̂(x, c) − w ε̂(x, ∅) (Ho & Salimans 2022),
    at two network calls per evaluation; ``clip`` bounds x̂_0
    (the data range), or None. Flattened images are handled by ``event_shape``.
    """

    net: Any
    alpha_bars: jax.Array
    label: jax.Array
    event_shape: tuple = dataclasses.field(metadata=dict(static=True))
    clip: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    guidance: float = dataclasses.field(default=0.0, metadata=dict(static=True))  # 0: one network call

    def eps(self, x: jax.Array, s: jax.Array) -> jax.Array:
        flat = x.reshape(x.shape[: x.ndim - len(self.event_shape)] + (-1,))
        scaled_s = jnp.asarray(s, jnp.float32) * (1000.0 / (self.alpha_bars.shape[0] - 1))
        if getattr(self.net, "num_classes", 0) > 0:
            e = self.net(flat, scaled_s, jnp.broadcast_to(self.label, flat.shape[:-1]))
            if self.guidance != 0.0:
                e = e + self.guidance * (e - self.net(flat, scaled_s, None))
        else:
            e = self.net(flat, scaled_s)
        return e.reshape(x.shape)

    def __call__(self, x: jax.Array, s: jax.Array) -> jax.Array:
        ab = self.alpha_bars[s]
        x0 = (x - jnp.sqrt(1.0 - ab) * self.eps(x, s)) / jnp.sqrt(ab)
        return x0 if self.clip is None else jnp.clip(x0, -self.clip, self.clip)

    def with_label(self, label, guidance: float | None = None) -> "EpsDenoiser":
        g = self.guidance if guidance is None else float(guidance)
        return dataclasses.replace(self, label=jnp.asarray(label, jnp.int32), guidance=g)


class MLPClassifier(nnx.Module):
    """logits(x) of an MLP with SiLU; ``features(x)`` is the last hidden layer (for Fréchet distances)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 2, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(dim if i == 0 else hidden, hidden, rngs=rngs) for i in range(depth)])
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.layers:
            h = nnx.silu(layer(h))
        return h

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassifierReward:
    """r(x) = log Σ_{c ∈ C} p(c | x): the log-probability that x belongs to the set of classes C (one digit,
    or e.g. all even digits), from a classifier's softmax. ``mask`` [num_classes] is 1 on C."""

    classifier: Any
    mask: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        log_p = jax.nn.log_softmax(self.classifier(x), axis=-1)
        return jax.nn.logsumexp(jnp.where(self.mask > 0, log_p, -jnp.inf), axis=-1)
