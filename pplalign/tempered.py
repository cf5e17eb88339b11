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
3. **Resample** (systematic, global over the particle axis) and **move** with MCMC moves invariant for
   π_{λ_k} (:mod:`pplalign.mcmc`), with per-coordinate steps h = c·s, s the weighted sd of the reweighted
   cloud (a diagonal preconditioner, as blackjax's inner-kernel tuning sets the inverse mass matrix to the
   particles' variances) and c adapted between stages towards the kernel's optimal acceptance (or
   ``target_acceptance``); ``step_size`` sets the initial c, ``adapt_step=False`` holds it. The moves are

   * ``num_mcmc_steps`` per particle (default), or
   * between ``num_mcmc_steps`` and ``max_mcmc_steps``, stopping once the cumulative expected squared jump in
     sd units reaches ``esjd_target`` (:func:`pplalign.mcmc.move_population`), or
   * ``waste_free=M`` (Dau & Chopin 2022): resample only M ≪ N particles, run each as a chain of N/M − 1
     moves and keep every state, N particles again (M must divide N). Ẑ keeps the same product form and
     stays unbiased at a fixed schedule; the stage costs N − M moves instead of N·``num_mcmc_steps``.

What the ESS target means, and blackjax's. Our λ_k is solved on the cloud it reweights, so the ESS of the
incremental weights that are applied is the target (``benchmarks.tempered_schedule_compare`` prints it per
stage: 0.500·N at every adaptive stage). blackjax's ``adaptive_tempered_smc`` solves for δ on the particles
*before* its resample-and-move (a cloud of π_{λ_{k−2}}) and applies δ to the moved cloud of π_{λ_{k−1}}, on
which ℓ is more concentrated: at ``target_ess=0.5`` the applied ESS is 0.65–0.75·N, hence its 6 stages to our
4–5 on the D = 5 conjugate Gaussian. The two are the same rule only at matched *applied* ESS (ours at
``ess_target`` ≈ 0.7). Figures and which settings to use when: ``docs/programs_and_scaling.md``.

Ẑ = Π_k Σ_i W_i^{k−1} e^{(λ_k−λ_{k−1})ℓ_i} (times the mean constraint weight) is unbiased for Z for a fixed
schedule (Del Moral et al. 2006); with the adaptive schedule its bias is O(1/N) (Beskos, Jasra, Kantas &
Thiery 2016). For an exactly unbiased Ẑ, run once adaptively and pass the returned ``info.lambdas`` as
``schedule`` to a second run with a fresh key.

Padding. ``Particles.ess`` and ``.ancestors`` have ``max_stages`` rows, one per stage that *could* run; rows
of stages that did not run are the values of a stage that neither reweights nor resamples: ESS = N and
identity ancestors. ``ess[k]`` is the ESS after reweighting at stage k, before resampling. The number of
stages used and the λ schedule are in :class:`TemperedInfo`.

NFE counts per-particle evaluations of the program's density (with or without its gradient; a gradient
evaluation counts one): N for the initial draws, N to score them, and at each stage the particle-moves made
(N·moves, or N − M waste-free) times 1 (RWMH, MALA) or ``num_leapfrog`` (HMC). ``info.num_moves`` has the
moves per particle (chain length) of each stage.

