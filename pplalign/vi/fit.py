"""Fit variational parameters: a compiled optax loop with a progress bar, checkpoints, exact resume and a
NaN stop that names the step and the offending term.

Step i uses the key ``fold_in(key, i)``, so a run interrupted after a checkpoint and resumed from it
reproduces the uninterrupted run exactly. Steps run in compiled chunks (``lax.scan``); a chunk in which a
loss, a term or a gradient turns non-finite stops at that step without applying it, the last good
parameters are written to ``<checkpoint_dir>/last_good.npz`` (the periodic checkpoint is never overwritten
by bad values) and :class:`NonFiniteLossError` says which step and which term.

The guard costs nothing per step: a chunk runs as a plain scan of (gradient, optimiser update), and only
its outputs are checked, once — the stacked losses and terms, and the final parameters and optimiser state
(a non-finite gradient poisons both through any optax update, NaN·0 being NaN). A chunk that fails the
check is re-run from its start, bit for bit the same steps, by a guarded scan that checks every step and
stops before the first bad one. (Per-step checks and selects on every parameter and moment were a fifth of
the step time of a small model; see ``benchmarks/vi_profile.py``.) An optimiser built to drop non-finite
updates itself (``optax.apply_if_finite``) keeps the parameters finite and so is left to do that.

``params`` may be any pytree (arrays, dicts, ``nnx.State``) or an ``flax.nnx`` module (its ``nnx.Param``
variables are fitted, everything else is held fixed); ``objective(params, key) -> (loss, terms)``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["fit", "FitResult", "NonFiniteLossError", "save_checkpoint", "load_checkpoint"]


class FitResult(NamedTuple):
    params: Any
    opt_state: Any
    losses: np.ndarray  # [steps run in total, including before a resume]
    terms: dict  # name -> [steps] history of each term
    step: int


class NonFiniteLossError(ValueError):
    """The loss (or a term of it, or its gradient) became NaN/inf at ``step``; ``term`` names it."""

    def __init__(self, message: str, step: int, term: str, params: Any, checkpoint: Optional[str]):
        super().__init__(message)
        self.step, self.term, self.params, self.checkpoint = step, term, params, checkpoint


def save_checkpoint(path: str, tree: Any, **meta: Any) -> None:
    """Write a pytree's leaves (and scalar metadata) to ``path`` (.npz) atomically."""
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf_{i}": np.asarray(jax.device_get(leaf)) for i, leaf in enumerate(leaves)}
    arrays.update({f"meta_{k}": np.asarray(v) for k, v in meta.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str, template: Any) -> tuple[Any, dict]:
    """Read a checkpoint into the structure of ``template``; returns (tree, metadata)."""
    with np.load(path) as data:
        leaves, treedef = jax.tree_util.tree_flatten(template)
        new = [jnp.asarray(data[f"leaf_{i}"], dtype=jnp.asarray(l).dtype) for i, l in enumerate(leaves)]
        meta = {k[5:]: data[k] for k in data.files if k.startswith("meta_")}
    return jax.tree_util.tree_unflatten(treedef, new), meta


def _split_module(params):
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return params, None
    if isinstance(params, nnx.Module):
        graphdef, fitted, rest = nnx.split(params, nnx.Param, ...)
        return fitted, (lambda p: nnx.merge(graphdef, p, rest))
    return params, None


def fit(
    objective: Callable,
    params: Any,
    *,
    key: jax.Array,
    num_steps: int,
    optimizer: Optional[optax.GradientTransformation] = None,
    chunk_size: int = 50,
    checkpoint_dir: Optional[str] = None,
    resume: bool = True,
    progress: bool = True,
    desc: Optional[str] = None,
) -> FitResult:
    """Minimise ``objective`` over ``params`` for ``num_steps`` optimiser steps.

    Args:
      objective: ``(params, key) -> (loss, terms)`` (every :mod:`pplalign.vi.objectives` builder returns one).
      params: initial parameters (pytree or ``nnx`` module).
      key: PRNG key; step i uses ``fold_in(key, i)``.
      optimizer: an optax transformation (default ``optax.adam(1e-2)``).
      chunk_size: steps per compiled chunk (also the checkpoint period).
      checkpoint_dir: where ``checkpoint.npz`` is kept (written after every finite chunk); with ``resume``
        a run finds it and continues from its step.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an int >= 0; got {num_steps!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    optimizer = optimizer if optimizer is not None else optax.adam(1e-2)
    fitted, merge = _split_module(params)
    call = (lambda p, k: objective(merge(p), k)) if merge is not None else objective
    if hasattr(objective, "check"):
        objective.check(params if merge is None else merge(fitted))

    opt_state = _init_state(optimizer, fitted)
    start, losses, history = 0, [], {}
    ckpt = os.path.join(checkpoint_dir, "checkpoint.npz") if checkpoint_dir else None
    if ckpt and resume and os.path.exists(ckpt):
        (fitted, opt_state), meta = load_checkpoint(ckpt, (fitted, opt_state))
        start = int(meta["step"])
        losses = list(meta["losses"])
        history = {k[5:]: list(v) for k, v in meta.items() if k.startswith("term_")}
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)

    fast_chunk = functools.partial(_run_chunk_fast, call, optimizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=min(start, num_steps), desc=desc or getattr(objective, "name", "fit"), leave=False)
    step = start
    try:
        while step < num_steps:
            n = min(chunk_size, num_steps - step)
            steps = np.arange(step, step + n, dtype=np.int32)
            fitted_new, opt_new, chunk_loss, chunk_terms, finite = fast_chunk(key, fitted, opt_state, steps)
            # one host transfer per chunk for the check and the histories
            chunk_loss, chunk_terms, finite = jax.device_get((chunk_loss, chunk_terms, finite))
            # the term names come from the compiled chunk itself (no separate trace of the objective per call)
            term_names = sorted(chunk_terms)
            bad_step = -1
            if not bool(finite):  # rare: find the step and the term, and the parameters before it
                guarded = _run_chunk(call, optimizer, tuple(term_names), key, fitted, opt_state, steps)
                fitted_new, opt_new, bad_step, bad_code, chunk_loss, chunk_terms = guarded
                bad_step = int(bad_step)
            if bad_step >= 0:
                good = bad_step - step
                losses.extend(np.asarray(chunk_loss[:good]).tolist())
                term = (term_names + ["loss", "gradient"])[int(bad_code)]
                path = None
                if checkpoint_dir:
                    path = os.path.join(checkpoint_dir, "last_good.npz")
                    save_checkpoint(path, (fitted_new, opt_new), step=bad_step, losses=np.asarray(losses))
                good_params = fitted_new if merge is None else merge(fitted_new)
                value = chunk_loss[good] if term == "loss" else (chunk_terms[term][good] if term in chunk_terms else None)
                raise NonFiniteLossError(
                    f"non-finite {term!r} at step {bad_step} of {getattr(objective, 'name', 'objective')} "
                    f"(value {value}); stopped before applying it. Last good parameters (after step "
                    f"{bad_step - 1}) are in the error" + (f" and in {path}" if path else "") + ".",
                    bad_step,
                    term,
                    good_params,
                    path,
                )
            fitted, opt_state = fitted_new, opt_new
            losses.extend(np.asarray(chunk_loss).tolist())
            for name in term_names:
                history.setdefault(name, []).extend(np.asarray(chunk_terms[name]).tolist())
            step += n
            if ckpt:
                extra = {f"term_{k}": np.asarray(v) for k, v in history.items()}
                save_checkpoint(ckpt, (fitted, opt_state), step=step, losses=np.asarray(losses), **extra)
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{float(chunk_loss[-1]):.4g}")
    finally:
        if bar is not None:
            bar.close()
    out = fitted if merge is None else merge(fitted)
    return FitResult(out, opt_state, np.asarray(losses), {k: np.asarray(v) for k, v in history.items()}, step)


def _one_step(call, optimizer, term_names, key, carry, i):
    p, s, bad_step, bad_code = carry
    (loss, terms), grads = jax.value_and_grad(call, has_aux=True)(p, jax.random.fold_in(key, i))
    # which term went bad, in a fixed order: the terms (causes) first, then the loss, then the gradient
    checks = [jnp.all(jnp.isfinite(terms[n])) for n in term_names]
    grad_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
    ok = jnp.stack(checks + [jnp.isfinite(loss), grad_ok])
    first_bad = jnp.argmin(ok).astype(jnp.int32)  # index of the first False
    is_bad = ~jnp.all(ok)
    still_good = bad_step < 0
    apply = still_good & ~is_bad
    updates, s_new = optimizer.update(grads, s, p)
    p_new = optax.apply_updates(p, updates)
    p = jax.tree_util.tree_map(lambda a, b: jnp.where(apply, b, a), p, p_new)
    s = jax.tree_util.tree_map(lambda a, b: jnp.where(apply, b, a), s, s_new)
    bad_step = jnp.where(still_good & is_bad, i, bad_step)
    bad_code = jnp.where(still_good & is_bad, first_bad, bad_code)
    return (p, s, bad_step, bad_code), (loss, terms)


@functools.partial(jax.jit, static_argnums=0)
def _init_state(optimizer, params):
    # compiled once per optimiser: optax's init run eagerly is one dispatch per moment per leaf, on every call
    return optimizer.init(params)


def _all_finite(*trees) -> jax.Array:
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.asarray(True)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_chunk_fast(call, optimizer, key, p, s, steps):
    """Compiled once per (objective, optimiser): an unguarded scan of updates over the given step indices,
    and one finiteness check of its outputs (stacked losses and terms, final parameters and state)."""

    def step(carry, i):
        p, s = carry
        (loss, terms), grads = jax.value_and_grad(call, has_aux=True)(p, jax.random.fold_in(key, i))
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), (loss, terms)

    (p, s), (loss, terms) = jax.lax.scan(step, (p, s), steps)
    return p, s, loss, terms, _all_finite(loss, terms, p, s)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run_chunk(call, optimizer, term_names, key, p, s, steps):
    """The guarded scan, run only on a chunk that failed the check: every step is checked and the first bad
    one (and all after it) is not applied."""
    init = (p, s, jnp.asarray(-1, jnp.int32), jnp.asarray(-1, jnp.int32))
    step = functools.partial(_one_step, call, optimizer, term_names, key)
    (p, s, bad_step, bad_code), (loss, terms) = jax.lax.scan(step, init, steps)
    return p, s, bad_step, bad_code, loss, terms
