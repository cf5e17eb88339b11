"""Reward-tempered SMC for static programs: β_k from ∞ down to β, i.e. λ_k from 0 up to 1 on ℓ = r/β.

The sequence of targets (Neal 2001; Del Moral, Doucet & Jasra 2006; Jasra et al. 2011)

    π_λ(z) ∝ p(z, c) · exp(λ · r(f(z))/β),     λ_0 = 0 < λ_1 < … < λ_K = 1,

starts at the program's own law (weighted by log p(c | z) when there are constraints) and ends at σ. Each
stage k, one compiled ``lax.while_loop`` iteration:

1. **Adapt** λ_k: the largest λ ≤ 1 with ESS(w·e^{(λ−λ_{k−1})ℓ}) ≥ ``ess_target``·N, by bisection
   (Jasra et al. 2011) — or read it from a fixed ``schedule``. The last allowed stage (``max_stages``) jumps
   to λ = 1, so the result always targets σ.
2. **Reweight** w_i ← w_i·exp((λ_k − λ_{k−1}) ℓ(z_i)) and add the log of the increment
   log Σ_i W_i exp((λ_k − λ_{k−1}) ℓ(z_i)) (W the normalised carried weights — the log-mean-exp of the
   increments after a resampling) to log Ẑ.
3. **Resample** (systematic, global over the particle axis) and **move** every particle with
   ``num_mcmc_steps`` MCMC moves invariant for π_{λ_k} (:mod:`pplalign.mcmc`), with per-coordinate steps
   set from the weighted spread of the cloud and a multiplier adapted towards the kernel's optimal
   acceptance rate.

Ẑ = Π_k Σ_i W_i^{k−1} e^{(λ_k−λ_{k−1})ℓ_i} (times the mean constraint weight) is unbiased for Z for a fixed
schedule (Del Moral et al. 2006); with the adaptive schedule its bias is O(1/N) (Beskos, Jasra, Kantas &
Thiery 2016). For an exactly unbiased Ẑ, run once adaptively and pass the returned ``info.lambdas`` as
``schedule`` to a second run with a fresh key.

Padding. ``Particles.ess`` and ``.ancestors`` have ``max_stages`` rows, one per stage that *could* run; rows
of stages that did not run are the values of a stage that neither reweights nor resamples: ESS = N and
identity ancestors. ``ess[k]`` is the ESS after reweighting at stage k, before resampling. The number of
stages used and the λ schedule are in :class:`TemperedInfo`.

NFE counts per-particle evaluations of the program's density (with or without its gradient; a gradient
evaluation counts one): N for the initial draws, N to score them, and at each stage N·``num_mcmc_steps``
times 1 (RWMH, MALA) or ``num_leapfrog`` (HMC).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import mcmc as mcmc_lib
from . import resampling as resampling_lib
from ._filter_jit import filter_jit
from ._numerics import log_mean_exp_safe as _lme
from ._numerics import logsumexp_safe as _logsumexp
from ._validation import check_count, check_fraction
from .distributed import constrain_particles
from .particles import Particles, mark_invalid_beta, raise_on_nonfinite
from .static import StaticTilted, check_static_inputs

__all__ = ["tempered_smc", "tempered_smc_with_info", "TemperedInfo", "run_tempered"]

_BISECTION_STEPS = 40


class TemperedInfo(NamedTuple):
    num_stages: jax.Array  # [] int32, stages run
    lambdas: jax.Array  # [max_stages] λ_k reached at each stage; 1.0 after the last
    acceptance: jax.Array  # [max_stages] mean MCMC acceptance rate at each stage; 0 where none ran
    step_multiplier: jax.Array  # [max_stages] the multiplier c of the per-coordinate step used at each stage


class _Carry(NamedTuple):
    points: mcmc_lib.Point
    log_w: jax.Array
    lam: jax.Array
    log_Z: jax.Array
    stage: jax.Array
    mult: jax.Array
    ess: jax.Array
    ancestors: jax.Array
    lambdas: jax.Array
    acceptance: jax.Array
    multipliers: jax.Array
    nonfinite: jax.Array
    dead: jax.Array


def _ess(log_w):
    from .smc import ess_of

    return ess_of(log_w)


def _increment(ell, delta):
    return jnp.where(delta > 0, delta * ell, 0.0)


def next_lambda(log_w, ell, lam, ess_target):
    """The largest λ' in (λ, 1] with ESS(log_w + (λ'−λ)ℓ) ≥ ess_target·N, by bisection; 1 if λ' = 1 passes.
    If no positive step passes (ESS is already low, or some ℓ = −inf), the smallest bisected step is taken,
    which removes the zero-weight particles and lets the next stage progress."""
    n = log_w.shape[0]
    goal = ess_target * n
    room = 1.0 - lam
    ok = lambda d: _ess(log_w + _increment(ell, d)) >= goal

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (jnp.zeros_like(lam), room))
    delta = jnp.where(ok(room), room, jnp.where(lo > 0, lo, hi))
    return jnp.minimum(lam + delta, 1.0)


def _weighted_spread(positions, log_w):
    w = resampling_lib.normalize(log_w)
    mean = jnp.sum(w[:, None] * positions, axis=0)
    var = jnp.sum(w[:, None] * (positions - mean) ** 2, axis=0)
    std = jnp.sqrt(var)
    # A collapsed coordinate (all particles equal) still needs a positive step.
    return jnp.where(std > 1e-6, std, jnp.maximum(jnp.max(std), 1e-3))


def run_tempered(
    key: jax.Array,
    target: StaticTilted,
    num_particles: int,
    ess_target: float = 0.5,
    mcmc: str = "rwmh",
    num_mcmc_steps: int = 5,
    num_leapfrog: int = 5,
    max_stages: int = 50,
    schedule: Optional[jax.Array] = None,
    mesh=None,
) -> tuple[Particles, TemperedInfo]:
    """The compiled body of :func:`tempered_smc` (call that instead; this one does no input checks)."""
    n = num_particles
    kernel = mcmc_lib.KERNELS[mcmc]
    with_grad = mcmc_lib.needs_grad(mcmc)
    init_key, run_key = jax.random.split(key)

    keys = constrain_particles(jax.random.split(init_key, n), mesh)
    zs, log_w0, _ = jax.vmap(target.program.init)(keys)
    flat0, unravel = ravel_pytree(jax.tree_util.tree_map(lambda leaf: leaf[0], zs))
    positions = jax.vmap(lambda z: ravel_pytree(z)[0])(zs).astype(jnp.float32)
    dim = flat0.shape[0]
    evaluate = mcmc_lib.make_evaluate(target, unravel, with_grad)
    points = constrain_particles(jax.vmap(evaluate)(constrain_particles(positions, mesh)), mesh)
    log_w0 = jnp.where(jnp.isnan(log_w0) | (log_w0 == jnp.inf), -jnp.inf, jnp.asarray(log_w0, jnp.float32))

    identity = jnp.arange(n, dtype=jnp.int32)
    carry = _Carry(
        points=points,
        log_w=log_w0,
        lam=jnp.zeros((), jnp.float32),
        log_Z=_lme(log_w0),  # the constraints' importance weights, log mean p(c | z_i); 0 without constraints
        stage=jnp.zeros((), jnp.int32),
        mult=jnp.asarray(mcmc_lib.default_step_multiplier(mcmc, dim), jnp.float32),
        ess=jnp.full((max_stages,), float(n), jnp.float32),
        ancestors=jnp.broadcast_to(identity, (max_stages, n)),
        lambdas=jnp.ones((max_stages,), jnp.float32),
        acceptance=jnp.zeros((max_stages,), jnp.float32),
        multipliers=jnp.zeros((max_stages,), jnp.float32),
        nonfinite=jnp.any(points.nonfinite),
        dead=jnp.zeros((), bool),
    )
    goal_acc = mcmc_lib.target_acceptance(mcmc)

    def cond(c: _Carry):
        return (c.lam < 1.0) & (c.stage < max_stages) & ~c.dead

    def body(c: _Carry):
        k = c.stage
        stage_key = jax.random.fold_in(run_key, k)
        resample_key, move_key = jax.random.split(stage_key)
        ell = c.points.log_tilt
        if schedule is None:
            lam = next_lambda(c.log_w, ell, c.lam, ess_target)
        else:
            lam = jnp.asarray(schedule, jnp.float32)[k]
        lam = jnp.where(k == max_stages - 1, 1.0, lam)
        log_w = c.log_w + _increment(ell, lam - c.lam)
        log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
        alive = jnp.any(jnp.isfinite(log_w))
        log_Z = c.log_Z + jnp.where(alive, _logsumexp(log_w) - _logsumexp(c.log_w), -jnp.inf)
        ess = _ess(log_w)
        h = c.mult * _weighted_spread(c.points.position, log_w)

        idx = jnp.where(alive, resampling_lib.systematic(resample_key, log_w, n), identity)
        points = jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, idx, axis=0), c.points)
        points = constrain_particles(points, mesh)

        def move(i, carry):
            pts, acc = carry
            keys = jax.random.split(jax.random.fold_in(move_key, i), n)
            pts, accepted = jax.vmap(lambda kk, p: kernel(kk, p, lam, h, evaluate, num_leapfrog))(keys, pts)
            return constrain_particles(pts, mesh), acc + jnp.mean(accepted.astype(jnp.float32))

        points, acc = jax.lax.fori_loop(0, num_mcmc_steps, move, (points, jnp.zeros((), jnp.float32)))
        acc = acc / max(num_mcmc_steps, 1)
        # Steer the step multiplier towards the optimal acceptance rate for the next stage.
        mult = c.mult * jnp.exp(jnp.clip(2.0 * (acc - goal_acc), -1.0, 1.0))
        return _Carry(
            points=points,
            log_w=jnp.where(alive, jnp.zeros_like(log_w), log_w),
            lam=jnp.where(alive, lam, 1.0),
            log_Z=log_Z,
            stage=k + 1,
            mult=mult if num_mcmc_steps > 0 else c.mult,
            ess=c.ess.at[k].set(ess),
            ancestors=c.ancestors.at[k].set(idx),
            lambdas=c.lambdas.at[k].set(lam),
            acceptance=c.acceptance.at[k].set(acc),
            multipliers=c.multipliers.at[k].set(c.mult),
            nonfinite=c.nonfinite | jnp.any(points.nonfinite),
            dead=~alive,
        )

    c = jax.lax.while_loop(cond, body, carry)
    log_Z = c.log_Z
    all_zero = c.dead | ~jnp.any(jnp.isfinite(c.log_w))
    log_Z = jnp.where(all_zero, -jnp.inf, log_Z)
    # the padding rows after a collapse describe a dead population: ESS 0, not the N of an idle stage
    ess = jnp.where(all_zero & (jnp.arange(max_stages) >= c.stage), 0.0, c.ess)
    per_move = mcmc_lib.evaluations_per_move(mcmc, num_leapfrog)
    nfe = 2 * n + c.stage * (n * num_mcmc_steps * per_move)
    particles = Particles(c.points.draw, c.log_w, log_Z, ess, c.ancestors, nfe.astype(jnp.int32), c.nonfinite, all_zero)
    particles = mark_invalid_beta(particles, target.beta)
    info = TemperedInfo(c.stage, c.lambdas, c.acceptance, c.multipliers)
    return particles, info


_compiled = filter_jit(run_tempered)


def _check(target, num_particles, ess_target, mcmc, num_mcmc_steps, num_leapfrog, max_stages, schedule, mesh, key=None):
    """Validate the arguments of :func:`tempered_smc`; returns (N, ess_target, num_mcmc_steps, num_leapfrog,
    max_stages) normalised to Python numbers."""
    num_particles = check_static_inputs(target, num_particles, mesh, key=key)
    ess_target = check_fraction(ess_target, "ess_target", open_ends=True)
    if not isinstance(mcmc, str) or mcmc not in mcmc_lib.KERNELS:
        raise ValueError(f"mcmc must be one of {sorted(mcmc_lib.KERNELS)}; got {mcmc!r}")
    num_mcmc_steps = check_count(num_mcmc_steps, "num_mcmc_steps", 0)
    num_leapfrog = check_count(num_leapfrog, "num_leapfrog", 1)
    max_stages = check_count(max_stages, "max_stages", 1)
    z_shape = jax.eval_shape(lambda k: target.program.init(k)[0], jax.random.key(0))
    discrete = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(z_shape)[0]
        if not jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    if discrete:
        raise ValueError(
            f"tempered_smc moves continuous choices only; the program has discrete choices at {discrete} "
            "(use importance_sampling, or marginalise them out)"
        )
    if schedule is not None:
        sched = jnp.asarray(schedule)
        if sched.ndim != 1 or sched.shape[0] != max_stages:
            raise ValueError(f"schedule must have shape (max_stages,) = ({max_stages},); got {sched.shape}")
        if not isinstance(sched, jax.core.Tracer):
            import numpy as np

            s = np.asarray(sched)
            if np.any(np.diff(s) < 0) or s[0] < 0 or s[-1] != 1.0 or np.any(s > 1):
                raise ValueError("schedule must be non-decreasing in [0, 1] and end at 1")
    return num_particles, ess_target, num_mcmc_steps, num_leapfrog, max_stages


def tempered_smc_with_info(
    key: jax.Array,
    target: StaticTilted,
    num_particles: int,
    *,
    ess_target: float = 0.5,
    mcmc: str = "rwmh",
    num_mcmc_steps: int = 5,
    num_leapfrog: int = 5,
    max_stages: int = 50,
    schedule: Optional[jax.Array] = None,
    mesh=None,
) -> tuple[Particles, TemperedInfo]:
    """:func:`tempered_smc`, also returning the :class:`TemperedInfo` (stages run, λ schedule, acceptance)."""
    num_particles, ess_target, num_mcmc_steps, num_leapfrog, max_stages = _check(
        target, num_particles, ess_target, mcmc, num_mcmc_steps, num_leapfrog, max_stages, schedule, mesh, key
    )
    if schedule is not None:
        schedule = jnp.asarray(schedule, jnp.float32)
    particles, info = _compiled(
        key, target, num_particles, ess_target, mcmc, num_mcmc_steps, num_leapfrog, max_stages, schedule, mesh
    )
    return raise_on_nonfinite(particles, target.reward), info


def tempered_smc(
    key: jax.Array,
    target: StaticTilted,
    num_particles: int,
    *,
    ess_target: float = 0.5,
    mcmc: str = "rwmh",
    num_mcmc_steps: int = 5,
    num_leapfrog: int = 5,
    max_stages: int = 50,
    schedule: Optional[jax.Array] = None,
    mesh=None,
) -> Particles:
    """Reward-tempered SMC on a static target (``pplalign.tilt`` of a genjax or numpyro program).

    Args:
      key: PRNG key; every draw derives from it by ``split``/``fold_in``.
      target: ``pplalign.tilt(program, reward, beta, args=...)``.
      num_particles: N (divisible by the mesh's device count when ``mesh`` is given).
      ess_target: the fraction of N that the ESS may fall to at each stage (the bisection's goal).
      mcmc: ``"rwmh"``, ``"mala"`` or ``"hmc"`` rejuvenation (see :mod:`pplalign.mcmc`).
      num_mcmc_steps: moves per particle per stage. num_leapfrog: leapfrog steps per HMC move.
      max_stages: the static bound of the ``while_loop``; the last stage jumps to λ = 1.
      schedule: optional fixed λ schedule [max_stages], non-decreasing, ending at 1 (exactly unbiased Ẑ).
      mesh: optional ``jax.sharding.Mesh`` sharding the particle axis; resampling is global.

    Returns:
      :class:`Particles` with ``samples`` a :class:`pplalign.static.Draw` [N] (choices, retval), equal
      log-weights (every stage ends with a resampling), log Ẑ, ``ess``/``ancestors`` [max_stages, …] padded as
      described in the module docstring, and ``nfe`` the number of density evaluations.
    """
    return tempered_smc_with_info(
        key,
        target,
        num_particles,
        ess_target=ess_target,
        mcmc=mcmc,
        num_mcmc_steps=num_mcmc_steps,
        num_leapfrog=num_leapfrog,
        max_stages=max_stages,
        schedule=schedule,
        mesh=mesh,
    )[0]
