"""Plain ancestral sampling from a sequential program: the baseline that steering is measured against."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._filter_jit import filter_jit

__all__ = ["ancestral_sample"]


def _ancestral(key: jax.Array, program: Any, num: int) -> Any:
    init_key, run_key = jax.random.split(key)
    states = jax.vmap(program.init)(jax.random.split(init_key, num))

    def body(states, t):
        keys = jax.random.split(jax.random.fold_in(run_key, t), num)

        def one(k, s):
            x = program.transition(s, t).sample(k)
            return program.update(s, x, t)

        return jax.vmap(one)(keys, states), None

    states, _ = jax.lax.scan(body, states, jnp.arange(program.num_steps))
    return jax.vmap(program.output)(states)


_compiled = filter_jit(_ancestral)


def ancestral_sample(key: jax.Array, program: Any, num: int) -> Any:
    """``num`` independent draws x ~ p₀ (each leaf with leading axis ``num``); NFE = num · T."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1; got {num!r}")
    return _compiled(key, program, num)
