"""What defines a DTS tree's target and algorithm, as digests a tree carries with it (``Tree.setup``) and a
checkpoint stores, so that growing a tree on under another setup is refused instead of silently mixing two
targets (a tree grown at β = 1 and grown on at β = 0.1 reports neither log Z).

The setup has six components, each hashed on its own so that a refusal can say which differ:

* ``beta`` — β of the target;
* ``config`` — the :class:`~pplalign.search.DTSConfig` (variant, DTS*, widening, UCT constant, splits);
* ``program``, ``reward`` — the base program's and the reward's pytree structure (class and function names
  included) and the bytes of their array leaves (weights, tables);
* ``twist`` — the same digest of the twist (``"none"`` without one);
* ``state`` — T and the shapes and dtypes of the program's state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["COMPONENTS", "pytree_digest", "setup_components", "setup_stamp", "check_setup", "stamp_tree"]

COMPONENTS = ("beta", "config", "program", "reward", "twist", "state")


def pytree_digest(obj: Any) -> str:
    """The pytree structure of ``obj`` and a SHA-256 of its leaves. Array leaves (PRNG keys by their key
    data) are hashed by dtype, shape and bytes; functions by module and qualified name (stable across
    processes, unlike their address); other leaves by ``repr``."""
    leaves, treedef = jax.tree_util.tree_flatten(obj)
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


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def setup_components(config: Any, target: Any, twist: Any = None) -> dict:
    """The setup of a DTS run as strings, one per name of :data:`COMPONENTS` (readable where short)."""
    template = jax.eval_shape(target.base.init, jax.random.PRNGKey(0))
    state = [[list(s.shape), str(s.dtype)] for s in jax.tree_util.tree_leaves(template)]
    return {
        "beta": repr(float(target.beta)),
        "config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        "program": f"{type(target.base).__name__}:{pytree_digest(target.base)}",
        "reward": f"{_name(target.reward)}:{pytree_digest(target.reward)}",
        "twist": "none" if twist is None else f"{_name(twist)}:{pytree_digest(twist)}",
        "state": json.dumps({"num_steps": int(target.num_steps), "leaves": state}),
    }


def setup_stamp(components: dict) -> np.ndarray:
    """[len(COMPONENTS), 2] uint32: the first 8 bytes of each component's SHA-256 (all zeros: no stamp)."""
    rows = [np.frombuffer(hashlib.sha256(components[name].encode()).digest()[:8], np.uint32) for name in COMPONENTS]
    return np.stack(rows)


def stamp_tree(tree: Any, target: Any, config: Any, twist: Any = None) -> Any:
    """``tree`` marked as grown under this setup (what :func:`pplalign.dts` does to the trees it grows); for
    a tree grown by :func:`~pplalign.search.run_loop` under the caller's jit, before passing it to ``dts``."""
    return tree._replace(setup=jnp.asarray(setup_stamp(setup_components(config, target, twist))))


def check_setup(tree: Any, components: dict) -> None:
    """Raise ``ValueError`` naming the components in which the setup the tree was grown under differs from
    ``components``. An unstamped tree is accepted only while empty (a fresh :func:`~pplalign.search.init`)."""
    have = np.asarray(tree.setup)
    if not have.any():
        if int(tree.num_nodes) > 1:
            raise ValueError(
                "the tree carries no record of the setup it was grown under (grown by search.run_loop?); if it "
                "matches this target, config and twist, mark it with search.stamp_tree(tree, target, config, twist)"
            )
        return
    want = setup_stamp(components)
    differ = [name for name, a, b in zip(COMPONENTS, have, want) if not np.array_equal(a, b)]
    if differ:
        now = {name: components[name] for name in differ}
        raise ValueError(
            f"the tree was grown under another setup: it differs in {differ} (now {now}); growing it on would mix "
            "two targets. Resume with the beta, variant/config, reward, program and twist it was grown with."
        )
