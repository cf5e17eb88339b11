"""Feynman–Kac steering of diffusion programs: intermediate potentials from the reward of the denoised estimate.

Feynman–Kac steering (Singhal et al. 2025) runs SMC on the reverse diffusion with potentials G_t built from
r(x̂_0(x_s)), the reward of the denoised estimate of the current point. In pplalign's terms a potential is a
twist ψ_t scored on the state after step t, and :func:`pplalign.smc` weights step t by ψ_t/ψ_{t−1} and the last
step by exp(r(x_0)/β)/ψ_{T−2}, so the product of the weights is exp(r(x_0)/β) whatever ψ is: **the target stays
exactly σ ∝ p₀·exp(r/β)**; the potentials only decide which particles survive resampling.

* difference potential: log ψ_t = λ_t · r(x̂_0(x_{s_t}))/β, so G_t = exp(λ_t r_t/β − λ_{t−1} r_{t−1}/β);
* max potential: log ψ_t = λ_t · max_{u≤t} r(x̂_0^{(u)})/β, the best reward seen along the path, carried in the
  state by the :class:`RunningMax` wrapper program.

λ_t ∈ [0, 1] tempers the intermediate potentials (λ ≡ 1: the denoised reward as a plug-in soft value, the twist
of TDS, Wu et al. 2023). On the exact Gaussian-mixture testbed the oracle potential is the exact soft value
(``models.gmm_diffusion.SoftValueTwist``), for which every weight of twisted SMC with optimal proposals is 1.

What a program must provide (``models.diffusion.DDPM`` and ``models.gmm_diffusion.GMMDiffusion`` do):
``denoised(state) -> x̂_0`` of the current state (read from a cache: no extra network evaluation), and for
gradient guidance (:mod:`pplalign.guidance`) ``denoise(x, s)``, ``reverse_moments(state, t) -> (mean, var)``
and states with fields ``x`` (the current point) and ``time`` (its diffusion time).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import resampling as resampling_lib
from .particles import Particles
from .programs import Tilted, tilt
from .smc import smc

__all__ = ["DenoisedRewardTwist", "RunningMax", "RunningMaxState", "MaxTwist", "lambda_schedule", "fk_steering"]


def lambda_schedule(num_steps: int, lambdas: Any = None) -> jax.Array:
    """[num_steps] λ_t: None → ones; a scalar → constant; an array of length num_steps as given."""
    if lambdas is None:
        return jnp.ones((num_steps,), jnp.float32)
    lam = jnp.asarray(lambdas, jnp.float32)
    if lam.ndim == 0:
        lam = jnp.full((num_steps,), lam)
    if lam.shape != (num_steps,):
        raise ValueError(f"lambdas must be a scalar or have shape ({num_steps},); got {lam.shape}")
    if not isinstance(lam, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(lam) & (lam >= 0))):
        raise ValueError("lambdas must be finite and >= 0")
    return lam


def _require(base: Any, *names: str) -> None:
    missing = [n for n in names if not hasattr(base, n)]
    if missing:
        raise ValueError(f"{type(base).__name__} lacks {missing}, which diffusion potentials need (see pplalign.potentials)")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenoisedRewardTwist:
    """The difference potential: log ψ_t(state) = λ_t · r(base.denoised(state))/β."""

    base: Any
    reward: Callable
    beta: jax.Array
    lambdas: jax.Array  # [num_steps]

    def __call__(self, state, t) -> jax.Array:
        return self.lambdas[t] * jnp.asarray(self.reward(self.base.denoised(state))) / self.beta

    def log_psi_at(self, x, s, t) -> jax.Array:
        """log ψ_t as a differentiable function of the point x at diffusion time s (guidance; one NFE)."""
        return self.lambdas[t] * jnp.asarray(self.reward(self.base.denoise(x, s))) / self.beta


class RunningMaxState(NamedTuple):
    inner: Any  # the wrapped program's state
    best: jax.Array  # [] max over past steps of r(x̂_0)/β (−inf before step 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningMax:
    """A program identical to ``base`` whose state also carries max_{u≤t} r(x̂_0^{(u)})/β (for the max potential).

    Its path law and output are those of ``base``: tilting it by the same reward gives the same target.
    """

    base: Any
    reward: Callable
    beta: jax.Array
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    def init(self, key):
        return RunningMaxState(self.base.init(key), jnp.asarray(-jnp.inf, jnp.float32))

    def transition(self, state: RunningMaxState, t):
        return self.base.transition(state.inner, t)

    def update(self, state: RunningMaxState, x_t, t) -> RunningMaxState:
        inner = self.base.update(state.inner, x_t, t)
        value = jnp.asarray(self.reward(self.base.denoised(inner)), jnp.float32) / self.beta
        return RunningMaxState(inner, jnp.maximum(state.best, value))

    def output(self, state: RunningMaxState):
        return self.base.output(state.inner)

    def denoised(self, state: RunningMaxState):
        return self.base.denoised(state.inner)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaxTwist:
    """The max potential on a :class:`RunningMax` program: log ψ_t = λ_t · state.best."""

    lambdas: jax.Array

    def __call__(self, state: RunningMaxState, t) -> jax.Array:
        return self.lambdas[t] * state.best


def fk_steering(
    key: jax.Array,
    target: Tilted,
    num_particles: int,
    *,
    potential: str = "difference",
    lambdas: Any = None,
    resampling: Callable = resampling_lib.systematic,
    ess_threshold: float = 0.5,
) -> Particles:
    """Feynman–Kac steering SMC on a tilted diffusion program (Singhal et al. 2025), compiled end to end.

    ``potential``: 'difference' (ψ_t = exp(λ_t r(x̂_0)/β)) or 'max' (ψ_t = exp(λ_t max_{u≤t} r(x̂_0^{(u)})/β)).
    The final weight exp(r/β)/ψ_{T−2} keeps the target exact (see the module docstring). NFE = N·T: the
    potentials read the program's cached x̂_0.
    """
    if not isinstance(target, Tilted):
        raise ValueError(f"target must come from pplalign.tilt; got {type(target).__name__}")
    base = target.base
    _require(base, "denoised")
    lam = lambda_schedule(target.num_steps, lambdas)
    if potential == "difference":
        twist = DenoisedRewardTwist(base, target.reward, target.beta, lam)
        return smc(key, target, num_particles, twist=twist, resampling=resampling, ess_threshold=ess_threshold)
    if potential == "max":
        wrapped = RunningMax(base, target.reward, target.beta, target.num_steps)
        return smc(key, tilt(wrapped, target.reward, target.beta), num_particles, twist=MaxTwist(lam),
                   resampling=resampling, ess_threshold=ess_threshold)
    raise ValueError(f"potential must be 'difference' or 'max'; got {potential!r}")
