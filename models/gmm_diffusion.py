"""An exact testbed: the VP (DDPM) diffusion of a Gaussian mixture, with closed-form reverse kernels.

Data: p_data(x) = Σ_k π_k N(x; μ_k, s_k² I) in d dimensions. Forward (variance-preserving) process with a
schedule β_1..β_T and ᾱ_s = ∏_{u≤s} (1 − β_u), ᾱ_0 = 1:

    q(x_s | x_0) = N(√ᾱ_s x_0, (1 − ᾱ_s) I),   so   p_s(x) = Σ_k π_k N(x; √ᾱ_s μ_k, σ²_{k,s} I),
    σ²_{k,s} = ᾱ_s s_k² + 1 − ᾱ_s.

Everything the samplers need is then closed form (Ho et al. 2020 for the forward process; the mixture
posteriors are Gaussian conjugacy component by component):

* the exact reverse kernel p(x_{s−1} | x_s) = Σ_k p(k | x_s) N(x_{s−1}; m_k(x_s), v_k I) with
  p(k | x_s) ∝ π_k N(x_s; √ᾱ_s μ_k, σ²_{k,s} I), v_k = (1/σ²_{k,s−1} + (1−β_s)/β_s)⁻¹ and
  m_k = v_k (√ᾱ_{s−1} μ_k / σ²_{k,s−1} + √(1−β_s) x_s / β_s). Started from the exact time-T marginal,
  ancestral sampling ends *exactly* at p_data;
* the posterior x_0 | x_s = Σ_k p(k | x_s) N(x_0; m⁰_k, v⁰_k I), v⁰_k = (1/s_k² + ᾱ_s/(1−ᾱ_s))⁻¹,
  m⁰_k = v⁰_k (μ_k/s_k² + √ᾱ_s x_s/(1−ᾱ_s)); its mean is the optimal denoiser E[x_0 | x_s];
* for the quadratic reward r(x) = −γ‖x − c‖² and a = γ/β, the tilted target p_data·exp(r/β)/Z is the mixture
  with weights ∝ π_k Z_k, Z_k = (1 + 2a s_k²)^{−d/2} exp(−a‖μ_k − c‖²/(1 + 2a s_k²)), variances
  s_k²/(1 + 2a s_k²), means (μ_k + 2a s_k² c)/(1 + 2a s_k²), and Z = Σ_k π_k Z_k;
* the exact soft value log ψ_s(x_s) = log E[exp(r(x_0)/β) | x_s]
  = log Σ_k p(k|x_s) (1 + 2a v⁰_k)^{−d/2} exp(−a‖m⁰_k − c‖²/(1 + 2a v⁰_k)), the optimal twist
  (Zhao et al. 2024; Wu et al. 2023, TDS). Because the forward process does not depend on the reward, the
  tilted path law is the VP diffusion of the tilted mixture: :meth:`GMMDiffusion.tilted` builds it, and its
  reverse kernels are the locally optimal (twisted) proposals.

As a pplalign ``Sequential`` program, step t (t = 0..T−1) goes from diffusion time T−t to T−t−1; the state
carries x and its diffusion time, and ``output`` is x_0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .diffusion.schedule import alpha_bars_of, vp_betas

__all__ = [
    "GMMState",
    "GMMDiffusion",
    "GMMDenoiser",
    "QuadraticReward",
    "SoftValueTwist",
    "TiltedMixture",
    "vp_betas",
    "alpha_bars_of",
    "ring_mixture",
    "two_mode_problem",
]


class GMMState(NamedTuple):
    x: jax.Array  # [d] the current point x_s
    time: jax.Array  # [] int32 diffusion time s (T at init, 0 after the last step)


class TiltedMixture(NamedTuple):
    """A Gaussian mixture Σ_k w_k N(means_k, variances_k I), with log Z of the tilt that produced it."""

    log_weights: jax.Array  # [K] normalised
    means: jax.Array  # [K, d]
    variances: jax.Array  # [K]
    log_Z: jax.Array  # []


def _log_normal_iso(x, mean, var):
    """log N(x; mean, var·I) for x [d], mean [K, d], var [K] → [K]."""
    d = x.shape[-1]
    sq = jnp.sum((x - mean) ** 2, axis=-1)
    return -0.5 * (d * jnp.log(2 * jnp.pi * var) + sq / var)


def _gaussian_tilt(mean, var, center, a, d):
    """log E[exp(−a‖X − c‖²)] for X ~ N(mean, var·I) in d dims, elementwise over components."""
    denom = 1.0 + 2.0 * a * var
    return -0.5 * d * jnp.log(denom) - a * jnp.sum((mean - center) ** 2, axis=-1) / denom


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMDiffusion:
    """The exact reverse process of a Gaussian mixture under a VP schedule, as a ``Sequential`` program.

    Fields: ``log_pi`` [K] (normalised log mixture weights), ``means`` [K, d], ``stds`` [K] (isotropic),
    ``betas`` [T]; ``num_steps`` = T is static.
    """

    log_pi: jax.Array
    means: jax.Array
    stds: jax.Array
    betas: jax.Array
    alpha_bars: jax.Array  # [T+1] ᾱ_0 = 1, ᾱ_s = ∏_{u≤s}(1 − β_u); stored, not recomputed inside samplers
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def create(weights, means, stds, num_steps: int, betas=None) -> "GMMDiffusion":
        """Validate and build. ``weights`` need not be normalised; ``stds`` may be a scalar."""
        means = jnp.asarray(means, jnp.float32)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d]; got {means.shape}")
        k = means.shape[0]
        weights = jnp.asarray(weights, jnp.float32)
        stds = jnp.broadcast_to(jnp.asarray(stds, jnp.float32), (k,))
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},); got {weights.shape}")
        if not bool(jnp.all(weights > 0)) or not bool(jnp.all(stds > 0)):
            raise ValueError("mixture weights and component stds must be > 0")
        betas = vp_betas(num_steps) if betas is None else jnp.asarray(betas, jnp.float32)
        if betas.shape != (num_steps,):
            raise ValueError(f"betas must have shape ({num_steps},); got {betas.shape}")
        if not bool(jnp.all((betas > 0) & (betas < 1))):
            raise ValueError("every beta_s must lie in (0, 1)")
        log_pi = jnp.log(weights) - jnp.log(jnp.sum(weights))
        return GMMDiffusion(log_pi, means, stds, betas, alpha_bars_of(betas), num_steps)

    # --- schedule ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def event_shape(self) -> tuple:
        return (self.dim,)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def diffusion_time(self, t) -> jax.Array:
        """Diffusion time *after* program step t: T − t − 1."""
        return self.num_steps - 1 - jnp.asarray(t, jnp.int32)

    # --- closed-form marginals and posteriors ----------------------------------------------------
    def marginal_variances(self, s) -> jax.Array:
        """[K] σ²_{k,s} = ᾱ_s s_k² + 1 − ᾱ_s."""
        ab = self.alpha_bars[s]
        return ab * self.stds**2 + (1.0 - ab)

    def component_logits(self, x, s) -> jax.Array:
        """[K] log p(k | x_s) up to a constant: log π_k + log N(x; √ᾱ_s μ_k, σ²_{k,s} I)."""
        ab = self.alpha_bars[s]
        return self.log_pi + _log_normal_iso(x, jnp.sqrt(ab) * self.means, self.marginal_variances(s))

    def log_marginal(self, x, s) -> jax.Array:
        """log p_s(x), the exact density of x_s (s = 0 gives p_data)."""
        return jax.nn.logsumexp(self.component_logits(x, s))

    def score(self, x, s) -> jax.Array:
        """∇ log p_s(x)."""
        return jax.grad(self.log_marginal)(x, s)

    def reverse_kernel(self, x, s) -> tuple[jax.Array, jax.Array, jax.Array]:
        """p(x_{s−1} | x_s = x) as (logits [K], means [K, d], variances [K]); s in 1..T."""
        ab = self.alpha_bars
        beta = self.betas[s - 1]
        prev_var = ab[s - 1] * self.stds**2 + (1.0 - ab[s - 1])
        v = 1.0 / (1.0 / prev_var + (1.0 - beta) / beta)
        m = v[:, None] * (jnp.sqrt(ab[s - 1]) * self.means / prev_var[:, None] + jnp.sqrt(1.0 - beta) * x / beta)
        return self.component_logits(x, s), m, v

    def posterior_x0(self, x, s) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x_0 | x_s = x as a mixture (logits [K], means [K, d], variances [K]); at s = 0 it is a point mass."""
        ab = self.alpha_bars[s]
        noise = 1.0 - ab
        at_zero = noise <= 0.0
        safe_noise = jnp.where(at_zero, 1.0, noise)
        prec = 1.0 / self.stds**2 + ab / safe_noise
        v = jnp.where(at_zero, 0.0, 1.0 / prec)
        m = (self.means / self.stds[:, None] ** 2 + jnp.sqrt(ab) * x / safe_noise) / prec[:, None]
        m = jnp.where(at_zero, jnp.broadcast_to(x, m.shape), m)
        return self.component_logits(x, s), m, v

    def denoise(self, x, s) -> jax.Array:
        """The optimal (MMSE) denoiser E[x_0 | x_s = x]."""
        logits, m, _ = self.posterior_x0(x, s)
        return jnp.sum(jax.nn.softmax(logits)[:, None] * m, axis=0)

    def denoiser(self) -> "GMMDenoiser":
        """The exact denoiser as a pytree callable ``(x, s) -> E[x_0 | x_s]`` for generic DDPM programs."""
        return GMMDenoiser(self)

    def log_soft_value(self, x, s, reward: "QuadraticReward", beta) -> jax.Array:
        """log ψ_s(x) = log E[exp(r(x_0)/β) | x_s = x] for r(x) = −γ‖x − c‖² (equals r(x)/β at s = 0)."""
        logits, m, v = self.posterior_x0(x, s)
        a = reward.gamma / beta
        log_terms = _gaussian_tilt(m, v, reward.center, a, self.dim)
        return jax.nn.logsumexp(jax.nn.log_softmax(logits) + log_terms)

    def sample_marginal(self, key, num: int, s, return_components: bool = False):
        """[num, d] exact draws of x_s (s = 0: p_data); with ``return_components`` also the labels."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.categorical(k1, self.log_pi, shape=(num,))
        ab = self.alpha_bars[s]
        std = jnp.sqrt(self.marginal_variances(s))[comp]
        x = jnp.sqrt(ab) * self.means[comp] + std[:, None] * jax.random.normal(k2, (num, self.dim))
        return (x, comp) if return_components else x

    def sample_data(self, key, num: int, return_components: bool = False):
        return self.sample_marginal(key, num, 0, return_components)

    # --- the Sequential protocol ------------------------------------------------------------------
    def init(self, key: jax.Array) -> GMMState:
        """x_T from the exact time-T marginal (not N(0, I): exactness does not rely on ᾱ_T ≈ 0)."""
        x = self.sample_marginal(key, 1, self.num_steps)[0]
        return GMMState(x, jnp.asarray(self.num_steps, jnp.int32))

    def transition(self, state: GMMState, t) -> dist.MixtureSameFamily:
        """The exact reverse kernel p(x_{s−1} | x_s), s = state.time = T − t."""
        logits, m, v = self.reverse_kernel(state.x, state.time)
        scale = jnp.broadcast_to(jnp.sqrt(v)[:, None], m.shape)
        return dist.MixtureSameFamily(dist.CategoricalLogits(logits), dist.Normal(m, scale).to_event(1))

    def update(self, state: GMMState, x_t, t) -> GMMState:
        return GMMState(jnp.asarray(x_t, jnp.float32), state.time - 1)

    def output(self, state: GMMState) -> jax.Array:
        return state.x

    # --- what potentials and guidance read (pplalign.potentials / pplalign.guidance) ------------------
    def denoised(self, state: GMMState) -> jax.Array:
        """E[x_0 | x_s] of the state (closed form; no network)."""
        return self.denoise(state.x, state.time)

    def reverse_moments(self, state: GMMState, t) -> tuple[jax.Array, jax.Array]:
        """Mean E[x_{s−1} | x_s] and the per-coordinate variance of the exact reverse kernel (its isotropic
        moment match), the Gaussian that guided proposals shift."""
        logits, m, v = self.reverse_kernel(state.x, state.time)
        w = jax.nn.softmax(logits)
        mean = jnp.sum(w[:, None] * m, axis=0)
        second = jnp.sum(w * (v + jnp.sum(m * m, axis=-1) / self.dim))
        return mean, second - jnp.sum(mean * mean) / self.dim

    # --- the tilted target --------------------------------------------------------------------------
    def exact_tilted_target(self, center, gamma, beta) -> TiltedMixture:
        """p_data(x)·exp(−γ‖x − c‖²/β)/Z in closed form (weights, means, variances) and log Z."""
        center = jnp.asarray(center, jnp.float32)
        if center.shape != (self.dim,):
            raise ValueError(f"center must have shape ({self.dim},); got {center.shape}")
        a = jnp.asarray(gamma, jnp.float32) / jnp.asarray(beta, jnp.float32)
        var = self.stds**2
        log_mass = self.log_pi + _gaussian_tilt(self.means, var, center, a, self.dim)
        log_Z = jax.nn.logsumexp(log_mass)
        denom = 1.0 + 2.0 * a * var
        means = (self.means + 2.0 * a * var[:, None] * center) / denom[:, None]
        return TiltedMixture(log_mass - log_Z, means, var / denom, log_Z)

    def tilted(self, center, gamma, beta) -> "GMMDiffusion":
        """The VP diffusion of the tilted mixture: its reverse kernels are p(x_{s−1}|x_s)ψ_{s−1}/ψ_s, the
        locally optimal proposals of twisted SMC for this reward, and its init is the tilted time-T law."""
        tm = self.exact_tilted_target(center, gamma, beta)
        return GMMDiffusion(tm.log_weights, tm.means, jnp.sqrt(tm.variances), self.betas, self.alpha_bars, self.num_steps)

    def sample_tilted(self, key, num: int, center, gamma, beta, return_components: bool = False):
        """[num, d] exact draws from the tilted target."""
        return self.tilted(center, gamma, beta).sample_data(key, num, return_components)

    def soft_value_twist(self, reward: "QuadraticReward", beta) -> "SoftValueTwist":
        return SoftValueTwist(self, reward, jnp.asarray(beta, jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMDenoiser:
    """``denoiser(x, s) = E[x_0 | x_s = x]`` of a :class:`GMMDiffusion` (the optimal denoiser)."""

    model: GMMDiffusion

    @property
    def event_shape(self) -> tuple:
        return (self.model.dim,)

    def __call__(self, x, s) -> jax.Array:
        return self.model.denoise(x, s)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuadraticReward:
    """r(x) = −γ‖x − c‖²."""

    center: jax.Array  # [d]
    gamma: jax.Array  # []

    @staticmethod
    def create(center, gamma) -> "QuadraticReward":
        gamma = jnp.asarray(gamma, jnp.float32)
        if gamma.ndim != 0 or not float(gamma) > 0:
            raise ValueError(f"gamma must be a positive scalar; got {gamma}")
        return QuadraticReward(jnp.asarray(center, jnp.float32), gamma)

    def __call__(self, x) -> jax.Array:
        return -self.gamma * jnp.sum((jnp.asarray(x) - self.center) ** 2, axis=-1)

    def log_gaussian_expectation(self, mean, var, beta) -> jax.Array:
        """log E_{x ~ N(mean, var·I)}[exp(r(x)/β)] in closed form: with a = 2γ/β,
        −(d/2)·log(1 + a·var) − a‖mean − c‖²/(2(1 + a·var)) (used by ``pplalign.potentials.GaussianPosteriorTwist``)."""
        a = 2.0 * self.gamma / beta
        d = self.center.shape[-1]
        scale = 1.0 + a * var
        return -0.5 * d * jnp.log(scale) - 0.5 * a * jnp.sum((jnp.asarray(mean) - self.center) ** 2, axis=-1) / scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftValueTwist:
    """The exact twist for ``pplalign.smc``: ``twist(state, t)`` = log ψ at the state after step t, i.e.
    log E[exp(r(x_0)/β) | x_s] at s = state.time = T − t − 1; at the last step (s = 0) it is r(x_0)/β."""

    model: GMMDiffusion
    reward: QuadraticReward
    beta: jax.Array

    def __call__(self, state: GMMState, t) -> jax.Array:
        return self.model.log_soft_value(state.x, state.time, self.reward, self.beta)

    def at(self, x, s) -> jax.Array:
        """log ψ_s(x) by diffusion time."""
        return self.model.log_soft_value(x, s, self.reward, self.beta)

    def log_psi_at(self, x, s, t) -> jax.Array:
        """The guidance interface of pplalign.guidance (the step index t is not needed)."""
        return self.at(x, s)


def ring_mixture(num_components: int = 8, radius: float = 4.0, std: float = 0.5, num_steps: int = 100, betas=None):
    """Equal-weight components evenly spaced on a circle in 2-D (component k at angle 2πk/K)."""
    angles = 2 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return GMMDiffusion.create(np.ones(num_components), means, std, num_steps, betas)


def two_mode_problem(
    num_components: int = 8,
    radius: float = 4.0,
    std: float = 0.5,
    num_steps: int = 100,
    gamma: float = 1.0,
    beta: float = 1.0,
    betas=None,
):
    """A ring mixture and a quadratic reward centred on the ring midway between components 0 and 1.

    By the mirror symmetry about the bisecting ray, the tilted target gives components 0 and 1 equal mass
    (and every other mirror pair equal mass too); the larger γ/β, the closer the target is to two modes of
    mass 1/2 each. Returns (model, reward, beta); ``model.exact_tilted_target(reward.center, reward.gamma,
    beta)`` is the exact answer.
    """
    model = ring_mixture(num_components, radius, std, num_steps, betas)
    angle = np.pi / num_components
    center = radius * np.array([math.cos(angle), math.sin(angle)])
    return model, QuadraticReward.create(center, gamma), float(beta)
