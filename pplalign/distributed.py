"""The particle axis over a device mesh (``jax.sharding``); one code path for 1 or many devices.

Shard with ``mesh = pplalign.particle_mesh()`` and pass ``mesh=mesh`` to a sampler: every per-particle leaf of
the carried state is constrained to ``NamedSharding(mesh, P('particles'))``, XLA partitions the step, and
resampling stays global (the gather crosses devices). JAX's partitionable threefry makes the random draws
independent of the sharding, so the same key gives the same particles on 1 or 8 devices.
On a multi-host slice call ``jax.distributed.initialize()`` first; ``jax.devices()`` then spans all hosts.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["PARTICLE_AXIS", "particle_mesh", "constrain_particles", "check_mesh"]

PARTICLE_AXIS = "particles"


def particle_mesh(devices: Optional[Sequence[Any]] = None, axis_name: str = PARTICLE_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``) named for the particle axis."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (axis_name,))


def check_mesh(mesh: Optional[Mesh], num_particles: int) -> None:
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    size = mesh.devices.size
    if num_particles % size:
        raise ValueError(f"num_particles={num_particles} is not divisible by the mesh's {size} devices")


def constrain_particles(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Shard every leaf with a leading particle axis over ``mesh`` (a no-op without a mesh)."""
    if mesh is None:
        return tree
    axis = mesh.axis_names[0]

    def constrain(leaf):
        if getattr(leaf, "ndim", 0) == 0:
            return leaf
        spec = PartitionSpec(axis, *([None] * (leaf.ndim - 1)))
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(constrain, tree)
