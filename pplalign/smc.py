"""Sequential Monte Carlo for tilted sequential programs: bootstrap, Feynman–Kac / twisted, guided proposals,
ESS-adaptive resampling, and the conditional (pinned-particle) variant — one compiled ``lax.scan``.

Weights (all in log space). With twist ψ_t (ψ_{-1} ≡ 1, and the last step's potential is the tilt itself,
exp(r(x)/β)), proposal q_t and base p₀, the incremental weight at step t is

    G_t = p₀(x_t | x_{<t}) ψ_t(x_{≤t}) / ( q_t(x_t | x_{<t}) ψ_{t-1}(x_{<t}) ),

so ∏_t G_t = p₀(x) exp(r(x)/β) / q(x) telescopes to the importance weight of the whole path (Zhao et al.
2024, §3; Del Moral 2004). Without a twist ψ_t ≡ 1 (bootstrap). For a finite-support step (a ``Categorical``)
with a twist and no user proposal, the locally optimal proposal q_t(x) ∝ p₀(x | ·) ψ_t(·, x) is used, whose
weight G_t = Σ_x p₀(x | ·) ψ_t(·, x) / ψ_{t-1} does not depend on the drawn value; at the last step the twist's
own candidate scores form the proposal and the weight is corrected by exp(r/β)/ψ_{T-1}(x).

Adaptive resampling: log-weights accumulate from step to step and are reset only when a resampling happens,
at which point log-mean-exp of the carried weights is added to log Ẑ; at the end log Ẑ also gets the
log-mean-exp of the final carried weights. Ẑ is unbiased for Z for any ESS rule (Del Moral et al. 2012).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from . import resampling as resampling_lib
from ._filter_jit import filter_jit
from ._numerics import log_mean_exp_safe as _log_mean_exp
from ._numerics import sanitize_log
from ._validation import check_distribution, check_inputs
from .distributed import constrain_particles
from .particles import Particles, mark_invalid_beta, raise_on_nonfinite
from .programs import Tilted

__all__ = ["SMCState", "init", "step", "smc", "importance_sampling", "best_of_n", "run_smc", "check_inputs"]


class SMCState(NamedTuple):
    """The particle system between steps."""

    states: Any  # per-particle program states, leading axis N
    log_weights: jax.Array  # [N] carried since the last resampling
    log_psi: jax.Array  # [N] log ψ_{t-1} of each particle's prefix (0 before step 0)
    log_Z: jax.Array  # [] Σ log-mean-exp of carried weights at past resamplings
    nonfinite: jax.Array  # [2] bool: some (reward, twist or proposal log-density) was NaN/+inf


class StepInfo(NamedTuple):
    ess: jax.Array
    ancestors: jax.Array


def _is_categorical(d: Any) -> bool:
    return isinstance(d, (dist.CategoricalLogits, dist.CategoricalProbs))


def _categorical_log_probs(d: Any) -> jax.Array:
    return jax.nn.log_softmax(d.logits, axis=-1)


def _sanitize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Map NaN and +inf to −inf (zero weight) and say whether any were seen."""
    x, bad = sanitize_log(x)
    return x, jnp.any(bad)


def ess_of(log_weights: jax.Array) -> jax.Array:
    """(Σw)² / Σw², computed in log space; 0 when every weight is zero."""
    m = jnp.max(log_weights)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(log_weights - safe)
    s1, s2 = jnp.sum(w), jnp.sum(w * w)
    return jnp.where(s2 > 0, s1 * s1 / jnp.where(s2 > 0, s2, 1.0), 0.0)


def _check_scalar(value: jax.Array, what: str) -> jax.Array:
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(f"{what} must return a scalar per particle; got shape {value.shape}")
    return value


def reorder_states(base: Any, states: Any, ancestors: jax.Array, t: jax.Array) -> Any:
    """Gather the particle states by ancestor indices.

    A program may define ``reorder(states, ancestors, t)`` to do this cheaper than a gather of every leaf
    (e.g. a language model gathering only the filled part of its KV cache, DESIGN §4); otherwise every leaf
    with the leading particle axis is gathered.
    """
    if hasattr(base, "reorder"):
        return base.reorder(states, ancestors, t)
    return jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, ancestors, axis=0), states)


