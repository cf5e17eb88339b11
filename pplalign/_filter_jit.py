"""Compile a function whose arguments mix arrays with Python objects (programs, rewards, resamplers).

Arrays become traced inputs; everything else (functions, Python numbers, strings, meshes, the tree structure)
becomes part of the compile-cache key. So two calls with the same program and reward but different weights or
β (stored as an array by ``tilt``) reuse one compiled executable; a sampler compiles once per configuration.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["filter_jit", "is_dynamic"]


def is_dynamic(leaf: Any) -> bool:
    """Whether a pytree leaf is traced (an array) rather than baked into the compile key."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run(fn: Callable, treedef: Any, static: tuple, dynamic: tuple) -> Any:
    leaves = []
    dyn = iter(dynamic)
    for is_dyn, value in static:
        leaves.append(next(dyn) if is_dyn else value)
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    return fn(*args, **kwargs)


def filter_jit(fn: Callable) -> Callable:
    """`jax.jit` that traces array leaves and treats every other leaf as static (hashable) data."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        static = tuple((True, None) if is_dynamic(x) else (False, x) for x in leaves)
        dynamic = tuple(x for x in leaves if is_dynamic(x))
        return _run(fn, treedef, static, dynamic)

    return wrapper
