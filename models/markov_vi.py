"""Autoregressive variational families for the exact Markov testbed (:mod:`models.markov_lm`).

Each family is a :class:`pplalign.vi.SequentialFamily`: ``build(params)`` is a Sequential program over
V tokens and T steps, so it can be sampled, scored, enumerated, and used as a proposal or a "fine-tuned"
model by the samplers.

* :class:`PrefixTable` — q(x_t | x_{<t}) = softmax(θ[prefix code]) with one row of logits per prefix:
  the chain-rule factorisation of *any* law over V^T sequences, so it contains σ (KL(q‖σ) → 0).
* :class:`MarkovTable` — q(x_t | x_{t−1}, t) = softmax(θ[t, x_{t−1}]): a conditional categorical that
  sees only the last token (does not contain a σ whose reward couples distant tokens).
* :class:`MLPProgram` — an ``flax.nnx`` MLP over the one-hot prefix and the step: a neural q.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from flax import nnx

from models.markov_lm import MarkovLM
from pplalign.vi.families import SequentialFamily

__all__ = [
    "PrefixState",
    "PrefixTable",
    "MarkovTable",
    "MLPNet",
    "MLPProgram",
    "prefix_table_family",
    "markov_table_family",
    "mlp_family",
    "exact_posterior_logits",
]


class PrefixState(NamedTuple):
    tokens: jax.Array  # [T] int32 (0 after the current step)
    last: jax.Array  # [] int32 (−1 before step 0)
    code: jax.Array  # [] int32 base-V code of the prefix


def _offsets(vocab_size: int, num_steps: int) -> list[int]:
    out, total = [], 0
    for t in range(num_steps):
        out.append(total)
        total += vocab_size**t
    return out + [total]


def _init_state(num_steps: int) -> PrefixState:
    return PrefixState(jnp.zeros((num_steps,), jnp.int32), jnp.asarray(-1, jnp.int32), jnp.asarray(0, jnp.int32))


def _update(state: PrefixState, x_t, t, vocab_size: int) -> PrefixState:
    x_t = jnp.asarray(x_t, jnp.int32)
    return PrefixState(state.tokens.at[t].set(x_t), x_t, state.code * vocab_size + x_t)


def _prefix_codes(x: jax.Array, vocab_size: int) -> jax.Array:
    """[n, T] base-V code of x_{<t} for each t."""
    x = jnp.asarray(x, jnp.int32)

    def body(c, xt):
        return c * vocab_size + xt, c

    _, codes = jax.lax.scan(body, jnp.zeros(x.shape[:-1], jnp.int32), jnp.moveaxis(x, -1, 0))
    return jnp.moveaxis(codes, 0, -1)


def _chosen_log_probs(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log softmax(logits)[…, t, x_t]: [n, T, V] logits and [n, T] tokens → [n, T]."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), x[..., None], axis=-1)[..., 0]


class _TokenSequence:
    """The parts every family here shares: a :class:`PrefixState` of drawn tokens, output = the tokens, and
    log q(x) = Σ_t log q(x_t | x_{<t}) from the subclass's ``token_log_probs`` (teacher forcing)."""

    num_steps: int
    vocab_size: int

    def init(self, key):
        del key
        return _init_state(self.num_steps)

    def update(self, state, x_t, t):
        return _update(state, x_t, t, self.vocab_size)

    def output(self, state):
        return state.tokens

    def log_prob(self, x):
        return jnp.sum(self.token_log_probs(x), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixTable(_TokenSequence):
    """Sequential program with a logit row per prefix: rows [offset_t + code(x_{<t})], offset_t = Σ_{s<t} V^s."""

    logits: jax.Array  # [Σ_t V^t, V]
    num_steps: int = dataclasses.field(metadata=dict(static=True))
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def transition(self, state, t):
        offsets = jnp.asarray(_offsets(self.vocab_size, self.num_steps)[:-1], jnp.int32)
        return dist.CategoricalLogits(self.logits[offsets[t] + state.code])

    def token_log_probs(self, x):
        x = jnp.asarray(x, jnp.int32)
        offsets = jnp.asarray(_offsets(self.vocab_size, self.num_steps)[:-1], jnp.int32)
        rows = offsets + _prefix_codes(x, self.vocab_size)  # [n, T]
        return _chosen_log_probs(self.logits[rows], x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MarkovTable(_TokenSequence):
    """q(x_t | x_{t−1}, t): logits [T, V+1, V]; row V is the start (t = 0)."""

    logits: jax.Array
    num_steps: int = dataclasses.field(metadata=dict(static=True))
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    def transition(self, state, t):
        row = jnp.where(state.last < 0, self.vocab_size, state.last)
        return dist.CategoricalLogits(self.logits[t, row])

    def token_log_probs(self, x):
        x = jnp.asarray(x, jnp.int32)
        prev = jnp.concatenate([jnp.full(x.shape[:-1] + (1,), self.vocab_size), x[..., :-1]], axis=-1)
        return _chosen_log_probs(self.logits[jnp.arange(self.num_steps), prev], x)


class MLPNet(nnx.Module):
    """logits(x_t | x_{<t}) = W₂ tanh(W₁ [onehot(x_{<t}) (future masked), onehot(t)] + b₁) + b₂."""

    def __init__(self, vocab_size: int, num_steps: int, hidden: int, *, rngs: nnx.Rngs):
        self.vocab_size, self.num_steps = vocab_size, num_steps
        self.hidden = nnx.Linear(num_steps * (vocab_size + 1) + num_steps, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, t: jax.Array) -> jax.Array:
        v, steps = self.vocab_size, self.num_steps
        visible = jnp.arange(steps) < t
        idx = jnp.where(visible, tokens, v)  # index v marks "not yet drawn"
        feats = jnp.concatenate([jax.nn.one_hot(idx, v + 1).reshape(-1), jax.nn.one_hot(t, steps)])
        return self.out(jnp.tanh(self.hidden(feats)))


class MLPProgram(_TokenSequence):
    """The Sequential program of an :class:`MLPNet` (the network is closed over, not vmapped)."""

    def __init__(self, net: MLPNet):
        self.net = net
        self.num_steps = net.num_steps
        self.vocab_size = net.vocab_size

    def transition(self, state, t):
        return dist.CategoricalLogits(self.net(state.tokens, t))

    def token_log_probs(self, x):
        x = jnp.asarray(x, jnp.int32)
        ts = jnp.arange(self.num_steps)
        logits = jax.vmap(lambda seq: jax.vmap(lambda t: self.net(seq, t))(ts))(x)  # teacher forcing
        return _chosen_log_probs(logits, x)


# --- families (build + initial parameters) -----------------------------------------------------------

def prefix_table_family(lm: MarkovLM, init: str = "base") -> tuple[SequentialFamily, jax.Array]:
    """(family, θ₀) for :class:`PrefixTable`; ``init="base"`` starts at q = p₀, ``"uniform"`` at uniform."""
    v, steps = lm.vocab_size, lm.num_steps
    rows = _offsets(v, steps)[-1]
    if init == "base":
        logits = base_prefix_logits(lm)
    elif init == "uniform":
        logits = jnp.zeros((rows, v), jnp.float32)
    else:
        raise ValueError(f"init must be 'base' or 'uniform'; got {init!r}")
    family = SequentialFamily(lambda p: PrefixTable(p, steps, v), steps, v, name="prefix_table")
    return family, logits


def markov_table_family(lm: MarkovLM) -> tuple[SequentialFamily, jax.Array]:
    """(family, θ₀) for :class:`MarkovTable`, started at q = p₀."""
    v, steps = lm.vocab_size, lm.num_steps
    rows = jnp.concatenate([lm.log_trans, lm.log_init[None]], axis=0)  # [V+1, V]
    logits = jnp.broadcast_to(rows, (steps, v + 1, v)).astype(jnp.float32)
    family = SequentialFamily(lambda p: MarkovTable(p, steps, v), steps, v, name="markov_table")
    return family, logits


def mlp_family(key: jax.Array, lm: MarkovLM, hidden: int = 64) -> tuple[SequentialFamily, nnx.State]:
    """(family, θ₀) for an :class:`MLPNet`; θ is the network's ``nnx.Param`` state (a pytree)."""
    net = MLPNet(lm.vocab_size, lm.num_steps, hidden, rngs=nnx.Rngs(params=key))
    graphdef, params = nnx.split(net, nnx.Param)
    family = SequentialFamily(lambda p: MLPProgram(nnx.merge(graphdef, p)), lm.num_steps, lm.vocab_size, name="mlp")
    return family, params


def base_prefix_logits(lm: MarkovLM) -> jax.Array:
    """PrefixTable logits with q = p₀ (each row the transition row of the prefix's last token)."""
    v, steps = lm.vocab_size, lm.num_steps
    blocks = [lm.log_init[None]]
    for t in range(1, steps):
        last = jnp.arange(v**t) % v
        blocks.append(lm.log_trans[last])
    return jnp.concatenate(blocks, axis=0).astype(jnp.float32)


def exact_posterior_logits(lm: MarkovLM, reward, beta) -> jax.Array:
    """PrefixTable logits with q = σ exactly: σ(x_t | x_{<t}) ∝ p₀(x_t | x_{t−1}) ψ*_t(x_{≤t})."""
    v, steps = lm.vocab_size, lm.num_steps
    twist = lm.optimal_twist(reward, beta)
    base = base_prefix_logits(lm)
    offs = _offsets(v, steps)
    blocks = []
    for t in range(steps):
        n_prefix = v**t
        psi = twist.table[int(twist.offsets[t]) : int(twist.offsets[t]) + n_prefix * v].reshape(n_prefix, v)
        blocks.append(jax.nn.log_softmax(base[offs[t] : offs[t + 1]] + psi, axis=-1))
    return jnp.concatenate(blocks, axis=0)
