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

__all__ = [
    "DenoisedRewardTwist",
    "GaussianPosteriorTwist",
    "posterior_variance",
    "RunningMax",
    "RunningMaxState",
    "MaxTwist",
    "lambda_schedule",
    "fk_steering",
]


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


def posterior_variance(alpha_bar, data_variance=None) -> jax.Array:
    """Per-coordinate variance v_s of x_0 | x_s under a Gaussian data prior N(·, s²I) for the VP forward
    x_s = √ᾱ_s x_0 + √(1 − ᾱ_s) ε:  v_s = s²(1 − ᾱ_s)/(ᾱ_s s² + 1 − ᾱ_s) (the ΠGDM choice, Song et al. 2023);
    ``data_variance=None`` is the flat-prior limit (1 − ᾱ_s)/ᾱ_s. v_0 = 0 (ᾱ_0 = 1)."""
    ab = jnp.asarray(alpha_bar, jnp.float32)
    noise = 1.0 - ab
    if data_variance is None:
        return noise / ab
    s2 = jnp.asarray(data_variance, jnp.float32)
    return s2 * noise / (ab * s2 + noise)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianPosteriorTwist:
    """A soft-value guess that smooths the reward over the denoiser's uncertainty:

        log ψ̃_t(x_s) = log E_{x_0 ~ N(x̂_0(x_s), v_s I)}[exp(r(x_0)/β)],   v_s = :func:`posterior_variance`,

    i.e. the exact soft value log E[exp(r(x_0)/β) | x_s] with p(x_0 | x_s) replaced by the Gaussian with the
    denoiser's mean and a prior-based variance (ΠGDM, Song et al. 2023; the Gaussian moment projection of
    Boys et al. 2023). At s = 0 it is r(x_0)/β. The denoised-mean reward r(x̂_0)/β of FK steering is the
    v_s = 0 limit: it states a certainty the denoiser does not have at high noise, so it over-rewards points
    whose posterior straddles two distant modes; smoothing by v_s removes most of that (see docs/dts.md).

    The expectation is in closed form when the reward has ``log_gaussian_expectation(mean, var, beta)``
    (``models.gmm_diffusion.QuadraticReward`` does), else a Monte Carlo average over the fixed antithetic
    standard-normal draws ``draws`` (made by :meth:`create`; fixed, so ψ̃ is a deterministic function of the
    state, as DTS's value-blind growth needs). It reads the program's cached x̂_0 (``denoised``), its
    ``alpha_bars`` and the state's diffusion ``time``: no network evaluation.
    """

    base: Any
    reward: Callable
    beta: jax.Array
    data_variance: Any  # [] or None
    draws: Any  # [K, *event] standard normals, or None for the closed form

    @staticmethod
    def create(base, reward, beta, data_variance=None, num_draws: int = 64, seed: int = 0) -> "GaussianPosteriorTwist":
        _require(base, "denoised", "alpha_bars")
        if data_variance is not None and not float(data_variance) > 0:
            raise ValueError(f"data_variance must be > 0 (or None for the flat-prior limit); got {data_variance}")
        draws = None
        if not hasattr(reward, "log_gaussian_expectation"):
            if num_draws < 2 or num_draws % 2:
                raise ValueError(f"num_draws must be an even number >= 2 (antithetic pairs); got {num_draws}")
            try:
                shape = tuple(base.event_shape)
            except (AttributeError, ValueError, TypeError):
                shape = ()
            if not shape:
                raise ValueError(f"{type(base).__name__} lacks event_shape, which the Monte Carlo draws need")
            half = jax.random.normal(jax.random.PRNGKey(seed), (num_draws // 2, *shape), jnp.float32)
            draws = jnp.concatenate([half, -half], axis=0)
        dv = None if data_variance is None else jnp.asarray(data_variance, jnp.float32)
        return GaussianPosteriorTwist(base, reward, jnp.asarray(beta, jnp.float32), dv, draws)

    def log_psi(self, mean, var) -> jax.Array:
        """log E_{N(mean, var·I)}[exp(r(x)/β)]."""
        if self.draws is None:
            return jnp.asarray(self.reward.log_gaussian_expectation(mean, var, self.beta))
        xs = mean[None] + jnp.sqrt(var) * self.draws
        values = jax.vmap(lambda x: jnp.asarray(self.reward(x), jnp.float32))(xs) / self.beta
        return jax.nn.logsumexp(values) - jnp.log(values.shape[0])

    def _smoothed(self, x0_hat, s) -> jax.Array:
        return self.log_psi(x0_hat, posterior_variance(self.base.alpha_bars[s], self.data_variance))

    def __call__(self, state, t) -> jax.Array:
        return self._smoothed(self.base.denoised(state), state.time)

    def log_psi_at(self, x, s, t) -> jax.Array:
        """log ψ̃ as a differentiable function of the point x at diffusion time s (the guidance interface of
        :mod:`pplalign.guidance`, e.g. ``tds(..., twist=this)``; one denoiser evaluation)."""
        return self._smoothed(self.base.denoise(x, s), s)


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