Bad input raises ``ValueError``: a step size ≤ 0, a waste-free M that does not divide N, and a program whose
log density is NaN at the initial particles (the site is named: :func:`pplalign.static.nan_sites`).
"""

from __future__ import annotations

import inspect
import math
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
from .static import StaticTilted, check_static_inputs, nan_sites

__all__ = ["tempered_smc", "tempered_smc_with_info", "TemperedInfo", "run_tempered"]

_BISECTION_STEPS = 40


class TemperedInfo(NamedTuple):
    num_stages: jax.Array  # [] int32, stages run
    lambdas: jax.Array  # [max_stages] λ_k reached at each stage; 1.0 after the last
    acceptance: jax.Array  # [max_stages] mean MCMC acceptance rate at each stage; 0 where none ran
    step_multiplier: jax.Array  # [max_stages] the multiplier c of the per-coordinate step used at each stage
    num_moves: jax.Array  # [max_stages] int32 moves per particle at each stage (chain length for waste-free)
    nan_at_init: jax.Array  # [] bool: log p(z, c) or log p(c | z) was NaN at an initial particle


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
    moves: jax.Array
    particle_moves: jax.Array
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


def _stage_moves(key, points, log_w, lam, scale, mult, alive, n, opts: "_MoveOptions", kernel, evaluate, mesh):
    """Resample and move one stage's cloud: N resampled particles × (min..max) moves, or waste-free M chains
    of N/M − 1 moves with every state kept. Returns (points, ancestors [N], MoveStats, particle-moves made)."""
    resample_key, move_key = jax.random.split(key)
    constrain = lambda p: constrain_particles(p, mesh)
    take = lambda pts, idx: jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, idx, axis=0), pts)
    if opts.waste_free is None:
        idx = jnp.where(alive, resampling_lib.systematic(resample_key, log_w, n), jnp.arange(n, dtype=jnp.int32))
        points, stats = mcmc_lib.move_population(
            move_key, constrain(take(points, idx)), lam, scale, mult, kernel, evaluate, opts.num_leapfrog,
            opts.min_moves, opts.max_moves, opts.esjd_target, constrain,
        )
        return points, idx, stats, n * stats.moves
    m = opts.waste_free
    idx_m = jnp.where(alive, resampling_lib.systematic(resample_key, log_w, m), jnp.arange(m, dtype=jnp.int32))
    points, stats = mcmc_lib.waste_free_population(
        move_key, take(points, idx_m), lam, scale, mult, kernel, evaluate, opts.num_leapfrog, n // m - 1, constrain
    )
    return points, jnp.tile(idx_m, n // m), stats, jnp.asarray(n - m, jnp.int32)


class _MoveOptions(NamedTuple):
    num_leapfrog: int
    min_moves: int
    max_moves: int
    esjd_target: float
    waste_free: Optional[int]


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
    step_size: Optional[float] = None,
    adapt_step: bool = True,
    target_acceptance: Optional[float] = None,
    max_mcmc_steps: Optional[int] = None,
    esjd_target: float = 1.0,
    waste_free: Optional[int] = None,
) -> tuple[Particles, TemperedInfo]:
    """The compiled body of :func:`tempered_smc` (call that instead; this one does no input checks)."""
    n = num_particles
    kernel = mcmc_lib.KERNELS[mcmc]
    with_grad = mcmc_lib.needs_grad(mcmc)
    init_key, run_key = jax.random.split(key)
    opts = _MoveOptions(num_leapfrog, num_mcmc_steps, max(num_mcmc_steps, max_mcmc_steps or 0), esjd_target, waste_free)

    keys = constrain_particles(jax.random.split(init_key, n), mesh)
    zs, log_w0, _ = jax.vmap(target.program.init)(keys)
    flat0, unravel = ravel_pytree(jax.tree_util.tree_map(lambda leaf: leaf[0], zs))
    positions = jax.vmap(lambda z: ravel_pytree(z)[0])(zs).astype(jnp.float32)
    dim = flat0.shape[0]
    evaluate = mcmc_lib.make_evaluate(target, unravel, with_grad)
    points = constrain_particles(jax.vmap(lambda x: evaluate(x, 0.0))(constrain_particles(positions, mesh)), mesh)
    # a NaN density or a NaN draw (a NaN parameter makes both) at the prior's own draws is a broken program
    nan_at_init = jnp.any(points.nan_base) | jnp.any(jnp.isnan(log_w0)) | ~jnp.all(jnp.isfinite(positions))
    log_w0 = jnp.where(jnp.isnan(log_w0) | (log_w0 == jnp.inf), -jnp.inf, jnp.asarray(log_w0, jnp.float32))
    mult0 = mcmc_lib.default_step_multiplier(mcmc, dim) if step_size is None else step_size

    identity = jnp.arange(n, dtype=jnp.int32)
    carry = _Carry(
        points=points,
        log_w=log_w0,
        lam=jnp.zeros((), jnp.float32),
        log_Z=_lme(log_w0),  # the constraints' importance weights, log mean p(c | z_i); 0 without constraints
        stage=jnp.zeros((), jnp.int32),
        mult=jnp.asarray(mult0, jnp.float32),
        ess=jnp.full((max_stages,), float(n), jnp.float32),
        ancestors=jnp.broadcast_to(identity, (max_stages, n)),
        lambdas=jnp.ones((max_stages,), jnp.float32),
        acceptance=jnp.zeros((max_stages,), jnp.float32),
        multipliers=jnp.zeros((max_stages,), jnp.float32),
        moves=jnp.zeros((max_stages,), jnp.int32),
        particle_moves=jnp.zeros((), jnp.int32),
        nonfinite=jnp.any(points.nonfinite),
        dead=jnp.zeros((), bool),
    )
    goal_acc = mcmc_lib.target_acceptance(mcmc) if target_acceptance is None else target_acceptance
    moves_at_all = opts.max_moves > 0 or waste_free is not None

    def cond(c: _Carry):
        return (c.lam < 1.0) & (c.stage < max_stages) & ~c.dead

    def body(c: _Carry):
        k = c.stage
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
        # per-coordinate spread of π_{λ_k}, from the reweighted cloud (a diagonal preconditioner)
        scale = _weighted_spread(c.points.position, log_w)
        # the cached ∇ log π_{λ_{k-1}} carried to λ_k from the cached ∇ℓ, so the moves evaluate nothing extra
        retempered = mcmc_lib.retemper(c.points, lam - c.lam)
        points, idx, stats, particle_moves = _stage_moves(
            jax.random.fold_in(run_key, k), retempered, log_w, lam, scale, c.mult, alive, n, opts, kernel, evaluate,
            mesh,
        )
        adapted = mcmc_lib.adapt_multiplier(c.mult, stats.acceptance, goal_acc)
        return _Carry(
            points=points,
            log_w=jnp.where(alive, jnp.zeros_like(log_w), log_w),
            lam=jnp.where(alive, lam, 1.0),
            log_Z=log_Z,
            stage=k + 1,
            mult=adapted if (adapt_step and moves_at_all) else c.mult,
            ess=c.ess.at[k].set(ess),
            ancestors=c.ancestors.at[k].set(idx),
            lambdas=c.lambdas.at[k].set(lam),
            acceptance=c.acceptance.at[k].set(stats.acceptance),
            multipliers=c.multipliers.at[k].set(c.mult),
            moves=c.moves.at[k].set(stats.moves),
            particle_moves=c.particle_moves + particle_moves,
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
    nfe = 2 * n + c.particle_moves * per_move
    particles = Particles(c.points.draw, c.log_w, log_Z, ess, c.ancestors, nfe.astype(jnp.int32), c.nonfinite, all_zero)
    particles = mark_invalid_beta(particles, target.beta)
    info = TemperedInfo(c.stage, c.lambdas, c.acceptance, c.multipliers, c.moves, nan_at_init)
    return particles, info


_compiled = filter_jit(run_tempered)


def _check(target, num_particles, ess_target, mcmc, num_mcmc_steps, num_leapfrog, max_stages, schedule, mesh, key=None,
           **moves):
    """Validate the arguments of :func:`tempered_smc`; returns (N, ess_target, num_mcmc_steps, num_leapfrog,
    max_stages, move options) normalised to Python numbers."""
    num_particles = check_static_inputs(target, num_particles, mesh, key=key)
    ess_target = check_fraction(ess_target, "ess_target", open_ends=True)
    if not isinstance(mcmc, str) or mcmc not in mcmc_lib.KERNELS:
        raise ValueError(f"mcmc must be one of {sorted(mcmc_lib.KERNELS)}; got {mcmc!r}")
    num_mcmc_steps = check_count(num_mcmc_steps, "num_mcmc_steps", 0)
    num_leapfrog = check_count(num_leapfrog, "num_leapfrog", 1)
    max_stages = check_count(max_stages, "max_stages", 1)
    moves = _check_moves(num_particles, num_mcmc_steps, **moves)
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
    return num_particles, ess_target, num_mcmc_steps, num_leapfrog, max_stages, moves


def _check_moves(n, num_mcmc_steps, step_size, adapt_step, target_acceptance, max_mcmc_steps, esjd_target, waste_free):
    if step_size is not None:
        step = float(step_size)
        if not math.isfinite(step) or step <= 0:
            raise ValueError(f"step_size must be a finite number > 0; got {step_size!r}")
        step_size = step
    if not isinstance(adapt_step, bool):
        raise ValueError(f"adapt_step must be a bool; got {adapt_step!r}")
    if target_acceptance is not None:
        target_acceptance = check_fraction(target_acceptance, "target_acceptance", open_ends=True)
    if max_mcmc_steps is not None:
        max_mcmc_steps = check_count(max_mcmc_steps, "max_mcmc_steps", max(num_mcmc_steps, 1))
    esjd = float(esjd_target)
    if not math.isfinite(esjd) or esjd <= 0:
        raise ValueError(f"esjd_target must be a finite number > 0; got {esjd_target!r}")
    if waste_free is not None:
        waste_free = check_count(waste_free, "waste_free", 1)
        if n % waste_free != 0 or waste_free >= n:
            raise ValueError(
                f"waste_free M must divide num_particles N = {n} and be < N (each of the M chains makes N/M − 1 "
                f"moves); got M = {waste_free}"
            )
        if max_mcmc_steps is not None:
            raise ValueError("waste_free fixes the moves per chain at N/M − 1; do not also pass max_mcmc_steps")
    return dict(step_size=step_size, adapt_step=adapt_step, target_acceptance=target_acceptance,
                max_mcmc_steps=max_mcmc_steps, esjd_target=esjd, waste_free=waste_free)


def _raise_on_nan_at_init(key, target: StaticTilted, n: int) -> None:
    """Redraw the initial particles of the run (same keys as :func:`run_tempered`) and name the sites where
    the program's log density is NaN."""
    init_key = jax.random.split(key)[0]
    zs, log_w0, _ = jax.vmap(target.program.init)(jax.random.split(init_key, n))
    log_p = jax.vmap(lambda z: target.program.evaluate(z)[0])(zs)
    flat = jax.vmap(lambda z: ravel_pytree(z)[0])(zs)
    bad = jnp.isnan(log_p) | jnp.isnan(log_w0) | ~jnp.all(jnp.isfinite(flat), axis=-1)
    i = int(jnp.argmax(bad))
    z_i = jax.tree_util.tree_map(lambda leaf: leaf[i], zs)
    sites = nan_sites(target.program, z_i)
    where = f"at site(s) {sites}" if sites else "(the program gives no per-site density to name the site)"
    raise ValueError(
        f"the target's log density is NaN at {int(jnp.sum(bad))} of {n} initial particles, first at particle {i}, "
        f"{where}: fix the program's parameters or support"
    )


