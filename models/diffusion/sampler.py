"""The reverse process of a VP diffusion over any denoiser, as a pplalign ``Sequential`` program.

Given a denoiser x̂_0(x_s, s) ≈ E[x_0 | x_s] and ε̂ = (x_s − √ᾱ_s x̂_0)/√(1 − ᾱ_s), one step from time s to an
earlier time s' (consecutive for DDPM, strided for DDIM) is the DDIM kernel (Song, Meng & Ermon 2021, eq. 12)

    x_{s'} ~ N( √ᾱ_{s'} x̂_0 + √(1 − ᾱ_{s'} − σ²) ε̂ ,  σ² I ),
    σ² = η² (1 − ᾱ_{s'})/(1 − ᾱ_s) · (1 − ᾱ_s/ᾱ_{s'}).

With η = 1 on consecutive steps σ² is the DDPM posterior variance β̃_s and the mean is that of
q(x_{s−1} | x_s, x_0 = x̂_0) (Ho et al. 2020): DDPM is DDIM with η = 1 and stride 1. Every step must have a
density (SMC weights need it), so η > 0, and the last step, where σ² would be 0, uses σ² = η² β_1 (below the
resolution of the data).

Where the work goes (DESIGN §3): the denoiser runs in ``update`` (and ``init``) on the freshly drawn point and
its output is cached in the state, so ``transition`` only reads it and a potential that scores the denoised
estimate (Feynman–Kac steering) costs no extra network evaluation. A run of N particles over K steps calls the
network N·(K + 1) times; ``Particles.nfe`` counts the N·K transitions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .schedule import alpha_bars_of, vp_betas

__all__ = ["DiffusionState", "DDPM", "ddpm", "ddim", "time_grid"]


class DiffusionState(NamedTuple):
    x: jax.Array  # the current point x_s, shape = event shape
    time: jax.Array  # [] int32 diffusion time s
    x0: jax.Array  # cached denoised estimate x̂_0(x_s, s)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDPM:
    """Stochastic reverse diffusion (DDPM, or DDIM with η > 0 on a strided grid) over ``denoiser``.

    Fields: ``denoiser`` — a pytree callable ``(x, s) -> x̂_0`` (x of the event shape, s an int32 diffusion time
    in 1..T); ``alpha_bars`` [T+1] of the training schedule; ``times`` [K+1] int32, T = times[0] > … >
    times[K] = 0; ``eta`` []; ``final_var`` [] the variance of the last step; ``num_steps`` = K (static).
    """

    denoiser: Any
    alpha_bars: jax.Array
    times: jax.Array
    eta: jax.Array
    final_var: jax.Array
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    # --- the Sequential protocol ---------------------------------------------------------------------
    def init(self, key: jax.Array) -> DiffusionState:
        """x_T ~ N(0, I) (the VP prior; ᾱ_T ≈ 0) and its denoised estimate."""
        shape = self.event_shape
        x = jax.random.normal(key, shape, jnp.float32)
        s = self.times[0]
        return DiffusionState(x, s, self.denoise(x, s))

    def transition(self, state: DiffusionState, t) -> dist.Distribution:
        mean, var = self.reverse_moments(state, t)
        scale = jnp.broadcast_to(jnp.sqrt(var), mean.shape)
        return dist.Normal(mean, scale).to_event(mean.ndim)

    def update(self, state: DiffusionState, x_t, t) -> DiffusionState:
        s = self.times[t + 1]
        x = jnp.asarray(x_t, jnp.float32)
        return DiffusionState(x, s, self.denoise(x, s))

    def output(self, state: DiffusionState) -> jax.Array:
        return state.x

    # --- what potentials and guidance read (pplalign.potentials / pplalign.guidance) ---------------------
    @property
    def event_shape(self) -> tuple:
        """The shape of one sample, from ``denoiser.event_shape``."""
        shape = getattr(self.denoiser, "event_shape", None)
        if shape is None:
            raise ValueError("the denoiser must expose `event_shape` (the shape of one sample)")
        return tuple(shape)

    def denoise(self, x, s) -> jax.Array:
        """x̂_0(x, s); the identity at s = 0. Differentiable in x (guidance backpropagates through it)."""
        s = jnp.asarray(s, jnp.int32)
        return jnp.where(s == 0, x, self.denoiser(x, jnp.maximum(s, 1)))

    def denoised(self, state: DiffusionState) -> jax.Array:
        """The cached x̂_0 of the state (no network call)."""
        return state.x0

    def reverse_moments(self, state: DiffusionState, t, x0=None) -> tuple[jax.Array, jax.Array]:
        """Mean and (scalar) variance of the step from times[t] to times[t+1], given x̂_0 (default: cached)."""
        x0 = state.x0 if x0 is None else x0
        s, sp = self.times[t], self.times[t + 1]
        ab_s, ab_sp = self.alpha_bars[s], self.alpha_bars[sp]
        eps = (state.x - jnp.sqrt(ab_s) * x0) / jnp.sqrt(1.0 - ab_s)
        var = self.eta**2 * (1.0 - ab_sp) / (1.0 - ab_s) * (1.0 - ab_s / ab_sp)
        mean = jnp.sqrt(ab_sp) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_sp - var, 0.0)) * eps
        var = jnp.where(sp == 0, self.final_var, var)
        return mean, var


def time_grid(total_steps: int, num_steps: int) -> np.ndarray:
    """[K+1] evenly strided diffusion times T = t_0 > … > t_K = 0 (distinct, int32)."""
    if not 1 <= num_steps <= total_steps:
        raise ValueError(f"num_steps must be in [1, {total_steps}]; got {num_steps}")
    grid = np.round(np.linspace(total_steps, 0, num_steps + 1)).astype(np.int32)
    if len(np.unique(grid)) != num_steps + 1:
        raise ValueError("time grid has repeated times")
    return grid


def ddim(denoiser, betas=None, num_steps: int | None = None, eta: float = 1.0, total_steps: int | None = None) -> DDPM:
    """DDIM with noise η > 0 over ``denoiser`` on ``num_steps`` strided steps of the schedule ``betas``
    (default: ``vp_betas(total_steps)``). ``denoiser.event_shape`` gives the sample shape."""
    if betas is None:
        if total_steps is None:
            raise ValueError("give betas or total_steps")
        betas = vp_betas(total_steps)
    betas = jnp.asarray(betas, jnp.float32)
    total = int(betas.shape[0])
    num_steps = total if num_steps is None else int(num_steps)
    if not float(eta) > 0:
        raise ValueError(f"eta must be > 0: a deterministic sampler has no transition density; got {eta}")
    times = time_grid(total, num_steps)
    final_var = float(eta) ** 2 * float(betas[0])
    return DDPM(
        denoiser,
        alpha_bars_of(betas),
        jnp.asarray(times),
        jnp.asarray(eta, jnp.float32),
        jnp.asarray(final_var, jnp.float32),
        num_steps,
    )


def ddpm(denoiser, betas=None, total_steps: int | None = None) -> DDPM:
    """Ancestral DDPM sampling: DDIM with η = 1 on every step."""
    return ddim(denoiser, betas, None, 1.0, total_steps)
