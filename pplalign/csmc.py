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

from . import resampling as resampling_lib
from ._filter_jit import filter_jit
from .particles import Particles, raise_on_nonfinite
from .smc import check_inputs, run_smc

__all__ = ["csmc"]

_compiled = filter_jit(run_smc)


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
    with particle 0 holding the reference."""
    check_inputs(target, num_particles, ess_threshold, mesh)
    steps = target.num_steps
    for leaf in jax.tree_util.tree_leaves(reference):
        if leaf.shape[:1] != (steps,):
            raise ValueError(f"reference leaves need leading axis T={steps}; got shape {leaf.shape}")
    result = _compiled(
        key,
        target,
        num_particles,
        twist,
        proposal,
        resampling_lib.multinomial,
        float(ess_threshold),
        reference,
        mesh,
        bool(optimal_proposal),
    )
    return raise_on_nonfinite(result, target.reward)
