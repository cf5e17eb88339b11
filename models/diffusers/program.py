"""A diffusers-format UNet with its scheduler as a pplalign ``Sequential`` program (DESIGN §3).

Step k (t = 0..S−1 in pplalign's count) of the program is the scheduler's reverse kernel at timestep t_k
(:mod:`models.diffusers.scheduler`):

    x_{k+1} ~ N( a_k x̂₀ + b_k x_k + c_k ε̂ ,  σ_k² I ),      (x̂₀, ε̂) read from UNet(x_k, t_k [, class c]),

and x_0 ~ N(0, I) (``init_noise_sigma`` = 1). The reverse step is a numpyro ``Normal``, so SMC reweights it
and DTS branches on it. Where diffusers' last step has no noise (DDPM at t = 0, DDIM with ᾱ_{t'} = 1) the
program uses σ = ``final_std`` there (default η·√β_0, η = 1 for DDPM: below the data's resolution), so that
every step of a stochastic sampler has a density; ``final_std=0`` reproduces diffusers' loop exactly. A DDIM
sampler with η = 0 stays deterministic, and ``pplalign.dts`` refuses it (it cannot branch).

Where the work goes (as :mod:`models.diffusion.sampler`): the UNet runs once per particle-step, in ``update``
(and ``init``) on the freshly drawn point; its x̂₀ and ε̂ are cached in the state, so ``transition`` only reads
them, an FK potential or :class:`pplalign.potentials.GaussianPosteriorTwist` reads the cached x̂₀ at no extra
network evaluation, and ``Particles.nfe`` (N·S transitions) counts the network calls (N·(S + 1) with the
initial one).

Diffusion time in the state: s = t + 1 for the point at diffusers' timestep t, s = 0 for the finished sample,
so that ``alpha_bars[s]`` (ᾱ with ᾱ at s = 0 equal to 1) is the project's convention for potentials and twists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from . import scheduler as sch

__all__ = ["UNetState", "UNetSampler", "unet_program"]


class UNetState(NamedTuple):
    x: jax.Array  # the current point, [C, H, W]
    time: jax.Array  # [] int32: diffusers timestep + 1 of x (0 once finished)
    x0: jax.Array  # cached x̂₀ (clipped as the scheduler says)
    eps: jax.Array  # cached ε̂ (what the DDIM direction uses)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UNetSampler:
    """The reverse process of ``schedule`` over the network ``net(x[C,H,W], t, class_labels)`` → model output.

    Fields: ``net`` (a pytree callable, e.g. :class:`models.diffusers.UNet2DModel`), ``schedule``
    (:class:`models.diffusers.scheduler.Schedule`), ``class_label`` ([] int32 or None: unconditional),
    ``final_std`` [] (σ of the last step where the scheduler has none), ``event_shape`` (static).
    """

    net: Any
    schedule: sch.Schedule
    class_label: Any
    final_std: jax.Array
    event_shape: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def alpha_bars(self) -> jax.Array:
        """ᾱ indexed by the state's diffusion time s (ᾱ at s = 0 is 1; s = t + 1 is diffusers' ᾱ_t)."""
        return jnp.concatenate([jnp.ones((1,), jnp.float32), self.schedule.alphas_cumprod])

    # --- the network -------------------------------------------------------------------------------------
    def _net(self, x, timestep):
        if self.class_label is None:
            return self.net(x, timestep)
        return self.net(x, timestep, self.class_label)

    def _predict(self, x, k):
        """(x̂₀, ε̂) at sampling step k: one network evaluation."""
        return sch.predict(self.schedule, k, self._net(x, self.schedule.timesteps[k]), x)

    # --- the Sequential protocol -------------------------------------------------------------------------
    def init(self, key: jax.Array) -> UNetState:
        """x ~ N(0, I) at the first timestep, with its prediction."""
        x = jax.random.normal(key, self.event_shape, jnp.float32)
        return UNetState(x, self.schedule.timesteps[0] + 1, *self._predict(x, 0))

    def transition(self, state: UNetState, t) -> dist.Distribution:
        mean, var = self.reverse_moments(state, t)
        return dist.Normal(mean, jnp.broadcast_to(jnp.sqrt(var), mean.shape)).to_event(mean.ndim)

    def update(self, state: UNetState, x_t, t) -> UNetState:
        k = jnp.asarray(t) + 1
        last = k >= self.num_steps
        x = jnp.asarray(x_t, jnp.float32)
        # the finished sample needs no prediction: a cond skips the network there (S calls per sample, as
        # diffusers' loop makes; under a vmap over steps it becomes a select and both branches run)
        x0, eps = jax.lax.cond(last, lambda: (x, jnp.zeros_like(x)),
                               lambda: self._predict(x, jnp.minimum(k, self.num_steps - 1)))
        time = jnp.where(last, 0, self.schedule.timesteps[jnp.minimum(k, self.num_steps - 1)] + 1)
        return UNetState(x, time.astype(jnp.int32), x0, eps)

    def output(self, state: UNetState) -> jax.Array:
        return state.x

    # --- what potentials, twists and guidance read (pplalign.potentials / pplalign.guidance) ---------------
    def denoised(self, state: UNetState) -> jax.Array:
        """The cached x̂₀ of the state (no network call)."""
        return state.x0

    def denoise(self, x, s) -> jax.Array:
        """x̂₀(x, s) at diffusion time s (the identity at s = 0); differentiable in x for guidance."""
        s = jnp.asarray(s, jnp.int32)
        t = jnp.maximum(s - 1, 0)
        ab = self.schedule.alphas_cumprod[t]
        x0, _ = sch.convert(self.schedule, ab, self._net(x, t), x)
        return jnp.where(s == 0, x, x0)

    def reverse_moments(self, state: UNetState, t) -> tuple[jax.Array, jax.Array]:
        """Mean and scalar variance of step t from the cached prediction (``final_std`` floors the last σ)."""
        mean, std = sch.moments(self.schedule, t, state.x0, state.eps, state.x)
        std = jnp.where(jnp.asarray(t) == self.num_steps - 1, jnp.maximum(std, self.final_std), std)
        return mean, std ** 2


def unet_program(net, scheduler, num_inference_steps: int, *, eta: Optional[float] = None,
                 use_clipped_model_output: bool = False, class_label: Optional[int] = None,
                 final_std: Optional[float] = None, sample_shape: Optional[tuple] = None) -> UNetSampler:
    """The ``Sequential`` program of ``net`` sampled by ``scheduler`` (a diffusers ``scheduler_config.json`` dict
    or a :class:`~models.diffusers.scheduler.SchedulerConfig`) on S = ``num_inference_steps`` steps.

    ``eta``: DDIM's η (default 1: stochastic; 0 gives the deterministic DDIM, which DTS refuses); must be None
    for DDPM. ``class_label``: the class of a class-conditional UNet. ``final_std``: σ of a noiseless last
    step (default η·√β_0). ``sample_shape``: [C, H, W], default from ``net.config`` (in_channels, sample_size).
    """
    config = scheduler if isinstance(scheduler, sch.SchedulerConfig) else sch.scheduler_from_config(scheduler)
    if config.kind == "ddpm" and eta is not None:
        raise ValueError("eta is a DDIM setting; a DDPM scheduler's noise is fixed (pass eta=None)")
    eta = 1.0 if (config.kind == "ddim" and eta is None) else (eta or 0.0)
    schedule = sch.set_timesteps(config, num_inference_steps, eta=eta, use_clipped_model_output=use_clipped_model_output)
    if sample_shape is None:
        cfg = getattr(net, "config", None)
        if cfg is None:
            raise ValueError("give sample_shape=(C, H, W): the network has no config to read it from")
        size = getattr(cfg, "sample_size", None)
        if size is None:
            raise ValueError("give sample_shape=(C, H, W): the UNet config has no sample_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (cfg.in_channels, h, w)
    sample_shape = tuple(int(d) for d in sample_shape)
    if hasattr(net, "check_sample_shape"):
        net.check_sample_shape(sample_shape)
    classes = getattr(getattr(net, "config", None), "num_class_embeds", None)
    if hasattr(net, "config") and (class_label is None) != (classes is None):
        raise ValueError(f"class_label={class_label!r} for a UNet with num_class_embeds={classes}: a class-"
                         "conditional UNet needs a label, an unconditional one takes none")
    if class_label is not None and classes is not None and not 0 <= int(class_label) < int(classes):
        raise ValueError(f"class_label must lie in [0, {classes}); got {class_label}")
    if final_std is None:
        final_std = (eta if config.kind == "ddim" else 1.0) * float(np.sqrt(config.betas()[0]))
    if not (np.isfinite(final_std) and final_std >= 0):
        raise ValueError(f"final_std must be finite and >= 0; got {final_std}")
    label = None if class_label is None else jnp.asarray(class_label, jnp.int32)
    return UNetSampler(net, schedule, label, jnp.asarray(final_std, jnp.float32), sample_shape)
