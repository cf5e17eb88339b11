"""Simple per-token potentials for the LM program (benchmarks, tests): r(x) = Σ_t φ[x_t].

``TokenScores`` is both the reward r(x) = Σ_{t: x_t ≠ <pad>} φ[x_t] and a twist whose log ψ_t is the partial
sum over x_{≤t}: with it bootstrap SMC weights each step by exp(φ[x_t]/β)… (for β = 1; the twist is the
partial reward, so ψ_t/ψ_{t-1} = exp(φ[x_t]) and the last step's potential exp(r/β) closes the telescoping).
Pass ``proposal=program.transition`` to ``pplalign.smc`` to use it as a Feynman–Kac potential with
proposals from p₀ (otherwise smc uses it for the locally optimal proposal via ``candidates``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .program import LMState
from .tokenizer import PAD

__all__ = ["TokenScores"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenScores:
    scores: jax.Array  # [V]

    def __call__(self, x, t=None) -> jax.Array:
        """As a reward: ``x`` are tokens [T]. As a twist: ``x`` is an LMState and t the step."""
        tokens = x.tokens if isinstance(x, LMState) else jnp.asarray(x)
        return jnp.sum(jnp.where(tokens != PAD, self.scores[tokens], 0.0))

    def candidates(self, state: LMState, t) -> jax.Array:
        return self(state) + jnp.where(state.done, 0.0, self.scores)
