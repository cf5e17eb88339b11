"""Conditional SMC: one particle pinned to a given trajectory (Andrieu, Doucet & Holenstein 2010).

When the pinned trajectory is an exact draw from σ, E[log Ẑ_CSMC] ≥ log Z: averaging CSMC log Ẑ over
exact σ samples gives an *upper* bound on log Z that tightens as N grows, the companion of the SMC lower
bound E[log Ẑ_SMC] ≤ log Z (Zhao et al. 2024, §5; Brekelmans et al.). With N = 1, log Ẑ_CSMC is the log
importance weight of the reference, so E_σ[log Ẑ] − log Z = KL(σ‖q).

Resampling is conditional multinomial: the other N−1 ancestors are drawn i.i.d. from the weights and
particle 0 keeps ancestor 0, which is what makes the pinned path's law invariant.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import resampling as resampling_lib
from ._filter_jit import filter_jit
from ._validation import check_distribution, check_inputs
from .particles import Particles, raise_on_nonfinite
from .smc import run_smc

__all__ = ["csmc", "check_reference"]

_compiled = filter_jit(run_smc)


def _reference_log_probs(key, base, num_steps: int, reference):
    """log p₀(x_t^ref | x_{<t}^ref) and whether x_t^ref lies in the support of step t, for every t: one
    pass of the reference path through the program (T transitions, one particle). Raises, while tracing,
    a ValueError for a step whose draws have another dtype kind or shape than the reference's values."""

    def body(state, t):
        ref_t = jax.tree_util.tree_map(lambda r: r[t], reference)
        d = check_distribution(base.transition(state, t), "transition")
        draw = jax.eval_shape(d.sample, key)
        for want, have in zip(jax.tree_util.tree_leaves(draw), jax.tree_util.tree_leaves(ref_t)):
            integer = lambda dtype: jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
            if integer(want.dtype) != integer(have.dtype) or want.shape != have.shape:
                raise ValueError(
                    f"reference values must match the draws of every step: the transition draws {want.dtype} of "
                    f"shape {want.shape}, the reference holds {have.dtype} of shape {have.shape} (dtype or shape)"
                )
        try:
            in_support = jnp.all(d.support(ref_t))
        except NotImplementedError:  # a distribution without a support: its log-density below still checks
            in_support = jnp.asarray(True)
        return base.update(state, ref_t, t), (in_support, jnp.sum(d.log_prob(ref_t)))

    _, (in_support, log_p) = jax.lax.scan(body, base.init(key), jnp.arange(num_steps))
    return in_support, log_p


_reference_log_probs_jit = filter_jit(_reference_log_probs)


def check_reference(key, target: Any, reference: Any) -> None:
    """Raise ``ValueError`` unless ``reference`` is a path the program can draw: leading axis T on every
    leaf, each step's values of the dtype kind and shape the step draws, inside the step's support (a
    Categorical over K values needs integers in [0, K)) and of positive prior probability, log p₀ > −inf.
    The value checks run when the reference, the key and the program are concrete (not traced by the
    caller's jit/vmap); the dtype and shape checks always."""
    steps = target.num_steps
    for leaf in jax.tree_util.tree_leaves(reference):
        if jnp.shape(leaf)[:1] != (steps,):
            raise ValueError(f"reference leaves need leading axis T={steps}; got shape {jnp.shape(leaf)}")
    in_support, log_p = _reference_log_probs_jit(key, target.base, steps, reference)  # β plays no part
    if isinstance(log_p, jax.core.Tracer):
        return
    in_support, log_p = np.asarray(in_support), np.asarray(log_p)
    bad = np.flatnonzero(~in_support | (log_p == -np.inf))
    if bad.size:
        t = int(bad[0])
        value = jax.tree_util.tree_map(lambda r: np.asarray(r[t]).tolist(), reference)
        why = "outside the support of" if not in_support[t] else "of zero probability (log p0 = -inf) under"
        raise ValueError(f"the reference value {value} at step {t} is {why} the program's transition at that step")


def csmc(
    key: jax.Array,
    target: Any,
    num_particles: int,
    reference: Any,
    *,
    twist=None,
    proposal=None,
    ess_threshold: float = 1.0,
    mesh=None,
    optimal_proposal: bool = True,
) -> Particles:
    """SMC with particle 0 pinned to ``reference`` (a pytree whose leaves have leading axis T: the value of
    x_t drawn at every step). Same weights and twists as :func:`pplalign.smc`; returns :class:`Particles`
    with particle 0 holding the reference. The reference is checked by :func:`check_reference`."""
    num_particles, ess_threshold = check_inputs(target, num_particles, ess_threshold, mesh, key=key)
    check_reference(key, target, reference)
    result = _compiled(
        key,
        target,
        num_particles,
        twist,
        proposal,
        resampling_lib.multinomial,
        ess_threshold,
        reference,
        mesh,
        bool(optimal_proposal),
    )
    return raise_on_nonfinite(result, target.reward, twist)
