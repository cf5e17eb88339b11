"""Gradient-guided proposals for diffusion programs: the twisted diffusion sampler (TDS) and uncorrected
reward-gradient guidance.

Both shift the Gaussian reverse step by the gradient of the log twist at the current point
(Wu et al. 2023, "Practical and asymptotically exact conditional sampling in diffusion models", eq. 8):

    q(x_{s'} | x_s) = N( μ(x_s) + w · σ²_s ∇_{x_s} log ψ(x_s),  σ²_s I ),

where (μ, σ²) are the program's reverse moments (``base.reverse_moments``) and log ψ is the twist, by
default λ·r(x̂_0(x_s))/β (the reward of the denoised estimate, :class:`pplalign.potentials.DenoisedRewardTwist`).

* :func:`tds` passes q as ``proposal=`` and ψ as ``twist=`` to :func:`pplalign.smc`, whose weights
  p₀(x_{s'}|x_s) ψ(x_{s'}) / (q(x_{s'}|x_s) ψ(x_s)), with the last step's exp(r/β)/ψ, keep the target exactly
  σ ∝ p₀·exp(r/β) (asymptotically exact as N grows).
* :func:`reward_guidance` samples the same q and keeps the draws *unweighted*: the usual guided sampler
  (Dhariwal & Nichol 2021; Chung et al. 2023's DPS with a reward), a biased baseline. Its ``log_Z`` is the
  (valid) importance-sampling estimate with q as proposal.

NFE: each particle-step runs the denoiser once in the program's update and once more, with its backward
pass, for the gradient; ``Particles.nfe`` counts 2·N·T (a forward–backward pass counted as one evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .particles import Particles, mark_invalid_beta
from .potentials import DenoisedRewardTwist, _require, lambda_schedule
from .programs import Tilted
from .smc import smc

__all__ = ["GuidedProposal", "tds", "reward_guidance"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidedProposal:
    """q(x_{s'} | x_s) = N(μ + scale·σ²·∇ log ψ(x_s), σ²). ``twist.log_psi_at(x, s, t)`` gives log ψ of a
    point; the gradient is taken at the state before step t, which the twist scored at step t − 1."""

    base: Any
    twist: Any
    scale: jax.Array

    def __call__(self, state, t) -> dist.Distribution:
        mean, var = self.base.reverse_moments(state, t)
        t_prev = jnp.maximum(jnp.asarray(t) - 1, 0)
        grad = jax.grad(lambda x: self.twist.log_psi_at(x, state.time, t_prev))(state.x)
        mean = mean + self.scale * var * grad
        scale = jnp.broadcast_to(jnp.sqrt(var), mean.shape)
        return dist.Normal(mean, scale).to_event(mean.ndim)


def _build(target: Tilted, twist, lambdas, scale):
    if not isinstance(target, Tilted):
        raise ValueError(f"target must come from pplalign.tilt; got {type(target).__name__}")
    base = target.base
    _require(base, "denoise", "denoised", "reverse_moments")
    if not isinstance(scale, jax.core.Tracer):  # checked when concrete (numpy: no trace inside a caller's jit)
        value = np.asarray(scale, np.float32)
        if value.ndim != 0 or not np.isfinite(value) or value < 0:
            raise ValueError(f"guidance scale must be a finite scalar >= 0; got {scale}")
    scale = jnp.asarray(scale, jnp.float32)
    if twist is None:
        twist = DenoisedRewardTwist(base, target.reward, target.beta, lambda_schedule(target.num_steps, lambdas))
    elif not hasattr(twist, "log_psi_at"):
        raise ValueError("a guidance twist needs log_psi_at(x, s, t), log ψ as a differentiable function of x")
    return twist, GuidedProposal(base, twist, scale)


def tds(
    key: jax.Array,
    target: Tilted,
    num_particles: int,
    *,
    twist=None,
    lambdas: Any = None,
    scale: float = 1.0,
    ess_threshold: float = 0.5,
    **smc_kwargs,
) -> Particles:
    """The twisted diffusion sampler: SMC with the gradient-guided proposal and the twist ψ (default
    λ·r(x̂_0)/β; pass e.g. the exact soft value on the testbed). NFE = 2·N·T."""
    twist, proposal = _build(target, twist, lambdas, scale)
    p = smc(key, target, num_particles, twist=twist, proposal=proposal, ess_threshold=ess_threshold, **smc_kwargs)
    return p._replace(nfe=2 * p.nfe)


def reward_guidance(
    key: jax.Array, target: Tilted, num_particles: int, *, twist=None, lambdas: Any = None, scale: float = 1.0
) -> Particles:
    """Uncorrected reward-gradient guidance: N independent guided trajectories, equal weights (biased for σ).
    ``log_Z`` is the importance-sampling estimate with the guided proposal. NFE = 2·N·T."""
    _, proposal = _build(target, twist, lambdas, scale)
    p = smc(key, target, num_particles, proposal=proposal, ess_threshold=0.0)
    n = p.log_weights.shape[0]
    p = p._replace(log_weights=jnp.zeros((n,), jnp.float32), ess=jnp.full_like(p.ess, n), nfe=2 * p.nfe)
    return mark_invalid_beta(p, target.beta)  # equal weights, unless a traced β is invalid