def _propose_one(target: Tilted, twist, proposal, key, state, log_psi_prev, t, last: bool, pinned, optimal=True):
    """Move one particle through step t; returns (new_state, log G_t, log ψ_t, nonfinite [2]: reward, twist)."""
    base = target.base
    p = check_distribution(base.transition(state, t), "transition")
    q = check_distribution(proposal(state, t), "proposal") if proposal is not None else None
    final_potential = lambda s: _sanitize(_check_scalar(target.log_potential(base.output(s)), "reward"))

    if optimal and twist is not None and q is None and _is_categorical(p):
        log_p = _categorical_log_probs(p)
        k = log_p.shape[-1]
        if hasattr(twist, "candidates"):
            scores = jnp.asarray(twist.candidates(state, t))
            if scores.shape != (k,):
                raise ValueError(f"twist.candidates must return shape ({k},) for a {k}-way step; got {scores.shape}")
            scores, bad = _sanitize(scores)
            cand_states = None
        else:
            cand_states = jax.vmap(lambda v: base.update(state, v, t))(jnp.arange(k))
            score_fn = final_potential if last else (lambda s: _sanitize(_check_scalar(twist(s, t), "twist")))
            scores, bad = jax.vmap(score_fn)(cand_states)
            bad = jnp.any(bad)
        joint = log_p + scores
        log_norm = jax.nn.logsumexp(joint)
        x = jax.random.categorical(key, jnp.where(jnp.isfinite(log_norm), joint, log_p)) if pinned is None else pinned
        x = x.astype(jnp.int32)
        new_state = base.update(state, x, t)
        log_g = log_norm - log_psi_prev
        log_psi = scores[x]
        bad = jnp.stack([bad, False]) if last and cand_states is not None else jnp.stack([False, bad])
        if last and cand_states is None:
            r, bad_r = final_potential(new_state)
            log_g = log_g + r - log_psi
            # no candidate had mass (log_norm = −inf; x fell back to p₀): a zero weight, not −inf − (−inf)
            log_g = jnp.where(jnp.isfinite(log_norm), log_g, -jnp.inf)
            bad = bad.at[0].set(bad_r)
            log_psi = r
        return new_state, log_g, log_psi, bad

    sampler = q if q is not None else p
    x = sampler.sample(key) if pinned is None else pinned
    new_state = base.update(state, x, t)
    log_g = jnp.zeros((), jnp.float32)
    if q is not None:
        log_g = jnp.sum(p.log_prob(x)) - jnp.sum(q.log_prob(x))
    bad = jnp.zeros((2,), bool)
    if last:
        log_psi, bad_r = final_potential(new_state)
        bad = bad.at[0].set(bad_r)
    elif twist is not None:
        log_psi, bad_t = _sanitize(_check_scalar(twist(new_state, t), "twist"))
        bad = bad.at[1].set(bad_t)
    else:
        log_psi = jnp.zeros((), jnp.float32)
    log_g = log_g + log_psi - log_psi_prev
    return new_state, log_g, log_psi, bad


def init(key: jax.Array, target: Tilted, num_particles: int, mesh=None) -> SMCState:
    """N independent copies of ``base.init``, uniform weights."""
    keys = jax.random.split(key, num_particles)
    states = jax.vmap(target.base.init)(keys)
    zeros = jnp.zeros((num_particles,), jnp.float32)
    return SMCState(constrain_particles(states, mesh), zeros, zeros, jnp.zeros((), jnp.float32), jnp.zeros((2,), bool))


