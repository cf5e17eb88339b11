"""Saving and resuming a DTS tree (``.npz``): the tree's arrays, the PRNG key and a fingerprint of the
configuration, so that a resumed run continues exactly (iteration k always uses ``fold_in(key, k)``) and a
checkpoint of another configuration is refused with a clear error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .dts import DTSConfig, init
from .tree import Tree

__all__ = ["save_tree", "load_tree", "fingerprint"]


def twist_digest(twist: Any) -> str:
    """The twist's pytree structure and a SHA-256 of its leaves: a resumed "twisted" (or twist-guided
    consistent) run must grow with the same ψ̃, e.g. the same calibration offsets. Array leaves (PRNG keys by
    their key data) are hashed by dtype, shape and bytes; functions by module and qualified name (stable across
    processes, unlike their address); other leaves by ``repr``."""
    leaves, treedef = jax.tree_util.tree_flatten(twist)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            arr = np.asarray(leaf)
            h.update(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes())
        elif callable(leaf) and hasattr(leaf, "__qualname__"):
            h.update(f"{getattr(leaf, '__module__', '')}.{leaf.__qualname__}".encode())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()[:16]


def fingerprint(config: DTSConfig, target: Any, capacity: int, twist: Any = None) -> dict:
    """What must agree between a checkpoint and the run that resumes it (the twist too, when one is given)."""
    template = jax.eval_shape(target.base.init, jax.random.PRNGKey(0))
    leaves = [[list(s.shape), str(s.dtype)] for s in jax.tree_util.tree_leaves(template)]
    return {
        "config": dataclasses.asdict(config),
        "num_steps": int(target.num_steps),
        "beta": float(target.beta),
        "program": type(target.base).__name__,
        "state_leaves": leaves,
        "capacity": int(capacity),
        **({} if twist is None else {"twist": twist_digest(twist)}),
    }


def save_tree(path: str, tree: Tree, key: jax.Array, config: DTSConfig, target: Any, twist: Any = None) -> None:
    """Write the tree, the run's key and the configuration fingerprint (with ``twist``'s digest when given) to
    ``path`` (atomically)."""
    flat = {f"state_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(tree.states))}
    for name in Tree._fields:
        if name != "states":
            flat[name] = np.asarray(getattr(tree, name))
    flat["key"] = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    flat["fingerprint"] = np.asarray(json.dumps(fingerprint(config, target, tree.capacity, twist), sort_keys=True))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_tree(path: str, config: DTSConfig, target: Any, twist: Any = None) -> tuple[Tree, jax.Array]:
    """Read a checkpoint written by :func:`save_tree`; returns (tree, key). Raises ``ValueError`` if it was
    written for another configuration, program, β, state layout or twist (pass the same ``twist`` as when
    saving)."""
    with np.load(path, allow_pickle=False) as data:
        saved = json.loads(str(data["fingerprint"]))
        capacity = int(saved.get("capacity", -1))
        want = fingerprint(config, target, capacity, twist)
        if saved != want:
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            raise ValueError(
                f"checkpoint {path!r} belongs to another configuration (differs in {diff}: saved "
                f"{ {k: saved.get(k) for k in diff} } vs now { {k: want.get(k) for k in diff} })"
            )
        template = init(target, 1)
        treedef = jax.tree_util.tree_structure(template.states)
        n_leaves = treedef.num_leaves
        states = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(data[f"state_{i}"]) for i in range(n_leaves)])
        # log_survival came with the "twisted" variant: an older checkpoint has none (no roulette: all 0)
        fields = {
            name: jnp.asarray(data[name]) if name in data.files else jnp.zeros((capacity,), jnp.float32)
            for name in Tree._fields
            if name != "states"
        }
        key = jnp.asarray(data["key"])
    return Tree(states=states, **fields), key
