"""MCMC moves for reward-tempered SMC on static programs: random-walk Metropolis–Hastings, MALA, HMC.

Each move leaves the tempered target π_λ(z) ∝ p(z, c)·exp(λ·r(f(z))/β) invariant. One particle is a
:class:`Point`, which caches log p(z, c) and the log potential ℓ(z) = r(f(z))/β *separately*, so that raising λ
between SMC stages changes log π_λ = log p + λℓ without evaluating the program again; for MALA/HMC it also
caches ∇ log π_λ and ∇ℓ, and :func:`retemper` moves the former to the next λ (∇ log π_{λ+δ} = ∇ log π_λ + δ∇ℓ).
Inside an HMC trajectory only ∇ log π_λ is formed (one reverse pass per leapfrog step, as in any HMC); ∇ℓ, a
second reverse pass, only at the trajectory's end, the one position that can become the particle.
Positions are flat vectors (``jax.flatten_util.ravel_pytree`` of the choices).

All moves take a per-coordinate step ``h`` [D] (the SMC sampler sets it from the spread of the particle
cloud times an adapted multiplier, a diagonal preconditioner):

- ``rwmh``: z' = z + h∘ξ, accept with min(1, π(z')/π(z)) (Metropolis et al. 1953). One evaluation.
- ``mala``: z' = z + ½h²∘∇log π(z) + h∘ξ, with the Hastings correction of the asymmetric Gaussian proposal
  (Roberts & Tweedie 1996). One evaluation with gradient.
- ``hmc``: ``num_leapfrog`` leapfrog steps of the dynamics with kinetic energy ½|p|² in the coordinates
  y = z/h (Neal 2011); accept with min(1, exp(−ΔH)). ``num_leapfrog`` evaluations with gradient.

A proposal whose density is NaN, −inf or whose position is not finite is rejected.

Population moves (one SMC stage's rejuvenation, all particles at once):

- :func:`move_population`: every particle makes between ``min_moves`` and ``max_moves`` moves of one kernel
  with the stage's step h = c·s (s the per-coordinate spread of the cloud). With ``max_moves > min_moves``
  the moves stop once the cumulative expected squared jump distance in units of s,
  ESJD = Σ_moves mean_i Σ_d ((z'_id − z_id)/s_d)² / D, reaches ``esjd_target`` (an independent draw from a
  target of sd s gives 2 per move; 1 is a population decorrelated to correlation ≈ ½, the rule of
  Buchholz, Chopin & Jacob 2021 in spirit).
- :func:`waste_free_population`: Dau & Chopin (2022) waste-free moves: M resampled particles each start a
  chain of P − 1 moves and every state of every chain is kept, M·P = N particles.
- :func:`adapt_multiplier`: between stages c ← c·exp(clip(γ(ā − a*), −1, ¼)), ā the stage's mean acceptance and
  a* the kernel's optimal one — a population version of a Robbins–Monro step (blackjax's
  ``inner_kernel_tuning`` updates from the population between stages in the same way).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Point",
    "make_evaluate",
    "log_density",
    "grad_log_density",
    "retemper",
    "rwmh",
    "mala",
    "hmc",
    "KERNELS",
    "evaluations_per_move",
    "default_step_multiplier",
    "target_acceptance",
    "MoveStats",
    "move_population",
    "waste_free_population",
    "adapt_multiplier",
]

ADAPT_GAIN = 2.0  # γ of adapt_multiplier: a 0.1 miss of the acceptance changes the step by ≈ 20%


class Point(NamedTuple):
    position: jax.Array  # [D]
    log_base: jax.Array  # [] log p(z, c) in the space of z
    log_tilt: jax.Array  # [] ℓ(z) = r(f(z))/β (may be −inf)
    grad: jax.Array  # [D] ∇ log π_λ = ∇ log p + λ∇ℓ at the stage's λ (zeros for gradient-free moves)
    grad_tilt: jax.Array  # [D] ∇ ℓ, to carry ``grad`` to the next λ (zeros where it was not computed)
    draw: Any  # the program's Draw at z (what the reward saw)
    nonfinite: jax.Array  # [] bool: the reward returned NaN/+inf here
    nan_base: jax.Array  # [] bool: log p(z, c) was NaN here (read as −inf; an error at the initial particles)


def make_evaluate(target: Any, unravel: Callable, with_grad: bool) -> Callable[..., Point]:
    """``evaluate(position, lam, tilt_grad=True)``: the :class:`Point` of one particle of a
    :class:`pplalign.static.StaticTilted` target at a flat position, with ∇ log π_λ.

    ``tilt_grad=False`` skips ∇ℓ (``grad_tilt`` is then zeros): the gradient of log π_λ alone is one reverse
    pass, as in any HMC; ∇ℓ costs a second one and is only needed at the points a move can end on, so that
    :func:`retemper` can carry their gradient to the next stage's λ without evaluating the program again."""

    def values(position):
        log_p, draw = target.program.evaluate(unravel(position))
        return jnp.stack([jnp.asarray(log_p, jnp.float32), jnp.asarray(target.log_potential(draw), jnp.float32)]), draw

    def evaluate(position: jax.Array, lam: jax.Array, tilt_grad: bool = True) -> Point:
        if with_grad:
            vals, pull, draw = jax.vjp(values, position, has_aux=True)
            clean = lambda g: jnp.where(jnp.isfinite(g), g, 0.0)
            lam_ = jnp.where(lam > 0, lam, 0.0).astype(vals.dtype)
            g_tilt = clean(pull(jnp.array([0.0, 1.0], vals.dtype))[0]) if tilt_grad else jnp.zeros_like(position)
            if tilt_grad:
                # ∇ log p from its own pullback, as ∇ log π_λ must not inherit a non-finite ∇ℓ at λ = 0
                grad = clean(pull(jnp.array([1.0, 0.0], vals.dtype))[0]) + lam_ * g_tilt
            else:
                grad = clean(pull(jnp.stack([jnp.ones((), vals.dtype), lam_]))[0])
        else:
            vals, draw = values(position)
            grad = g_tilt = jnp.zeros_like(position)
        log_base, log_tilt = vals[0], vals[1]
        bad = jnp.isnan(log_tilt) | (log_tilt == jnp.inf)
        log_tilt = jnp.where(bad, -jnp.inf, log_tilt)
        nan_base = jnp.isnan(log_base)
        log_base = jnp.where(nan_base | (log_base == jnp.inf), -jnp.inf, log_base)
        off = ~jnp.all(jnp.isfinite(position))
        log_base = jnp.where(off, -jnp.inf, log_base)
        return Point(position, log_base, log_tilt, grad, g_tilt, draw, bad & ~off, nan_base & ~off)

    return evaluate


