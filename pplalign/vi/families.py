"""Variational families: any parametrised generative program whose samples can be scored.

A family is an object with

    sample(params, key, num)  -> x        (leading axis num; no gradient flows through x)
    log_prob(params, x)       -> [num]    (log q_θ(x), differentiable in θ)

and optionally ``rsample`` (x = g_θ(ε), differentiable: the reparameterisation estimator),
``token_log_probs`` ([num, T] per-step log q(x_t | x_{<t}): sequence-level REINFORCE) and ``support()``
(every value of a finite support: the enumeration estimator and exact KLs).

:class:`SequentialFamily` turns a parametrised :class:`pplalign.Sequential` program ``build(params)`` into a
family: sampling runs the program (``lax.scan`` over steps, ``vmap`` over samples), and log q is the replay

    log q_θ(x) = Σ_t log q_θ(x_t | state_t),    state_{t+1} = update(state_t, x_t, t),

which assumes ``output(state)`` is the array of per-step values (x[t] is the value drawn at step t), as for
token sequences. A program may define ``token_log_probs(x)`` (teacher forcing) to replace the replay.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = [
    "SequentialFamily",
    "GaussianFamily",
    "replay_token_log_probs",
    "sequence_log_prob",
    "sample_program",
    "vocab_size_of",
    "all_sequences",
]

_MAX_ENUMERATION = 2**20


def sample_program(program: Any, key: jax.Array, num: int) -> Any:
    """``num`` independent draws of a Sequential program's output (ancestral sampling, compiled scan)."""

    def one(k):
        init_key, run_key = jax.random.split(k)
        state = program.init(init_key)

        def body(s, t):
            x = program.transition(s, t).sample(jax.random.fold_in(run_key, t))
            return program.update(s, x, t), None

        state, _ = jax.lax.scan(body, state, jnp.arange(program.num_steps))
        return program.output(state)

    return jax.vmap(one)(jax.random.split(key, num))


def replay_token_log_probs(program: Any, x: jax.Array) -> jax.Array:
    """[num, T] log q(x_t | x_{<t}) of sequences x [num, T] under a Sequential program, by replay."""
    if hasattr(program, "token_log_probs"):
        return program.token_log_probs(x)

    def one(seq):
        state = program.init(jax.random.key(0))  # init must not depend on the key for a scorable program

        def body(s, t):
            lp = jnp.sum(program.transition(s, t).log_prob(seq[t]))
            return program.update(s, seq[t], t), lp

        _, lps = jax.lax.scan(body, state, jnp.arange(program.num_steps))
        return lps

    return jax.vmap(one)(jnp.asarray(x))


def sequence_log_prob(program: Any, x: jax.Array) -> jax.Array:
    """[num] log p(x) of sequences under a Sequential program (its own ``log_prob`` when it has one)."""
    if hasattr(program, "log_prob"):
        return program.log_prob(x)
    return jnp.sum(replay_token_log_probs(program, x), axis=-1)


def vocab_size_of(program: Any) -> int | None:
    """The number of values of step 0 when it is a Categorical (None otherwise); found by shape tracing."""
    try:
        def first(key):
            d = program.transition(program.init(key), jnp.asarray(0))
            return getattr(d, "logits", None)

        shape = jax.eval_shape(first, jax.random.key(0))
    except Exception:  # noqa: BLE001 - a program we cannot trace has no known finite support
        return None
    return None if shape is None else int(shape.shape[-1])


def all_sequences(vocab_size: int, num_steps: int) -> jax.Array:
    """[V^T, T] every sequence, row i having base-V code i (first token most significant)."""
    total = vocab_size**num_steps
    if total > _MAX_ENUMERATION:
        raise ValueError(f"cannot enumerate {vocab_size}^{num_steps} = {total} sequences (limit {_MAX_ENUMERATION})")
    codes = jnp.arange(total)
    powers = vocab_size ** jnp.arange(num_steps - 1, -1, -1)
    return ((codes[:, None] // powers[None, :]) % vocab_size).astype(jnp.int32)


class SequentialFamily:
    """q_θ = ``build(θ)``, a Sequential program over finite (Categorical) or continuous steps.

    ``build`` is a plain function (static); θ is any pytree (an array of logits, a dict of weights, an
    ``flax.nnx`` module). ``vocab_size`` and ``num_steps`` describe the finite support when known; they are
    read off the program when not given.
    """

    def __init__(self, build: Callable[[Any], Any], num_steps: int, vocab_size: int | None = None, name: str = "q"):
        if not callable(build):
            raise ValueError("build must be a function params -> Sequential program")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
        self.build = build
        self.num_steps = num_steps
        self.vocab_size = vocab_size
        self.name = name

    def sample(self, params: Any, key: jax.Array, num: int) -> Any:
        return sample_program(self.build(params), key, num)

    def token_log_probs(self, params: Any, x: jax.Array) -> jax.Array:
        return replay_token_log_probs(self.build(params), x)

    def log_prob(self, params: Any, x: jax.Array) -> jax.Array:
        return sequence_log_prob(self.build(params), x)

    def support(self) -> jax.Array:
        if self.vocab_size is None:
            raise ValueError(f"family {self.name!r} has no finite support to enumerate (vocab_size unknown)")
        return all_sequences(self.vocab_size, self.num_steps)

    def __repr__(self) -> str:
        return f"SequentialFamily({self.name}, T={self.num_steps}, V={self.vocab_size})"


class GaussianFamily:
    """q_θ = N(μ, diag(exp(2·log σ))) over R^d; θ = {"loc": [d], "log_scale": [d]}.

    ``rsample`` is the pathwise draw x = μ + σ·ε, ε ~ N(0, I) (Kingma & Welling 2014), so both the
    reparameterisation and the REINFORCE estimators apply.
    """

    def __init__(self, dim: int):
        self.dim = dim

    def init_params(self, loc: float = 0.0, log_scale: float = 0.0) -> dict:
        return {"loc": jnp.full((self.dim,), loc, jnp.float32), "log_scale": jnp.full((self.dim,), log_scale, jnp.float32)}

    def rsample(self, params: dict, key: jax.Array, num: int) -> jax.Array:
        eps = jax.random.normal(key, (num, self.dim))
        return params["loc"] + jnp.exp(params["log_scale"]) * eps

    def sample(self, params: dict, key: jax.Array, num: int) -> jax.Array:
        return jax.lax.stop_gradient(self.rsample(params, key, num))

    def log_prob(self, params: dict, x: jax.Array) -> jax.Array:
        z = (x - params["loc"]) * jnp.exp(-params["log_scale"])
        return jnp.sum(-0.5 * z * z - params["log_scale"] - 0.5 * math.log(2 * math.pi), axis=-1)
