"""Saving and resuming a DTS tree (``.npz``): the tree's arrays, the PRNG key and a fingerprint of the
configuration, so that a resumed run continues exactly (iteration k always uses ``fold_in(key, k)``) and a
checkpoint of another configuration is refused with a clear error."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .dts import DTSConfig, init
from .fingerprint import pytree_digest, setup_components, setup_stamp
from .tree import Tree

__all__ = ["save_tree", "load_tree", "fingerprint", "twist_digest"]

twist_digest = pytree_digest  # the digest a checkpoint keeps of the twist (see :mod:`.fingerprint`)


def fingerprint(config: DTSConfig, target: Any, capacity: int, twist: Any = None) -> dict:
    """What must agree between a checkpoint and the run that resumes it: β, the config, digests of the
    program, the reward and the twist (their pytree structure, function names and array leaves), the state
    layout (:func:`~pplalign.search.fingerprint.setup_components`) and the capacity."""
    return {**setup_components(config, target, twist), "capacity": int(capacity)}


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
    written for another configuration, β, program, reward (weights included), state layout or twist (pass the
    same ``twist`` as when saving). The tree comes back stamped with this setup (``Tree.setup``), so that
    :func:`pplalign.dts` refuses to grow it on under another."""
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
            if name not in ("states", "setup")
        }
        key = jnp.asarray(data["key"])
    setup = jnp.asarray(setup_stamp(setup_components(config, target, twist)))  # verified equal just above
    return Tree(states=states, setup=setup, **fields), key