def retemper(points: Point, delta: jax.Array) -> Point:
    """The points' ∇ log π_λ carried to λ + δ: ∇ log π_{λ+δ} = ∇ log π_λ + δ∇ℓ (exact, no evaluation)."""
    return points._replace(grad=points.grad + jnp.where(delta > 0, delta, 0.0) * points.grad_tilt)


def log_density(point: Point, lam: jax.Array) -> jax.Array:
    """log π_λ = log p + λℓ, with 0·(−inf) read as 0 (at λ = 0 the reward plays no part)."""
    return point.log_base + jnp.where(lam > 0, lam * point.log_tilt, 0.0)


def grad_log_density(point: Point, lam: jax.Array) -> jax.Array:
    """∇ log π_λ at the point; ``point.grad`` was evaluated (or :func:`retemper`-ed) at this λ."""
    del lam
    return point.grad


def _select(accept: jax.Array, new: Point, old: Point) -> Point:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new, old)


def _accept(key, log_ratio):
    # NaN compares False: a NaN ratio rejects.
    return jnp.log(jax.random.uniform(key, minval=1e-38)) < log_ratio


def rwmh(key, point: Point, lam, h, evaluate, num_leapfrog: int = 1):
    k1, k2 = jax.random.split(key)
    new = evaluate(point.position + h * jax.random.normal(k1, point.position.shape), lam)
    accept = _accept(k2, log_density(new, lam) - log_density(point, lam))
    return _select(accept, new, point), accept


def mala(key, point: Point, lam, h, evaluate, num_leapfrog: int = 1):
    k1, k2 = jax.random.split(key)
    h2 = h * h
    mean_fwd = point.position + 0.5 * h2 * grad_log_density(point, lam)
    new = evaluate(mean_fwd + h * jax.random.normal(k1, point.position.shape), lam)
    mean_bwd = new.position + 0.5 * h2 * grad_log_density(new, lam)
    log_q_fwd = -0.5 * jnp.sum((new.position - mean_fwd) ** 2 / h2)
    log_q_bwd = -0.5 * jnp.sum((point.position - mean_bwd) ** 2 / h2)
    log_ratio = log_density(new, lam) - log_density(point, lam) + log_q_bwd - log_q_fwd
    accept = _accept(k2, log_ratio)
    return _select(accept, new, point), accept


def hmc(key, point: Point, lam, h, evaluate, num_leapfrog: int = 5):
    k1, k2 = jax.random.split(key)
    p0 = jax.random.normal(k1, point.position.shape)

    def leapfrog(pt, p, tilt_grad):
        p = p + 0.5 * h * grad_log_density(pt, lam)
        new = evaluate(pt.position + h * p, lam, tilt_grad)
        return new, p + 0.5 * h * grad_log_density(new, lam)

    # only the last position can become the particle, so only it needs ∇ℓ (for retemper)
    (mid, p), _ = jax.lax.scan(lambda c, _: (leapfrog(*c, False), None), (point, p0), None, length=num_leapfrog - 1)
    new, p1 = leapfrog(mid, p, True)
    log_ratio = log_density(new, lam) - 0.5 * jnp.sum(p1 * p1) - log_density(point, lam) + 0.5 * jnp.sum(p0 * p0)
    accept = _accept(k2, log_ratio)
    return _select(accept, new, point), accept