def step(
    key: jax.Array,
    smc_state: SMCState,
    t: jax.Array,
    target: Tilted,
    *,
    twist=None,
    proposal=None,
    resampling: Callable = resampling_lib.systematic,
    ess_threshold: float = 0.5,
    last: bool = False,
    reference: Any = None,
    mesh=None,
    optimal_proposal: bool = True,
) -> tuple[SMCState, StepInfo]:
    """One SMC step: propose and weight every particle, then resample if the ESS rule says so.

    The resampling decision is a ``lax.cond`` outside the particle ``vmap``, so the gather of the particle
    states (e.g. a KV cache) runs only on steps that resample. ``reference`` pins particle 0 to the given
    value of x_t (conditional SMC) and keeps its ancestor at 0.
    """
    n = smc_state.log_weights.shape[0]
    move_key, resample_key = jax.random.split(key)
    keys = jax.random.split(move_key, n)
    pinned = None
    if reference is not None:
        pinned_flags = jnp.arange(n) == 0
        move = lambda k, s, lp, is_ref: jax.lax.cond(
            is_ref,
            lambda: _propose_one(target, twist, proposal, k, s, lp, t, last, reference, optimal_proposal),
            lambda: _propose_one(target, twist, proposal, k, s, lp, t, last, None, optimal_proposal),
        )
        states, log_g, log_psi, bad = jax.vmap(move)(keys, smc_state.states, smc_state.log_psi, pinned_flags)
    else:
        states, log_g, log_psi, bad = jax.vmap(
            lambda k, s, lp: _propose_one(target, twist, proposal, k, s, lp, t, last, pinned, optimal_proposal)
        )(keys, smc_state.states, smc_state.log_psi)
    log_g = jnp.where(smc_state.log_psi == -jnp.inf, -jnp.inf, log_g)  # ψ_{t-1} = 0: dead already, not −inf − −inf
    log_g, bad_g = _sanitize(log_g)
    nonfinite = smc_state.nonfinite | jnp.any(bad, axis=0) | jnp.stack([False, bad_g])
    log_w = smc_state.log_weights + log_g
    ess = ess_of(log_w)
    states = constrain_particles(states, mesh)
    identity = jnp.arange(n, dtype=jnp.int32)

    if last or ess_threshold <= 0.0:
        new = SMCState(states, log_w, log_psi, smc_state.log_Z, nonfinite)
        return new, StepInfo(ess, identity)

    any_alive = jnp.any(jnp.isfinite(log_w))
    wants = jnp.asarray(True) if ess_threshold >= 1.0 else ess < ess_threshold * n
    do_resample = wants & any_alive

    def resample(_):
        idx = resampling(resample_key, log_w, n).astype(jnp.int32)
        if reference is not None:
            idx = idx.at[0].set(0)
        gathered = reorder_states(target.base, states, idx, t)
        return (
            constrain_particles(gathered, mesh),
            jnp.zeros_like(log_w),
            log_psi[idx],
            smc_state.log_Z + _log_mean_exp(log_w),
            idx,
        )

    def keep(_):
        return states, log_w, log_psi, smc_state.log_Z, identity

    states, log_w, log_psi, log_Z, ancestors = jax.lax.cond(do_resample, resample, keep, None)
    return SMCState(states, log_w, log_psi, log_Z, nonfinite), StepInfo(ess, ancestors)


def run_smc(
    key: jax.Array,
    target: Tilted,
    num_particles: int,
    twist=None,
    proposal=None,
    resampling: Callable = resampling_lib.systematic,
    ess_threshold: float = 0.5,
    reference: Any = None,
    mesh=None,
    optimal_proposal: bool = True,
) -> Particles:
    """The compiled body shared by every sampler here: ``lax.scan`` over steps 0..T-2, then the final step."""
    num_steps = target.num_steps
    init_key, run_key = jax.random.split(key)
    state = init(init_key, target, num_particles, mesh)
    opts = dict(
        twist=twist,
        proposal=proposal,
        resampling=resampling,
        ess_threshold=ess_threshold,
        mesh=mesh,
        optimal_proposal=optimal_proposal,
    )

    def body(carry, t):
        ref_t = None if reference is None else jax.tree_util.tree_map(lambda r: r[t], reference)
        return step(jax.random.fold_in(run_key, t), carry, t, target, reference=ref_t, **opts)

    state, infos = jax.lax.scan(body, state, jnp.arange(num_steps - 1))
    t_last = jnp.asarray(num_steps - 1)
    ref_last = None if reference is None else jax.tree_util.tree_map(lambda r: r[num_steps - 1], reference)
    state, last_info = step(jax.random.fold_in(run_key, t_last), state, t_last, target, last=True, reference=ref_last, **opts)

    log_Z = state.log_Z + _log_mean_exp(state.log_weights)
    all_zero = ~jnp.any(jnp.isfinite(state.log_weights))
    log_Z = jnp.where(all_zero, -jnp.inf, log_Z)
    samples = jax.vmap(target.base.output)(state.states)
    ess = jnp.concatenate([infos.ess, last_info.ess[None]])
    ancestors = jnp.concatenate([infos.ancestors, last_info.ancestors[None]], axis=0)
    nfe = jnp.asarray(num_particles * num_steps, jnp.int32)
    result = Particles(samples, state.log_weights, log_Z, ess, ancestors, nfe, state.nonfinite[0], all_zero, state.nonfinite[1])
    return mark_invalid_beta(result, target.beta)