# the keywords of tempered_smc and their defaults: run_tempered's, whose signature is the one place they live
# the move options, validated by _check_moves
MOVE_OPTIONS = ("step_size", "adapt_step", "target_acceptance", "max_mcmc_steps", "esjd_target", "waste_free")
_OPTIONS = {
    name: param.default
    for name, param in inspect.signature(run_tempered).parameters.items()
    if param.default is not inspect.Parameter.empty
}


def tempered_smc_with_info(key: jax.Array, target: StaticTilted, num_particles: int, **options) -> tuple[Particles, TemperedInfo]:
    """:func:`tempered_smc`, also returning the :class:`TemperedInfo` (stages run, λ schedule, acceptance)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"tempered_smc got unexpected keyword(s) {unknown}; it takes {sorted(_OPTIONS)}")
    o = _OPTIONS | options
    schedule, mesh, mcmc = o["schedule"], o["mesh"], o["mcmc"]
    num_particles, ess_target, num_mcmc_steps, num_leapfrog, max_stages, moves = _check(
        target, num_particles, o["ess_target"], mcmc, o["num_mcmc_steps"], o["num_leapfrog"], o["max_stages"],
        schedule, mesh, key, **{name: o[name] for name in MOVE_OPTIONS},
    )
    if schedule is not None:
        schedule = jnp.asarray(schedule, jnp.float32)
    particles, info = _compiled(
        key, target, num_particles, ess_target, mcmc, num_mcmc_steps, num_leapfrog, max_stages, schedule, mesh,
        **moves,
    )
    if bool(info.nan_at_init):
        _raise_on_nan_at_init(key, target, num_particles)
    return raise_on_nonfinite(particles, target.reward), info


def tempered_smc(key: jax.Array, target: StaticTilted, num_particles: int, **options) -> Particles:
    """Reward-tempered SMC on a static target (``pplalign.tilt`` of a genjax or numpyro program).

    Args (all but the first three keyword-only; defaults in ``_OPTIONS``, those of :func:`run_tempered`):
      key: PRNG key; every draw derives from it by ``split``/``fold_in``.
      target: ``pplalign.tilt(program, reward, beta, args=...)``.
      num_particles: N (divisible by the mesh's device count when ``mesh`` is given).
      ess_target: the fraction of N that the ESS of the incremental weights falls to at each stage.
      mcmc: ``"rwmh"``, ``"mala"`` or ``"hmc"`` rejuvenation (see :mod:`pplalign.mcmc`).
      num_mcmc_steps: moves per particle per stage (the minimum when ``max_mcmc_steps`` is given).
      num_leapfrog: leapfrog steps per HMC move.
      max_stages: the static bound of the ``while_loop``; the last stage jumps to λ = 1.
      schedule: optional fixed λ schedule [max_stages], non-decreasing, ending at 1 (exactly unbiased Ẑ).
      mesh: optional ``jax.sharding.Mesh`` sharding the particle axis; resampling is global.
      step_size: the initial multiplier c of the per-coordinate step h = c·(weighted particle sd), > 0
        (default: the kernel's optimal-scaling rule, :func:`pplalign.mcmc.default_step_multiplier`).
      adapt_step: adapt c between stages towards ``target_acceptance`` (default: the kernel's optimum).
      max_mcmc_steps: with it, each stage moves until the cumulative ESJD in sd units reaches
        ``esjd_target`` (between ``num_mcmc_steps`` and ``max_mcmc_steps`` moves).
      waste_free: M, a divisor of N below N: waste-free moves (Dau & Chopin 2022), M resampled particles
        each running a chain of N/M − 1 moves, every state kept (``num_mcmc_steps`` is then unused).

    Returns:
      :class:`Particles` with ``samples`` a :class:`pplalign.static.Draw` [N] (choices, retval), equal
      log-weights (every stage ends with a resampling), log Ẑ, ``ess``/``ancestors`` [max_stages, …] padded as
      described in the module docstring, and ``nfe`` the number of density evaluations.

    Raises:
      ValueError: on bad arguments, and when the program's log density is NaN at an initial particle (the
        message names the site where the program has named sites).
    """
    return tempered_smc_with_info(key, target, num_particles, **options)[0]
