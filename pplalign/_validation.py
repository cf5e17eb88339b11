"""The argument checks every public sampler shares (DESIGN §4: bad input fails early with a ``ValueError``
naming the culprit). One definition of each, so that ``smc``, ``csmc``, ``best_of_n``, ``dts``,
``tempered_smc``, ``island_smc`` and ``many`` accept and refuse the same values."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .distributed import check_mesh
from .programs import Tilted, is_sequential, validate_beta

__all__ = ["check_key", "check_count", "check_fraction", "check_distribution", "check_inputs", "refuse_traced"]


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_key(key: Any) -> None:
    """A PRNG key: a typed key array of shape () (``jax.random.key``) or a uint32 [2] (``jax.random.PRNGKey``).

    A plain int (a seed) would otherwise fail deep inside ``jax.random.split`` with a TypeError."""
    hint = "pass jax.random.key(seed) or jax.random.PRNGKey(seed)"
    if not hasattr(key, "dtype") or not hasattr(key, "shape") or isinstance(key, np.generic):
        raise ValueError(f"key must be a JAX PRNG key, not {type(key).__name__} {key!r}; {hint}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key of shape (); got shape {key.shape} (split it first?)")
        return
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(f"key must be a JAX PRNG key (uint32 of shape (2,)); got {key.dtype} of shape {key.shape}; {hint}")


def _concrete_number(value: Any, name: str, kinds: str) -> Any:
    """``value`` as a numpy scalar if it is a concrete real number (Python, numpy or a 0-d array) of a dtype
    kind in ``kinds`` ("iu" integers, "iuf" reals); None otherwise. Tracers are refused by name: these
    arguments set shapes or Python-side decisions of the compiled sampler."""
    if _is_traced(value):
        raise ValueError(f"{name} must be a concrete number (it is fixed at compile time); got a traced value")
    if isinstance(value, (bool, np.bool_)) or not (np.isscalar(value) or getattr(value, "shape", None) == ()):
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        return None
    return arr[()] if arr.ndim == 0 and arr.dtype.kind in kinds else None


def check_count(value: Any, name: str, low: int = 1) -> int:
    """An integer ≥ ``low``: a Python int, a numpy integer or a 0-d integer array; returned as ``int``."""
    arr = _concrete_number(value, name, "iu")
    if arr is None or int(arr) < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(arr)


def check_fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0, open_ends: bool = False) -> float:
    """A real number in [low, high] ((low, high) with ``open_ends``): Python, numpy or 0-d array; as ``float``."""
    arr = _concrete_number(value, name, "iuf")
    number = math.nan if arr is None else float(arr)
    inside = low < number < high if open_ends else low <= number <= high
    if not inside:
        bounds = f"({low}, {high})" if open_ends else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bounds}; got {value!r}")
    return number


def check_distribution(d: Any, what: str) -> Any:
    """``d`` if it is a numpyro distribution (what a transition or proposal returns); else a ValueError.

    Called while tracing, so it costs nothing per call and names the culprit before an AttributeError
    from deep inside the sampler would."""
    if not isinstance(d, dist.Distribution):
        raise ValueError(f"{what} must return a numpyro distribution (e.g. dist.CategoricalLogits); got {type(d).__name__}")
    return d


def check_inputs(
    target: Any, num_particles: Any, ess_threshold: Any, mesh=None, *, key: Any = None, count_name: str = "num_particles"
) -> tuple[int, float]:
    """The checks of the sequential samplers; returns (N, ESS threshold) as (int, float).

    ``count_name`` is the argument's name in the caller's signature (``n`` for :func:`best_of_n`)."""
    if not isinstance(target, Tilted) or not is_sequential(target.base):
        raise ValueError(
            f"target must come from pplalign.tilt(base, reward, beta) with a Sequential base; got {type(target).__name__}"
        )
    validate_beta(target.beta)
    if key is not None:
        check_key(key)
    n = check_count(num_particles, count_name)
    threshold = check_fraction(ess_threshold, "ess_threshold")
    check_mesh(mesh, n)
    return n, threshold


def refuse_traced(function: str, hint: str, **arguments: Any) -> None:
    """Raise a ValueError if any leaf of ``arguments`` is traced: ``function`` runs Python-side checks and
    loops between compiled calls, so it cannot itself be wrapped in the caller's ``jit``/``vmap``."""
    for name, value in arguments.items():
        if any(_is_traced(leaf) for leaf in jax.tree_util.tree_leaves(value)):
            raise ValueError(f"{function} cannot run under jit/vmap ({name} is traced); {hint}")