_compiled_run = filter_jit(run_smc)


def smc(
    key: jax.Array,
    target: Tilted,
    num_particles: int,
    *,
    twist=None,
    proposal=None,
    resampling: Callable = resampling_lib.systematic,
    ess_threshold: float = 0.5,
    mesh=None,
    optimal_proposal: bool = True,
) -> Particles:
    """Sequential Monte Carlo on a tilted sequential program; compiled end to end.

    Args:
      key: PRNG key; every random draw is derived from it by ``split``/``fold_in``.
      target: ``pplalign.tilt(base, reward, beta)``.
      num_particles: N.
      twist: ``twist(state, t) -> log ψ_t`` (Feynman–Kac potentials / twisted SMC; see the module docstring),
        optionally with ``candidates(state, t) -> [K]``. None: bootstrap SMC.
      proposal: ``proposal(state, t) -> distribution`` used instead of ``base.transition``; weighted by p₀/q.
      resampling: a resampler ``(key, log_weights, num) -> indices``.
      ess_threshold: resample after step t when ESS < ess_threshold·N; 1 resamples every step, 0 never.
      mesh: an optional ``jax.sharding.Mesh`` (see :mod:`pplalign.distributed`) over which the particle
        axis is sharded; resampling is global across devices. N must be divisible by the device count.
      optimal_proposal: with a twist and a finite-support step, propose from the locally optimal
        q_t ∝ p₀·ψ_t (True) or from p₀ with the twist as a Feynman–Kac potential ψ_t/ψ_{t-1} (False).

    Returns:
      :class:`Particles`. Raises ``ValueError`` naming the reward or the twist if it returned NaN/+inf.
    """
    num_particles, ess_threshold = check_inputs(target, num_particles, ess_threshold, mesh, key=key)
    resampling = resampling_lib.resolve(resampling)
    result = _compiled_run(
        key, target, num_particles, twist, proposal, resampling, ess_threshold, None, mesh, bool(optimal_proposal)
    )
    return raise_on_nonfinite(result, target.reward, twist)


def importance_sampling(key: jax.Array, target: Tilted, num_particles: int, *, proposal=None, mesh=None) -> Particles:
    """Self-normalised importance sampling with proposal q (default p₀): w = p₀(x) exp(r(x)/β) / q(x).

    Static targets (``tilt`` of a genjax or numpyro program) are handled by :mod:`pplalign.static`."""
    if not isinstance(target, Tilted):
        from . import static

        return static.importance_sampling(key, target, num_particles, proposal=proposal, mesh=mesh)
    return smc(key, target, num_particles, proposal=proposal, ess_threshold=0.0, mesh=mesh)


def best_of_n(key: jax.Array, target: Tilted, n: int) -> Particles:
    """Draw n samples from p₀ and keep the one with the highest reward.

    Returns a single-particle :class:`Particles` (leading axis 1). Its ``log_Z`` is the importance-sampling
    estimate from the same n draws (free, unbiased on the Z scale); ``nfe`` counts all n·T transitions.
    """
    n, _ = check_inputs(target, n, 0.0, key=key, count_name="n")
    result = _compiled_best_of_n(key, target, n)
    return raise_on_nonfinite(result, target.reward)


def _best_of_n(key, target, n):
    p = run_smc(key, target, n, ess_threshold=0.0)
    best = jnp.argmax(p.log_weights)
    pick = lambda leaf: leaf[best][None]
    result = Particles(
        jax.tree_util.tree_map(pick, p.samples),
        jnp.zeros((1,), jnp.float32),
        p.log_Z,
        p.ess,
        jnp.zeros((target.num_steps, 1), jnp.int32),
        p.nfe,
        p.nonfinite_reward,
        p.all_zero,
        p.nonfinite_twist,
        p.invalid_beta,
    )
    return mark_invalid_beta(result, target.beta)  # its one log-weight too


_compiled_best_of_n = filter_jit(_best_of_n)
