"""RL guidance: mix a base model p₀ and a fine-tuned model q at the token level, then correct it with SMC.

Geometric mix with weight w (classifier-free-guidance-like interpolation/extrapolation of logits):

    m_w(x_t | x_{<t}) ∝ p₀(x_t | x_{<t})^{1−w} · q(x_t | x_{<t})^w .

If q = σ_β (q(x_t|·) = p₀(x_t|·)·ψ_t/ψ_{t−1} with the exact twists ψ_t of σ_β ∝ p₀ e^{r/β}), then
m_w ∝ p₀ · ψ_t^w, a twisted proposal toward σ_{β/w} ∝ p₀ e^{w r/β} — but ψ_t^w ≠ E_{p₀}[e^{w r/β} | x_{≤t}]
(Jensen), so the *sequence* law of m_w is not σ_{β/w} except at w ∈ {0, 1}. :func:`mixed_law` measures how
far it is, by enumeration.

Correction: m_w is the locally optimal proposal of the Feynman–Kac model with potentials

    log ψ̃_t(x_{≤t}) = w · Σ_{s≤t} [log q(x_s | x_{<s}) − log p₀(x_s | x_{<s})],   final potential w·r(x)/β,

whose incremental weight is the local normaliser c_t = Σ_x p₀^{1−w} q^w (and, at the last step,
exp(w r/β)/ψ̃_{T−1}). :func:`guided_smc` runs :func:`pplalign.smc` on ``tilt(p₀, r, β/w)`` with this twist,
so it targets σ_{β/w} exactly: log Ẑ is unbiased on the Z scale and the weighted particles converge to it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from ..programs import Tilted
from ..smc import smc

__all__ = ["GeometricMix", "PairedState", "WithTuned", "MixTwist", "guided_smc", "mixed_law"]


def _log_probs(d: Any) -> jax.Array:
    if not isinstance(d, (dist.CategoricalLogits, dist.CategoricalProbs)):
        raise ValueError(f"RL guidance mixes next-token distributions: transitions must be Categorical; got {type(d).__name__}")
    return jax.nn.log_softmax(d.logits, axis=-1)


class PairedState(NamedTuple):
    base: Any
    tuned: Any
    log_ratio: jax.Array  # [] Σ_{s≤t} log q(x_s|·) − log p₀(x_s|·) of the prefix drawn so far


class _Paired:
    """Runs base and tuned programs side by side on the same tokens."""

    def __init__(self, base: Any, tuned: Any):
        if base.num_steps != tuned.num_steps:
            raise ValueError(f"base and tuned programs differ in num_steps: {base.num_steps} vs {tuned.num_steps}")
        self.base, self.tuned, self.num_steps = base, tuned, base.num_steps

    def init(self, key):
        kb, kq = jax.random.split(key)
        return PairedState(self.base.init(kb), self.tuned.init(kq), jnp.zeros((), jnp.float32))

    def logits(self, state, t):
        lp = _log_probs(self.base.transition(state.base, t))
        lq = _log_probs(self.tuned.transition(state.tuned, t))
        if lp.shape != lq.shape:
            raise ValueError(f"base and tuned vocabularies differ: {lp.shape} vs {lq.shape}")
        return lp, lq

    def update(self, state, x_t, t):
        lp, lq = self.logits(state, t)
        ratio = state.log_ratio + lq[x_t] - lp[x_t]
        return PairedState(self.base.update(state.base, x_t, t), self.tuned.update(state.tuned, x_t, t), ratio)

    def output(self, state):
        return self.base.output(state.base)


class GeometricMix(_Paired):
    """The Sequential program m_w: next-token logits (1−w)·log p₀ + w·log q (renormalised)."""

    def __init__(self, base: Any, tuned: Any, w: float):
        super().__init__(base, tuned)
        self.w = w

    def transition(self, state, t):
        lp, lq = self.logits(state, t)
        return dist.CategoricalLogits(jax.nn.log_softmax((1.0 - self.w) * lp + self.w * lq))


class WithTuned(_Paired):
    """p₀ itself (its transition), with q run alongside so a twist can read log q/p₀ of the prefix."""

    def transition(self, state, t):
        return self.base.transition(state.base, t)


class MixTwist:
    """log ψ̃_t = w·Σ_{s≤t} log(q/p₀)(x_s); ``candidates`` scores every next token at once, which makes
    :func:`pplalign.smc` propose from m_w (the locally optimal proposal of this twist)."""

    def __init__(self, paired: WithTuned, w: float):
        self.paired, self.w = paired, w

    def __call__(self, state: PairedState, t) -> jax.Array:
        return self.w * state.log_ratio

    def candidates(self, state: PairedState, t) -> jax.Array:
        lp, lq = self.paired.logits(state, t)
        return self.w * (state.log_ratio + lq - lp)


def _register(cls, fields, static):
    jax.tree_util.register_pytree_node(
        cls,
        lambda obj: (tuple(getattr(obj, f) for f in fields), tuple(getattr(obj, f) for f in static)),
        lambda aux, ch: _rebuild(cls, fields, static, aux, ch),
    )


def _rebuild(cls, fields, static, aux, children):
    obj = cls.__new__(cls)
    for f, v in zip(fields, children):
        setattr(obj, f, v)
    for f, v in zip(static, aux):
        setattr(obj, f, v)
    return obj


# pytrees, so that the arrays of both models are traced (one compile for many models) and vmappable
_register(GeometricMix, ("base", "tuned", "w"), ("num_steps",))
_register(WithTuned, ("base", "tuned"), ("num_steps",))
_register(MixTwist, ("paired", "w"), ())


def guided_smc(key: jax.Array, base: Any, tuned: Any, reward: Any, beta: float, w: float, num_particles: int, **smc_kwargs):
    """SMC toward σ_{β/w} ∝ p₀·exp(w·r/β) with the RL-guidance mix m_w as proposal (exact as N → ∞)."""
    if not w > 0:
        raise ValueError(f"guidance weight w must be > 0 (σ at β/w); got {w}")
    if not (isinstance(beta, jax.core.Tracer) or float(beta) > 0):
        raise ValueError(f"beta must be > 0; got {beta}")
    paired = WithTuned(base, tuned)
    # Tilted directly: pplalign.tilt's β check calls float() on jnp.asarray(β), which fails under a caller's jit
    target = Tilted(paired, reward, beta / w)
    return smc(key, target, num_particles, twist=MixTwist(paired, w), **smc_kwargs)


def mixed_law(base: Any, tuned: Any, w: float, sequences: jax.Array) -> jax.Array:
    """log m_w(x) of every given sequence [n, T] (replay of the mix program; for exact comparisons)."""
    from .families import replay_token_log_probs

    return jnp.sum(replay_token_log_probs(GeometricMix(base, tuned, w), sequences), axis=-1)
