"""Reasoning *steps* of a token program: the unit that A*-decoding and REBASE expand.

A step of a :class:`~pplalign.Sequential` with a finite-support (token) transition is the run of tokens drawn
from p₀ up to and including the first *delimiter* (e.g. ``;`` for the arithmetic chains, a newline for a
Hugging Face LM), the *end token* (which also ends the solution) or the horizon T = ``base.num_steps``; a
step longer than ``max_step_tokens`` is cut there. A node of a search is the program state after such a
step plus its position t (tokens drawn so far); it is *finished* when its step ended with the end token or
at the horizon.

:func:`extend_step` draws one step with a ``lax.while_loop`` over tokens; vmapped over children the loop runs
until the longest step ends, with the finished lanes frozen (their state, position and count do not move),
so the token count of every lane is exact: ``policy_tokens`` and ``nfe`` both count the tokens drawn on live
lanes. Token t of a node's path is drawn with ``fold_in(key, t)`` of the expansion's key for that child.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_count, check_distribution
from ..programs import is_sequential

__all__ = ["StepSpec", "StepOut", "vocab_size", "extend_step"]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """How a program's output splits into steps (static, hashable).

    delimiter:       token id, or tuple of ids, that close a step.
    end_token:       token id that ends the solution (closes its last step); None: only the horizon ends it.
    max_step_tokens: the longest step (None: up to the horizon).
    """

    delimiter: Any
    end_token: Optional[int] = None
    max_step_tokens: Optional[int] = None

    @property
    def delimiters(self) -> tuple[int, ...]:
        d = self.delimiter
        return tuple(int(x) for x in d) if isinstance(d, (tuple, list)) else (d,)

    def step_cap(self, num_steps: int) -> int:
        return num_steps if self.max_step_tokens is None else min(num_steps, self.max_step_tokens)

    def validate(self, base) -> int:
        """Check the spec against ``base``'s vocabulary (read from its first transition, which is traced, not
        run); returns the vocabulary size."""
        if not is_sequential(base):
            raise ValueError(f"base must be a Sequential program (num_steps, init, transition, update, output); "
                             f"got {type(base).__name__}")
        check_count(base.num_steps, "base.num_steps")
        size = vocab_size(base)
        tokens = [("delimiter", d) for d in self.delimiters]
        if not tokens:
            raise ValueError("delimiter: give at least one token id")
        if self.end_token is not None:
            tokens.append(("end_token", self.end_token))
        for name, token in tokens:
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < size:
                raise ValueError(f"{name} {token!r} is not a token of the program's vocabulary of {size} "
                                 f"(ids 0..{size - 1})")
        if self.max_step_tokens is not None:
            check_count(self.max_step_tokens, "max_step_tokens")
        return size


def vocab_size(base) -> int:
    """Support size of ``base.transition`` at step 0 (a Categorical's logits or probs length)."""

    def first(key):
        return check_distribution(base.transition(base.init(key), 0), "base.transition")

    d = jax.eval_shape(first, jax.random.key(0))
    for name in ("logits", "probs"):
        leaf = getattr(d, name, None)
        if leaf is not None and getattr(leaf, "shape", ()):
            return int(leaf.shape[-1])
    raise ValueError(f"step searches need a finite-support (Categorical) transition; got {type(d).__name__}")


class StepOut(NamedTuple):
    state: Any  # program state after the step
    position: jax.Array  # [] int32 tokens drawn in the path so far
    drawn: jax.Array  # [] int32 tokens drawn in this step (0 when the lane was inactive)
    finished: jax.Array  # [] bool: the step ended with the end token or at the horizon


def extend_step(key: jax.Array, base, spec: StepSpec, state, position, active=True) -> StepOut:
    """Draw one step from p₀ starting at ``position``; an inactive lane draws nothing."""
    T = base.num_steps
    cap = spec.step_cap(T)
    delims = jnp.asarray(spec.delimiters, jnp.int32)
    end = -1 if spec.end_token is None else int(spec.end_token)

    def cond(c):
        _, t, n, stop, _ = c
        return ~stop & (t < T) & (n < cap)

    def body(c):
        s, t, n, _, _ = c
        x = base.transition(s, t).sample(jax.random.fold_in(key, t)).astype(jnp.int32)
        s = base.update(s, x, t)
        return s, t + 1, n + 1, jnp.any(x == delims) | (x == end), x

    position = jnp.asarray(position, jnp.int32)
    init = (state, position, jnp.zeros((), jnp.int32), ~jnp.asarray(active), jnp.asarray(-1, jnp.int32))
    state, t, n, _, last = jax.lax.while_loop(cond, body, init)
    return StepOut(state, t, n, (t >= T) | ((n > 0) & (last == end)))
