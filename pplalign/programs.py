"""Generative programs and reward-tilted targets.

A *sequential* program p₀(x_0..x_{T-1}) is any object with the four methods of :class:`Sequential`.
:func:`tilt` turns it into the target

    σ(x) = p₀(x) · exp(r(x)/β) / Z,     Z = E_{p₀}[exp(r(x)/β)],

the optimum of the KL-regularised objective E_q[r] − β·KL(q‖p₀), whose value is β·log Z (Korbak et al. 2022).

Programs, rewards, twists and proposals are passed through ``jax.jit``: arrays in them (weights, transition
matrices, network parameters) must be pytree leaves (a ``NamedTuple``, a dataclass registered with
``jax.tree_util.register_dataclass``, an ``flax.nnx`` module); integers, strings and plain functions are
treated as static configuration.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Sequential", "Twist", "Tilted", "tilt", "is_sequential", "validate_beta", "invalid_beta", "safe_beta"]

State = Any
X = Any


@runtime_checkable
class Sequential(Protocol):
    """A step-wise generative program p₀(x_0..x_{T-1}) = ∏_t p₀(x_t | x_{<t}).

    ``init`` and ``transition`` see one particle; the samplers vmap them. ``transition`` returns a numpyro
    distribution; a ``Categorical`` marks a finite-support step, for which twisted SMC can score every value.
    Expensive work goes where it belongs: a language model runs its network in ``update`` and keeps the
    next-token logits in the state, so ``transition`` only reads them.
    """

    num_steps: int

    def init(self, key: jax.Array) -> State: ...

    def transition(self, state: State, t: jax.Array) -> Any: ...

    def update(self, state: State, x_t: Any, t: jax.Array) -> State: ...

    def output(self, state: State) -> X: ...


@runtime_checkable
class Twist(Protocol):
    """A twist ψ_t: ``twist(state, t)`` is log ψ_t of the prefix x_0..x_t, scored on the state *after*
    ``update`` at step t. The exact (optimal) twist is ψ*_t(x_{≤t}) = E_{p₀}[exp(r(x)/β) | x_{≤t}]
    (Zhao et al. 2024, eq. 5). A twist may also define ``candidates(state, t) -> [K]``: log ψ_t for every
    value of x_t at once, from the state *before* step t (a twist head over the vocabulary)."""

    def __call__(self, state: State, t: jax.Array) -> jax.Array: ...


def is_sequential(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("num_steps", "init", "transition", "update", "output"))


_F32 = np.finfo(np.float32)


def validate_beta(beta: Any) -> None:
    """β must be a finite positive number that float32 holds as a normal number, β ∈ [2⁻¹²⁶, 3.4·10³⁸]
    (checked when concrete). A smaller β would become 0 (or a denormal) in float32 and r/β a NaN or ±inf
    that looks like a bad reward. A traced β is not checked here: the samplers report it in the result
    (``Particles.invalid_beta``, see :func:`invalid_beta`)."""
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        value = float(beta)
    elif isinstance(beta, jax.core.Tracer):
        return
    else:
        arr = np.asarray(beta)
        if arr.ndim != 0:
            raise ValueError(f"beta must be a scalar per target (vmap over targets for many β); got shape {arr.shape}")
        value = float(arr)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"beta must be finite and > 0 (the KL coefficient); got {value}")
    if not float(_F32.tiny) <= value <= float(_F32.max):
        raise ValueError(
            f"beta = {value:g} is outside the normal float32 range [{_F32.tiny:.3g}, {_F32.max:.3g}] in which the "
            "samplers compute r/beta; rescale the reward instead"
        )


def invalid_beta(beta: Any) -> jax.Array:
    """[] bool: β is not a finite float32 ≥ 2⁻¹²⁶ (the traced counterpart of :func:`validate_beta`)."""
    b = jnp.asarray(beta, jnp.float32)
    return ~(jnp.isfinite(b) & (b >= _F32.tiny))


def safe_beta(beta: Any) -> jax.Array:
    """β where it is valid, else 1: r/β is then computed on a stand-in, the result is masked and flagged
    (``Particles.invalid_beta``), and a bad β is never reported as a NaN reward."""
    return jnp.where(invalid_beta(beta), jnp.float32(1.0), beta)


@jax.tree_util.register_pytree_node_class
class Tilted:
    """σ ∝ p₀ · exp(reward(output)/β) for a sequential base program.

    A pytree: ``base``, ``reward`` and ``beta`` are children, so a target can be built inside ``vmap``
    (many prompts, many β) and passed through ``jit``.
    """

    def __init__(self, base: Any, reward: Callable[[X], jax.Array], beta: Any):
        self.base = base
        self.reward = reward
        self.beta = beta if isinstance(beta, jax.core.Tracer) else jnp.asarray(beta, jnp.float32)

    @property
    def num_steps(self) -> int:
        return int(self.base.num_steps)

    def log_potential(self, x: X) -> jax.Array:
        """log of the tilt, r(x)/β (with β = 1 standing in for an invalid traced β; see :func:`safe_beta`)."""
        return jnp.asarray(self.reward(x)) / safe_beta(self.beta)

    def tree_flatten(self):
        return (self.base, self.reward, self.beta), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.base, obj.reward, obj.beta = children
        return obj

    def __repr__(self) -> str:
        return f"Tilted(base={type(self.base).__name__}, reward={getattr(self.reward, '__name__', self.reward)!r}, beta={self.beta})"


def tilt(base: Any, reward: Callable[[X], jax.Array], beta: Any = 1.0, **kwargs: Any) -> Any:
    """Build the reward-tilted target σ ∝ p₀·exp(reward/β).

    ``base`` is a :class:`Sequential` program, or a static program (a genjax generative function or a
    numpyro model; extra keyword arguments such as ``args=`` go to :func:`pplalign.static.tilt_static`).
    """
    if not callable(reward):
        raise ValueError(f"reward must be callable; got {type(reward).__name__}")
    validate_beta(beta)
    if is_sequential(base):
        if kwargs:
            raise ValueError(f"tilt of a Sequential program takes no extra arguments; got {sorted(kwargs)}")
        steps = base.num_steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"base.num_steps must be a positive Python int; got {steps!r}")
        return Tilted(base, reward, beta)
    from . import static  # static programs (genjax, numpyro) live in their own module

    return static.tilt_static(base, reward, beta, **kwargs)
