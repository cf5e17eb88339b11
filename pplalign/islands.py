"""Island SMC and batched targets: scale-out without cross-device resampling, and many prompts in one call.

**Islands** (Vergé, Dubarry, Del Moral & Moulines 2015). The N particles are split into I independent
sub-samplers of M = N/I particles ("islands"), each a full SMC (or tempered SMC, or importance sampling) with
its own key and its own resampling. Island i returns Ẑ_i, unbiased for Z, and weighted particles (W_ij); the
islands are independent, so

    Ẑ = (1/I) Σ_i Ẑ_i            (log Ẑ = log-mean-exp of the island log Ẑ_i)

is unbiased too, and the pooled particles weighted by Ẑ_i W_ij / Σ_k Ẑ_k approximate σ. The island axis is
sharded over the mesh, so each device runs its islands with no communication until the final pooling —
the alternative to :func:`pplalign.smc`'s global resampling (``mesh=``), which gathers across devices at
every resampling but has the lower variance of one population of N.

**Batches** (:func:`many`): many targets — prompts, rewards, β — that share a structure, with array
leaves stacked on a leading axis, sampled by one compiled ``vmap`` with N particles each; the particle
axis may be sharded over the mesh as in a single run.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from ._filter_jit import filter_jit
from ._validation import check_count, check_key
from .distributed import check_mesh, constrain_particles
from .particles import Particles, raise_on_nonfinite

__all__ = ["island_smc", "many", "pool_islands"]


def _runner(target: Any, sampler: Optional[str]):
    """The uncompiled run function for ``sampler`` (default by target type): (key, target, n, mesh, **kw)."""
    from .programs import Tilted
    from .static import StaticTilted

    if sampler is None:
        sampler = "smc" if isinstance(target, Tilted) else "tempered"
    if sampler == "smc":
        if not isinstance(target, Tilted):
            raise ValueError(f"sampler='smc' needs a sequential target from pplalign.tilt; got {type(target).__name__}")
        from .smc import run_smc

        return lambda key, t, n, mesh, **kw: run_smc(key, t, n, mesh=mesh, **kw)
    if sampler == "tempered":
        if not isinstance(target, StaticTilted):
            raise ValueError(f"sampler='tempered' needs a static target (genjax/numpyro program); got {type(target).__name__}")
        from .tempered import run_tempered

        return lambda key, t, n, mesh, **kw: run_tempered(key, t, n, mesh=mesh, **kw)[0]
    if sampler == "is":
        if isinstance(target, Tilted):
            from .smc import run_smc

            return lambda key, t, n, mesh, **kw: run_smc(key, t, n, ess_threshold=0.0, mesh=mesh, **kw)
        from .static import _run_is

        return lambda key, t, n, mesh, **kw: _run_is(key, t, n, kw.get("proposal"), mesh)
    raise ValueError(f"sampler must be 'smc', 'tempered' or 'is'; got {sampler!r}")


def _check_target(target: Any, sampler: Optional[str], num_particles: Any, kwargs: dict) -> None:
    """The checks of the sampler each island runs (its ``kwargs`` normalised in place: a string resampler
    becomes the function, numpy counts and 0-d thresholds become Python numbers)."""
    from .programs import Tilted

    if isinstance(target, Tilted):
        from . import resampling as resampling_lib
        from ._validation import check_inputs

        threshold = check_inputs(target, num_particles, kwargs.get("ess_threshold", 0.5))[1]
        if "ess_threshold" in kwargs:
            kwargs["ess_threshold"] = threshold
        if "resampling" in kwargs:
            kwargs["resampling"] = resampling_lib.resolve(kwargs["resampling"])
    else:
        from .static import check_static_inputs

        check_static_inputs(target, num_particles)
        if sampler in (None, "tempered"):
            from .tempered import _OPTIONS, MOVE_OPTIONS, _check

            get = lambda name: kwargs.get(name, _OPTIONS[name])  # noqa: E731
            checked = _check(target, num_particles, get("ess_target"), get("mcmc"), get("num_mcmc_steps"),
                             get("num_leapfrog"), get("max_stages"), get("schedule"), None,
                             **{name: get(name) for name in MOVE_OPTIONS})
            names = ("ess_target", "num_mcmc_steps", "num_leapfrog", "max_stages")
            kwargs.update({k: v for k, v in zip(names, checked[1:]) if k in kwargs})
            kwargs.update({k: v for k, v in checked[5].items() if k in kwargs})
    _runner(target, sampler)


def pool_islands(islands: Particles) -> Particles:
    """Pool per-island :class:`Particles` (every field with a leading island axis I) into one population.

    log Ẑ = log-mean-exp_i log Ẑ_i; particle j of island i gets log-weight log Ẑ_i + log W_ij (W normalised
    within the island); ancestors become global indices; ``ess`` [T] is the sum of the island ESSs; ``nfe``
    the total."""
    num_islands, m = islands.log_weights.shape
    log_Z_i = islands.log_Z
    lw = islands.log_weights
    mx = jnp.max(lw, axis=1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    lse = jnp.log(jnp.sum(jnp.exp(lw - mx), axis=1, keepdims=True)) + mx
    log_W = jnp.where(jnp.isfinite(lw), lw - jnp.where(jnp.isfinite(lse), lse, 0.0), -jnp.inf)
    log_weights = jnp.where(jnp.isfinite(log_Z_i)[:, None], log_Z_i[:, None] + log_W, -jnp.inf).reshape(-1)
    top = jnp.max(log_Z_i)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    log_Z = jnp.log(jnp.mean(jnp.exp(log_Z_i - safe))) + safe
    all_zero = jnp.all(islands.all_zero) | ~jnp.isfinite(top)
    log_Z = jnp.where(all_zero, -jnp.inf, log_Z)
    offsets = (jnp.arange(num_islands, dtype=jnp.int32) * m)[:, None, None]
    ancestors = jnp.transpose(islands.ancestors + offsets, (1, 0, 2)).reshape(islands.ancestors.shape[1], -1)
    samples = jax.tree_util.tree_map(lambda leaf: leaf.reshape((num_islands * m,) + leaf.shape[2:]), islands.samples)
    return Particles(
        samples,
        log_weights,
        log_Z,
        jnp.sum(islands.ess, axis=0),
        ancestors,
        jnp.sum(islands.nfe).astype(jnp.int32),
        jnp.any(islands.nonfinite_reward),
        all_zero,
        jnp.any(islands.nonfinite_twist),
        jnp.any(islands.invalid_beta),
    )


def _run_islands(key, target, num_particles, num_islands, sampler, mesh, kwargs):
    run = _runner(target, sampler)
    keys = constrain_particles(jax.random.split(key, num_islands), mesh)
    m = num_particles // num_islands
    per_island = jax.vmap(lambda k: run(k, target, m, None, **dict(kwargs)))(keys)
    per_island = constrain_particles(per_island, mesh)
    return pool_islands(per_island), per_island


_compiled_islands = filter_jit(_run_islands)


def island_smc(
    key: jax.Array,
    target: Any,
    num_particles: int,
    *,
    num_islands: Optional[int] = None,
    sampler: Optional[str] = None,
    mesh=None,
    return_islands: bool = False,
    **kwargs: Any,
):
    """Run ``num_islands`` independent samplers of N/I particles each and pool them (module docstring).

    Args:
      key: PRNG key; island i uses ``jax.random.split(key, I)[i]``, so its result equals a single run of
        the sampler with that key and N/I particles.
      target: a sequential target (``sampler`` default ``"smc"``) or a static one (default ``"tempered"``);
        ``"is"`` runs importance sampling in each island.
      num_particles: N in total; must be divisible by I.
      num_islands: I (default: the mesh's device count, or 1 without a mesh); a multiple of the device count.
      mesh: shards the island axis; devices exchange nothing until the pooling.
      return_islands: also return the per-island :class:`Particles` (leading axis I).
      **kwargs: passed to the sampler (``twist``, ``ess_threshold``… for SMC; ``mcmc``, ``ess_target``,
        ``max_stages``… for tempered SMC).
    """
    if num_islands is None:
        num_islands = 1 if mesh is None else int(mesh.devices.size)
    check_key(key)
    num_islands = check_count(num_islands, "num_islands")
    num_particles = check_count(num_particles, "num_particles")
    if num_particles % num_islands:
        raise ValueError(f"num_particles={num_particles} is not divisible by num_islands={num_islands}")
    if mesh is not None and num_islands % mesh.devices.size:
        raise ValueError(f"num_islands={num_islands} is not divisible by the mesh's {mesh.devices.size} devices")
    check_mesh(mesh, num_particles)
    _check_target(target, sampler, num_particles // num_islands, kwargs)
    pooled, per_island = _compiled_islands(key, target, num_particles, num_islands, sampler, mesh, tuple(sorted(kwargs.items())))
    pooled = raise_on_nonfinite(pooled, target.reward, kwargs.get("twist"))
    return (pooled, per_island) if return_islands else pooled


def _run_many(key, targets, num_particles, sampler, in_axes, mesh, kwargs):
    leaves = [x for x in jax.tree_util.tree_leaves(targets) if hasattr(x, "shape") and x.ndim > 0]
    batch = leaves[0].shape[0]
    keys = jax.random.split(key, batch)
    one = jax.tree_util.tree_map(lambda leaf: leaf[0], targets) if in_axes == 0 else targets
    run = _runner(one, sampler)
    return jax.vmap(lambda k, t: run(k, t, num_particles, mesh, **dict(kwargs)), in_axes=(0, in_axes))(keys, targets)


_compiled_many = filter_jit(_run_many)


def _check_batch(targets: Any, kwargs: dict) -> None:
    """Every concrete β of the batch valid (a traced one is flagged per row, ``Particles.invalid_beta``);
    the sampler's keyword arguments normalised in place as for one run."""
    import numpy as np

    from . import resampling as resampling_lib
    from ._validation import check_fraction
    from .programs import validate_beta

    beta = getattr(targets, "beta", None)
    if beta is not None and not isinstance(beta, jax.core.Tracer):
        for i, b in enumerate(np.ravel(np.asarray(beta))):
            try:
                validate_beta(b)
            except ValueError as err:
                raise ValueError(f"target {i} of the batch: {err}") from None
    if "ess_threshold" in kwargs:
        kwargs["ess_threshold"] = check_fraction(kwargs["ess_threshold"], "ess_threshold")
    if "resampling" in kwargs:
        kwargs["resampling"] = resampling_lib.resolve(kwargs["resampling"])


def many(
    key: jax.Array,
    targets: Any,
    num_particles: int,
    *,
    sampler: Optional[str] = None,
    in_axes: Any = 0,
    mesh=None,
    **kwargs: Any,
) -> Particles:
    """Sample a batch of B targets (stacked array leaves, e.g. built with ``jax.vmap(lambda p: tilt(...))``)
    with N particles each, in one compiled call. Target b uses ``jax.random.split(key, B)[b]``, so row b
    equals a single run with that key. ``in_axes`` is the ``vmap`` spec of ``targets`` (e.g. to share a
    model's weights across prompts). Every field of the result has a leading axis B. ``mesh`` shards the
    particle axis of every run (N divisible by the device count)."""
    check_key(key)
    num_particles = check_count(num_particles, "num_particles")
    check_mesh(mesh, num_particles)
    leaves = [x for x in jax.tree_util.tree_leaves(targets) if hasattr(x, "shape") and x.ndim > 0]
    if not leaves:
        raise ValueError("targets has no batched array leaf; stack B targets on a leading axis")
    sizes = {x.shape[0] for x in leaves} if in_axes == 0 else None
    if sizes is not None and len(sizes) != 1:
        raise ValueError(f"every array leaf of targets needs the same leading batch axis; got sizes {sorted(sizes)}")
    _check_batch(targets, kwargs)
    kw = tuple(sorted(kwargs.items()))
    result = _compiled_many(key, targets, num_particles, sampler, in_axes, mesh, kw)
    merged = result._replace(nonfinite_reward=jnp.any(result.nonfinite_reward), nonfinite_twist=jnp.any(result.nonfinite_twist))
    raise_on_nonfinite(merged, getattr(targets, "reward", None), kwargs.get("twist"))  # a no-op under the caller's jit
    return result