KERNELS = {"rwmh": rwmh, "mala": mala, "hmc": hmc}


def evaluations_per_move(kind: str, num_leapfrog: int) -> int:
    return num_leapfrog if kind == "hmc" else 1


def needs_grad(kind: str) -> bool:
    return kind in ("mala", "hmc")


def default_step_multiplier(kind: str, dim: int) -> float:
    """Initial multiplier c of the per-coordinate spread: the optimal-scaling rules for a Gaussian target,
    2.38/√D for RWMH (Roberts, Gelman & Gilks 1997), 1.65·D^{-1/3} for MALA (Roberts & Rosenthal 1998),
    D^{-1/4} per leapfrog step for HMC (Beskos et al. 2013)."""
    return {"rwmh": 2.38 * dim**-0.5, "mala": 1.65 * dim ** (-1.0 / 3.0), "hmc": dim**-0.25}[kind]


def target_acceptance(kind: str) -> float:
    return {"rwmh": 0.234, "mala": 0.574, "hmc": 0.65}[kind]


def adapt_multiplier(mult: jax.Array, acceptance: jax.Array, goal: float, gain: float = ADAPT_GAIN) -> jax.Array:
    """c·exp(clip(γ(ā − a*), −1, ¼)): raise the step when the moves accept more often than the optimum.
    Increases are capped at ×e^{¼} and decreases at ×e^{−1}: the acceptance of HMC falls off a cliff (the
    leapfrog turns unstable at h ≈ 2σ), so a step grows cautiously towards it and backs off fast."""
    return mult * jnp.exp(jnp.clip(gain * (acceptance - goal), -1.0, 0.25))


class MoveStats(NamedTuple):
    acceptance: jax.Array  # [] mean acceptance over every move made
    moves: jax.Array  # [] int32 moves per particle (per chain for waste-free)


def _vmapped(kernel, lam, h, evaluate, num_leapfrog, constrain):
    def step(key, pts):
        keys = jax.random.split(key, pts.position.shape[0])
        new, accepted = jax.vmap(lambda kk, p: kernel(kk, p, lam, h, evaluate, num_leapfrog))(keys, pts)
        return constrain(new), accepted

    return step


def move_population(key, points: Point, lam, scale, mult, kernel, evaluate, num_leapfrog: int, min_moves: int,
                    max_moves: int, esjd_target: float, constrain=lambda p: p) -> tuple[Point, MoveStats]:
    """``min_moves`` to ``max_moves`` moves of every particle with step h = mult·scale (see module docstring).
    Each move is π_λ-invariant for every particle; the stopping rule looks at the whole population."""
    step = _vmapped(kernel, lam, mult * scale, evaluate, num_leapfrog, constrain)
    dim = points.position.shape[-1]

    def cond(c):
        i, _, _, esjd = c
        return (i < max_moves) & ((i < min_moves) | (esjd < esjd_target))

    def body(c):
        i, pts, acc, esjd = c
        new, accepted = step(jax.random.fold_in(key, i), pts)
        jump = jnp.mean(jnp.sum(((new.position - pts.position) / scale) ** 2, axis=-1)) / dim
        return i + 1, new, acc + jnp.mean(accepted.astype(jnp.float32)), esjd + jump

    zero = jnp.zeros((), jnp.float32)
    i, points, acc, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), points, zero, zero))
    return points, MoveStats(acc / jnp.maximum(i, 1), i)


def waste_free_population(key, starts: Point, lam, scale, mult, kernel, evaluate, num_leapfrog: int,
                          chain_length: int, constrain=lambda p: p) -> tuple[Point, MoveStats]:
    """Dau & Chopin (2022), Algorithm 2: each of the M ``starts`` runs ``chain_length`` = P − 1 moves and every
    state is kept. Returns M·P points ordered (state s, chain m) → s·M + m, state 0 being the start."""
    # M need not divide the mesh: only the N kept states are constrained to it
    step = _vmapped(kernel, lam, mult * scale, evaluate, num_leapfrog, lambda p: p)

    def body(pts, k):
        new, accepted = step(k, pts)
        return new, (new, jnp.mean(accepted.astype(jnp.float32)))

    _, (chain, acc) = jax.lax.scan(body, starts, jax.random.split(key, chain_length))
    every = jax.tree_util.tree_map(
        lambda s, c: jnp.concatenate([s[None], c]).reshape((-1,) + s.shape[1:]), starts, chain
    )
    mean_acc = jnp.mean(acc) if chain_length > 0 else jnp.zeros((), jnp.float32)
    return constrain(every), MoveStats(mean_acc, jnp.asarray(chain_length, jnp.int32))
