"""Level calibration of a twist for the branching growth of DTS variant "twisted", from an independent pilot.

The exact soft value ψ_t(x_t) = E[exp(r(x)/β) | x_t] is a martingale along p₀, so its p₀-mean is the same at
every level: E_{p₀}[ψ_t(x_t)] = Z for t = −1 (the initial state), 0, …, T − 1 (the reward itself). Variant
"twisted" splits and kills nodes on ratios ψ̃(x_c)/ρ that start at a level-1 node's ψ̃ and follow its path, so
its branching is critical (one expected descendant per step, as for the exact twist) only when ψ̃ has that
property too. A guessed twist usually does not: the Gaussian-posterior twist of the ring testbed has a p₀-mean
that rises 0.6 nats over the first 14 steps and then falls 2.9 nats, so its rollouts first split without need
and then the roulette kills most of them, and the survivors carry large 1/p weights.

:func:`calibrate_twist` estimates m_t = log E_{p₀}[ψ̃_t(x_t)] for every level with a pilot twisted SMC (targets
π_t ∝ p₀(x_{≤t})·ψ̃_t(x_t), multinomial resampling after every step, log Ẑ_t = Σ_{u≤t} log mean of the
incremental weights ψ̃_u/ψ̃_{u−1}; Zhao et al. 2024, Del Moral 2004) and returns the shifted twist

    log ψ̃'_t = log ψ̃_t + (m̂_{T−1} − m̂_t),       m̂_{T−1} = log Ẑ of the pilot (the last level is exp(r/β)),

whose p₀-mean is Ẑ at every level. (Strictly, a subtree's branching from a level-1 node x_{−1} follows
E[ψ̃_t(x_t) | x_{−1}]/ψ̃_{−1}(x_{−1}); the two agree when ψ̃_{−1} is nearly constant over initial states, as
for the ring testbed, where its log has sd 0.04. The pilot's estimates are noisy too — a 128-particle pilot
was 0.5 nats off at the last level there — so the branching is critical only approximately; none of this
touches unbiasedness.) SMC is unchanged by per-level constants (they cancel in normalised
weights); only the tree's branching rate changes. The offsets are functions of an *independent* run, fixed
before the tree grows, so the twisted variant's value-blindness, hence E[Ŵ_root] = Z, is untouched. The
pilot's cost, N·T transition evaluations, is ``CalibratedTwist.pilot_nfe``; count it in the tree's NFE.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .._filter_jit import filter_jit
from .._numerics import sanitize_log as _sanitize
from .._validation import check_count, check_key
from ..programs import Tilted, is_sequential, validate_beta

__all__ = ["CalibratedTwist", "calibrate_twist"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CalibratedTwist:
    """``twist`` shifted by a constant per level: log ψ̃'_t(state) = twist(state, t) + offsets[t + 1]
    (t = −1 … T − 1). ``log_means[t + 1]`` are the pilot's estimates of log E_{p₀}[ψ̃_t]."""

    twist: Any
    offsets: jax.Array  # [T + 1]
    log_means: jax.Array  # [T + 1]
    pilot_nfe: jax.Array  # [] int32

    def __call__(self, state, t) -> jax.Array:
        return self.twist(state, t) + self.offsets[jnp.asarray(t) + 1]


def _pilot(key, target: Tilted, twist, num_particles: int):
    base = target.base
    num_steps = target.num_steps
    n = num_particles
    log_n = jnp.log(jnp.float32(n))
    guess = lambda states, t: _sanitize(jax.vmap(lambda s: jnp.asarray(twist(s, t), jnp.float32))(states))[0]
    reward = lambda states, t: _sanitize(
        jax.vmap(lambda s: jnp.asarray(target.log_potential(base.output(s)), jnp.float32))(states))[0]

    def resample(k, states, h, log_w):
        idx = jax.random.categorical(k, log_w, shape=(n,))
        return jax.tree_util.tree_map(lambda a: a[idx], states), h[idx]

    def advance(carry, t, score):
        """Step t of the pilot: move, weight by ψ̃_t/ψ̃_{t−1}, accumulate log Ẑ_t, resample."""
        states, h, log_z = carry
        k_move, k_res = jax.random.split(jax.random.fold_in(k_steps, t))
        x = jax.vmap(lambda s, k: base.transition(s, t).sample(k))(states, jax.random.split(k_move, n))
        states = jax.vmap(lambda s, xx: base.update(s, xx, t))(states, x)
        h_new = score(states, t)
        log_w = jnp.where(jnp.isfinite(h_new), h_new - h, -jnp.inf)
        log_z = log_z + jax.nn.logsumexp(log_w) - log_n
        states, h_new = resample(k_res, states, h_new, log_w)
        return (states, h_new, log_z), log_z

    k_init, k_steps = jax.random.split(key)
    states = jax.vmap(base.init)(jax.random.split(k_init, n))
    h = guess(states, jnp.asarray(-1, jnp.int32))
    log_z = jax.nn.logsumexp(h) - log_n
    states, h = resample(jax.random.fold_in(k_init, 1), states, h, h)
    # steps 0..T−2 score the twist; the last step scores the reward (the tilt itself)
    carry, middle = jax.lax.scan(lambda c, t: advance(c, t, guess), (states, h, log_z), jnp.arange(num_steps - 1, dtype=jnp.int32))
    _, last = advance(carry, jnp.asarray(num_steps - 1, jnp.int32), reward)
    return jnp.concatenate([log_z[None], middle, last[None]])


_pilot_jit = filter_jit(_pilot)


def calibrate_twist(key: jax.Array, target: Tilted, twist, num_particles: int = 128) -> CalibratedTwist:
    """Run the pilot (``num_particles`` particles, N·T NFE) and return ``twist`` calibrated per level (see the
    module docstring). Raises ``ValueError`` if the pilot's weights all vanish (a twist that is −inf wherever
    the pilot looks) or a level's estimate is not finite."""
    if not isinstance(target, Tilted) or not is_sequential(target.base):
        raise ValueError("calibrate_twist needs a tilted Sequential program (pplalign.tilt of a diffusion sampler)")
    if twist is None:
        raise ValueError("calibrate_twist needs a twist to calibrate")
    check_key(key)
    validate_beta(target.beta)
    num_particles = check_count(num_particles, "num_particles", 2)
    log_means = _pilot_jit(key, target, twist, num_particles)
    if not bool(jnp.all(jnp.isfinite(log_means))):
        raise ValueError(f"the calibration pilot's weights vanished or were not finite (log means {log_means}); check the twist and the reward")
    offsets = log_means[-1] - log_means
    return CalibratedTwist(twist, offsets, log_means, jnp.asarray(num_particles * target.num_steps, jnp.int32))
