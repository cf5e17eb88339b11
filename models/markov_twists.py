"""Learnable twists for the exact Markov-LM testbed (models/markov_lm.py).

Both expose the two forms ``pplalign.smc`` uses (see :class:`models.markov_lm.ExactTwist`):
``__call__(state, t)`` = log ψ_t(x_{≤t}) on the state after step t, and ``candidates(state, t)`` = log ψ_t(x_{<t}, k)
for every next token k from the state before step t (a twist head over the vocabulary).

- :class:`TabularTwist`: one free parameter per prefix (Σ_t V^{t+1} entries), the same layout as the exact
  twist table; it can represent ψ* exactly, but learns only prefixes it sees.
- :class:`MLPTwist`: a small MLP on a prefix embedding (one-hot tokens x_{<t}, masked beyond t, and a one-hot
  of t) giving V scores at once; it generalises across prefixes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .markov_lm import ExactTwist, MarkovLM, MarkovState

__all__ = ["TabularTwist", "MLPTwist", "tabular_twist", "mlp_twist", "from_exact", "count_reward"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TabularTwist:
    """log ψ_t(x_{≤t}) = table[offsets[t] + code(x_{≤t})]."""

    table: jax.Array  # [Σ_t V^{t+1}]
    offsets: jax.Array  # [T]
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def __call__(self, state: MarkovState, t) -> jax.Array:
        return self.table[self.offsets[t] + state.code]

    def candidates(self, state: MarkovState, t) -> jax.Array:
        return self.table[self.offsets[t] + state.code * self.vocab_size + jnp.arange(self.vocab_size)]


def tabular_twist(lm: MarkovLM, init: float = 0.0) -> TabularTwist:
    """A table of constant log ψ = ``init`` (ψ ≡ const: the proposal is p₀ until the last step)."""
    v, steps = lm.vocab_size, lm.num_steps
    sizes = [v ** (t + 1) for t in range(steps)]
    offsets = jnp.asarray([sum(sizes[:t]) for t in range(steps)], jnp.int32)
    return TabularTwist(jnp.full((sum(sizes),), init, jnp.float32), offsets, v)


def from_exact(exact: ExactTwist) -> TabularTwist:
    """A learnable table initialised at the exact twist ψ* (to check that losses are at their optimum)."""
    return TabularTwist(jnp.asarray(exact.table, jnp.float32), exact.offsets, exact.vocab_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLPTwist:
    """log ψ_t(x_{<t}, ·) = W₂ gelu(W₁ [onehot(x_{<t}) masked at positions ≥ t ; onehot(t)] + b₁) + b₂ + bias_t."""

    w1: jax.Array  # [T·V + T, H]
    b1: jax.Array  # [H]
    w2: jax.Array  # [H, V]
    b2: jax.Array  # [V]
    step_bias: jax.Array  # [T]: a per-step offset, so log ψ_t's scale can differ between steps
    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    def _features(self, tokens: jax.Array, t) -> jax.Array:
        seen = (jnp.arange(self.num_steps) < t)[:, None]
        onehot = jax.nn.one_hot(tokens, self.vocab_size) * seen
        return jnp.concatenate([onehot.reshape(-1), jax.nn.one_hot(t, self.num_steps)])

    def _scores(self, tokens: jax.Array, t) -> jax.Array:
        h = jax.nn.gelu(self._features(tokens, t) @ self.w1 + self.b1)
        return h @ self.w2 + self.b2 + self.step_bias[t]

    def candidates(self, state: MarkovState, t) -> jax.Array:
        return self._scores(state.tokens, t)

    def __call__(self, state: MarkovState, t) -> jax.Array:
        # positions ≥ t are masked out of the features, so the state after step t gives the scores of x_{<t}
        return self._scores(state.tokens, t)[state.tokens[t]]


def mlp_twist(key: jax.Array, lm: MarkovLM, hidden: int = 64) -> MLPTwist:
    """Small random init (log ψ ≈ 0: the twisted proposal starts near p₀)."""
    v, steps = lm.vocab_size, lm.num_steps
    d_in = steps * v + steps
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (d_in, hidden), jnp.float32) / math.sqrt(d_in)
    w2 = jax.random.normal(k2, (hidden, v), jnp.float32) * (0.1 / math.sqrt(hidden))
    return MLPTwist(w1, jnp.zeros((hidden,)), w2, jnp.zeros((v,)), jnp.zeros((steps,)), v, steps)


def count_reward(lm: MarkovLM, token: int = 0, sharpness: float = 4.0, threshold: float = 5.5):
    """A sparse, structured reward for the testbed: r(x) = log sigmoid(sharpness·(#{t: x_t = token} − threshold)),
    as a :class:`models.markov_lm.TableReward` (exact enumeration still applies). r ≤ 0, so φ = e^r ∈ (0, 1) is the
    probability that a "classifier" accepts x; with the defaults (T = 6) σ puts most mass on rare all-``token``
    sequences, which bootstrap SMC finds poorly and a twist can learn (the count is linear in one-hot features)."""
    from .markov_lm import TableReward

    seqs = lm.all_sequences()
    count = jnp.sum(seqs == token, axis=-1)
    return TableReward(jax.nn.log_sigmoid(sharpness * (count - threshold)), lm.vocab_size)
