"""Simple per-token potentials for the LM program (benchmarks, tests): r(x) = Σ_t φ[x_t].

``TokenScores`` is both the reward r(x) = Σ_{t ≤ end} φ[x_t] (the tokens up to and including the first end token;
the pads after it score nothing) and a twist whose log ψ_t is the partial
sum over x_{≤t}: with it bootstrap SMC weights each step by exp(φ[x_t]/β)… (for β = 1; the twist is the
partial reward, so ψ_t/ψ_{t-1} = exp(φ[x_t]) and the last step's potential exp(r/β) closes the telescoping).
Pass ``proposal=program.transition`` to ``pplalign.smc`` to use it as a Feynman–Kac potential with
proposals from p₀ (otherwise smc uses it for the locally optimal proposal via ``candidates``). The end ids are
the in-house ``<eos>`` unless given: build with ``TokenScores.for_program(program, scores)`` for a model whose
end tokens are others (a Hugging Face tokenizer's; its pad id may even equal its end id, as GPT-2's does).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .program import LMState
from .tokenizer import EOS

__all__ = ["TokenScores"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenScores:
    scores: jax.Array  # [V]
    eos_ids: tuple = dataclasses.field(default=(EOS,), metadata=dict(static=True))

    @classmethod
    def for_program(cls, program, scores) -> "TokenScores":
        """Scores over ``program``'s vocabulary, ending at its own end tokens."""
        scores = jnp.asarray(scores, jnp.float32)
        if scores.shape != (program.vocab_size,):
            raise ValueError(f"TokenScores needs one score per token ({program.vocab_size}); got shape {scores.shape}")
        return cls(scores, tuple(int(e) for e in np.asarray(program.eos_ids)))

    def __call__(self, x, t=None) -> jax.Array:
        """As a reward: ``x`` are tokens [T]. As a twist: ``x`` is an LMState and t the step (its first
        ``length`` tokens are drawn; the slots after them are not)."""
        if isinstance(x, LMState):
            drawn = jnp.arange(x.tokens.shape[-1]) < x.length
            return jnp.sum(jnp.where(drawn, self.scores[x.tokens], 0.0))
        tokens = jnp.asarray(x)
        is_end = jnp.isin(tokens, jnp.asarray(self.eos_ids))
        before_end = (jnp.cumsum(is_end) - is_end) == 0  # up to and including the first end token
        return jnp.sum(jnp.where(before_end, self.scores[tokens], 0.0))

    def candidates(self, state: LMState, t) -> jax.Array:
        return self(state) + jnp.where(state.done, 0.0, self.scores)
