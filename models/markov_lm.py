"""An exact testbed: a Markov-chain "language model" over a small vocabulary.

p₀(x_0..x_{T-1}) = π(x_0) ∏_{t≥1} P(x_t | x_{t-1}). With V^T small, everything about the tilted target
σ ∝ p₀·exp(r/β) is exact by enumeration: log Z, the posterior over all V^T sequences, and the optimal twists

    ψ*_{T-1}(x) = exp(r(x)/β),    ψ*_t(x_{≤t}) = Σ_{x_{t+1}} P(x_{t+1} | x_t) ψ*_{t+1}(x_{≤t+1})

by backward recursion (Zhao et al. 2024, eq. 5). With ψ* and the locally optimal proposal every SMC weight
is exactly Z, so twisted SMC returns log Ẑ = log Z at every seed.

Prefixes are indexed by their base-V code (first token most significant), so a twist is a table lookup.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

__all__ = ["MarkovLM", "MarkovState", "TableReward", "ExactTwist", "random_markov_lm"]


class MarkovState(NamedTuple):
    tokens: jax.Array  # [T] int32, zeros after the current step
    last: jax.Array  # [] int32, last token (−1 before step 0)
    code: jax.Array  # [] int32, base-V code of the prefix drawn so far


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MarkovLM:
    """A Sequential program: first token from π, then x_t ~ P(·|x_{t-1})."""

    log_init: jax.Array  # [V]
    log_trans: jax.Array  # [V, V], rows normalised
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    @property
    def vocab_size(self) -> int:
        return self.log_init.shape[-1]

    # --- the Sequential protocol -------------------------------------------------------------
    def init(self, key: jax.Array) -> MarkovState:
        del key
        return MarkovState(jnp.zeros((self.num_steps,), jnp.int32), jnp.asarray(-1, jnp.int32), jnp.asarray(0, jnp.int32))

    def transition(self, state: MarkovState, t) -> dist.CategoricalLogits:
        logits = jnp.where(state.last < 0, self.log_init, self.log_trans[jnp.maximum(state.last, 0)])
        return dist.CategoricalLogits(logits)

    def update(self, state: MarkovState, x_t, t) -> MarkovState:
        x_t = jnp.asarray(x_t, jnp.int32)
        return MarkovState(state.tokens.at[t].set(x_t), x_t, state.code * self.vocab_size + x_t)

    def output(self, state: MarkovState) -> jax.Array:
        return state.tokens

    # --- exact answers by enumeration --------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.vocab_size**self.num_steps

    def all_sequences(self) -> jax.Array:
        """[V^T, T] every sequence, row i having code i."""
        codes = jnp.arange(self.num_sequences)
        powers = self.vocab_size ** jnp.arange(self.num_steps - 1, -1, -1)
        return ((codes[:, None] // powers[None, :]) % self.vocab_size).astype(jnp.int32)

    def codes(self, tokens: jax.Array) -> jax.Array:
        """Base-V code of token sequences [..., T]."""
        powers = self.vocab_size ** jnp.arange(self.num_steps - 1, -1, -1)
        return jnp.sum(jnp.asarray(tokens) * powers, axis=-1)

    def log_prob(self, tokens: jax.Array) -> jax.Array:
        """log p₀ of sequences [..., T]."""
        tokens = jnp.asarray(tokens)
        first = self.log_init[tokens[..., 0]]
        rest = self.log_trans[tokens[..., :-1], tokens[..., 1:]].sum(-1)
        return first + rest

    def log_target(self, reward, beta) -> jax.Array:
        """[V^T] unnormalised log σ of every sequence."""
        seqs = self.all_sequences()
        return self.log_prob(seqs) + jax.vmap(reward)(seqs) / beta

    def log_Z(self, reward, beta) -> jax.Array:
        return jax.nn.logsumexp(self.log_target(reward, beta))

    def posterior(self, reward, beta) -> jax.Array:
        """[V^T] σ over sequence codes."""
        return jax.nn.softmax(self.log_target(reward, beta))

    def sample_posterior(self, key, num: int, reward, beta) -> jax.Array:
        """[num, T] exact draws from σ."""
        codes = jax.random.categorical(key, self.log_target(reward, beta), shape=(num,))
        return self.all_sequences()[codes]

    def optimal_twist(self, reward, beta) -> "ExactTwist":
        """The exact twists ψ*_t of the tilted target, as one lookup table."""
        v, steps = self.vocab_size, self.num_steps
        tables = [self.log_target(reward, beta) - self.log_prob(self.all_sequences())]  # r/β at t = T-1
        for t in range(steps - 2, -1, -1):
            nxt = tables[0].reshape(v ** (t + 1), v)  # [prefix code of length t+1, next token]
            last = jnp.arange(v ** (t + 1)) % v
            tables.insert(0, jax.nn.logsumexp(self.log_trans[last] + nxt, axis=-1))
        offsets = [0]
        for table in tables[:-1]:
            offsets.append(offsets[-1] + table.shape[0])
        return ExactTwist(jnp.concatenate(tables), jnp.asarray(offsets, jnp.int32), v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExactTwist:
    """log ψ*_t as a table over prefix codes; both the per-state and the all-candidates forms."""

    table: jax.Array
    offsets: jax.Array  # [T] start of step t's block
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def __call__(self, state: MarkovState, t) -> jax.Array:
        return self.table[self.offsets[t] + state.code]

    def candidates(self, state: MarkovState, t) -> jax.Array:
        return self.table[self.offsets[t] + state.code * self.vocab_size + jnp.arange(self.vocab_size)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableReward:
    """r(x) = values[code(x)]: an arbitrary (non-decomposable) reward over all sequences."""

    values: jax.Array  # [V^T]
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        steps = tokens.shape[-1]
        powers = self.vocab_size ** jnp.arange(steps - 1, -1, -1)
        return self.values[jnp.sum(tokens * powers, axis=-1)]


def random_markov_lm(key: jax.Array, vocab_size: int = 4, num_steps: int = 6, concentration: float = 1.0) -> MarkovLM:
    """π and each row of P drawn from Dirichlet(concentration)."""
    k1, k2 = jax.random.split(key)
    alpha = jnp.full((vocab_size,), concentration)
    init = jax.random.dirichlet(k1, alpha)
    trans = jax.random.dirichlet(k2, alpha, shape=(vocab_size,))
    return MarkovLM(jnp.log(init), jnp.log(trans), num_steps)
