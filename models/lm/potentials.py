"""Simple per-token potentials for the LM program (benchmarks, tests): r(x) = Σ_t φ[x_t].

``TokenScores`` is both the reward r(x) = Σ_{t: x_t ≠ pad} φ[x_t] and a twist whose log ψ_t is the partial
sum over x_{≤t}: with it bootstrap SMC weights each step by exp(φ[x_t]/β)… (for β = 1; the twist is the
partial reward, so ψ_t/ψ_{t-1} = exp(φ[x_t]) and the last step's potential exp(r/β) closes the telescoping).
Pass ``proposal=program.transition`` to ``pplalign.smc`` to use it as a Feynman–Kac potential with
proposals from p₀ (otherwise smc uses it for the locally optimal proposal via ``candidates``). The pad id is
the in-house ``<pad>`` unless given: build with ``TokenScores.for_program(program, scores)`` for a model whose
pad token is another (a Hugging Face tokenizer's), or the pads after the end token would be scored.
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
    pad_id: int = dataclasses.field(default=PAD, metadata=dict(static=True))

    @classmethod
    def for_program(cls, program, scores) -> "TokenScores":
        """Scores over ``program``'s vocabulary, skipping its own pad token."""
        scores = jnp.asarray(scores, jnp.float32)
        if scores.shape != (program.vocab_size,):
            raise ValueError(f"TokenScores needs one score per token ({program.vocab_size}); got shape {scores.shape}")
        return cls(scores, int(program.pad_id))

    def __call__(self, x, t=None) -> jax.Array:
        """As a reward: ``x`` are tokens [T]. As a twist: ``x`` is an LMState and t the step."""
        tokens = x.tokens if isinstance(x, LMState) else jnp.asarray(x)
        return jnp.sum(jnp.where(tokens != self.pad_id, self.scores[tokens], 0.0))

    def candidates(self, state: LMState, t) -> jax.Array:
        return self(state) + jnp.where(state.done, 0.0, self.scores)
