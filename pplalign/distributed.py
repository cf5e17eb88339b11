"""The particle axis over a device mesh (``jax.sharding``); one code path for 1 or many devices, 1 or many hosts.

Shard with ``mesh = pplalign.particle_mesh()`` and pass ``mesh=mesh`` to a sampler: every per-particle leaf of
the carried state is constrained to ``NamedSharding(mesh, P('particles'))``, XLA partitions the step, and
resampling stays global (the gather crosses devices). JAX's partitionable threefry makes the random draws
independent of the sharding, so the same key gives the same particles on 1 or 8 devices.

Several processes (hosts) join one run through ``jax.distributed`` (``docs/multihost.md``): every process runs
the same program with the same key and holds the particles of its own devices. :func:`initialize` does the
joining and builds the global mesh; :func:`run` checks that the processes agree (an all-gather of a digest of
the key and the configuration), samples and gathers the particles to every process; :func:`gather` and
:func:`sharded_vmap` are the pieces it is made of. Nothing here starts a JAX backend at import.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "PARTICLE_AXIS",
    "Cluster",
    "initialize",
    "particle_mesh",
    "constrain_particles",
    "check_mesh",
    "check_agreement",
    "digest",
    "gather",
    "run",
    "sharded_vmap",
]

PARTICLE_AXIS = "particles"


class Cluster(NamedTuple):
    """What :func:`initialize` joined: the global particle mesh and the counts."""

    mesh: Mesh
    process_id: int
    num_processes: int
    num_local_devices: int
    num_devices: int
    platform: str

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.process_id == 0

    def describe(self) -> str:
        return (
            f"pplalign.distributed: {self.num_processes} process(es) joined, {self.num_devices} {self.platform} "
            f"device(s) in all ({self.num_local_devices} on process {self.process_id}); particle mesh over "
            f"{self.mesh.devices.size} device(s)"
        )


_joined = False  # initialize() has run in this process (joined, or alone)


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    cpu_collectives: str = "gloo",
    verbose: bool = True,
    **jax_kwargs: Any,
) -> Cluster:
    """Join this process to a multi-process run and build the global particle mesh; one call, before any
    other JAX computation.

    It calls ``jax.distributed.initialize(coordinator_address, num_processes, process_id, **jax_kwargs)``
    after selecting ``cpu_collectives`` (``"gloo"``) as JAX's cross-process implementation for CPU devices
    (GPUs use NCCL and TPUs their interconnect by themselves). On a SLURM or Open MPI allocation and on a
    Cloud TPU slice every argument may be omitted: JAX detects them (and, under SLURM/Open MPI with GPUs,
    gives each process one GPU). With no argument and no cluster detected, or with ``num_processes=1``, the
    process runs alone and nothing is joined. Calling it again returns the same description.

    Returns a :class:`Cluster` (``mesh`` over ``jax.devices()`` — every device of every process — and the
    counts); process 0 prints its one-line :meth:`Cluster.describe` when ``verbose``.
    """
    global _joined
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if num_processes != 1 and not _joined and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        try:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, **jax_kwargs)
        except ValueError as e:
            # JAX's auto-detection found no cluster (its first check is the coordinator address): run alone
            if explicit or os.environ.get("JAX_COORDINATOR_ADDRESS") or "coordinator_address" not in str(e):
                raise
    _joined = True
    cluster = Cluster(
        particle_mesh(),
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    if verbose and cluster.is_main:
        print(cluster.describe(), flush=True)
    return cluster


def particle_mesh(devices: Optional[Sequence[Any]] = None, axis_name: str = PARTICLE_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all of ``jax.devices()``, every process's) named for the particle
    axis."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (axis_name,))


# ---------------------------------------------------------------------------------------------------------
# Agreement between processes
# ---------------------------------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _leaf_bytes(leaf: Any) -> bytes:
    """A process-independent description of one leaf: array values, or the names of functions and types."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        # a global array is one value by construction; its shape, dtype and layout are what can differ
        return f"global{leaf.shape}{leaf.dtype}{leaf.sharding}".encode()
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        a = np.ascontiguousarray(np.asarray(leaf))
        return f"array{a.shape}{a.dtype}".encode() + a.tobytes()
    if isinstance(leaf, (bool, int, float, complex, str, bytes, type(None))):
        return repr(leaf).encode()
    if isinstance(leaf, Mesh):
        return f"mesh{leaf.axis_names}{[d.id for d in leaf.devices.flat]}".encode()
    name = getattr(leaf, "__qualname__", None) or type(leaf).__qualname__
    module = getattr(leaf, "__module__", None) or type(leaf).__module__
    return _ADDRESS.sub("", f"{module}.{name}:{leaf!r}" if not callable(leaf) else f"{module}.{name}").encode()


def digest(*trees: Any) -> bytes:
    """A SHA-256 digest of pytrees that is the same in every process holding the same values: array leaves
    by their bytes (key arrays by their key data), functions by their qualified names, other leaves by
    their ``repr`` with memory addresses removed, plus the tree structures."""
    h = hashlib.sha256()
    for tree in trees:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        h.update(_ADDRESS.sub("", str(treedef)).encode())
        for leaf in leaves:
            b = _leaf_bytes(leaf)
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.digest()


def _words(d: bytes) -> np.ndarray:
    return np.frombuffer(d[:16], np.int32).copy()  # 128 bits: int32 so that it survives x64 being off


def check_agreement(key: Any = None, *config: Any, what: str = "the configuration") -> None:
    """Raise ``ValueError`` unless every process passes the same ``key`` and the same ``config`` (any
    pytrees: target, N, sampler options). One all-gather of two 128-bit digests; a no-op in a
    single-process run. Every process must call it (it is a collective), and every process raises."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.stack([_words(digest(key)), _words(digest(*config))])
    every = np.asarray(multihost_utils.process_allgather(mine))  # [P, 2, 4]
    count = every.shape[0]
    for row, name in ((0, "the key"), (1, what)):
        differ = [p for p in range(count) if not np.array_equal(every[p, row], every[0, row])]
        if differ:
            raise ValueError(
                f"processes disagree on {name}: {len(differ)} of the {count} processes ({', '.join(map(str, differ))}) "
                f"differ from process 0 (digests {', '.join(every[p, row].view(np.uint32)[:1].tobytes().hex() for p in range(count))}); "
                "every process must run the same program with the same key"
            )


def check_mesh(mesh: Optional[Mesh], num_particles: int, *config: Any) -> None:
    """Refuse a mesh that is not a ``Mesh``, that does not divide ``num_particles`` or — in a multi-process run
    — that holds the devices of some processes only; in a multi-process run, also refuse processes that
    disagree on ``num_particles``, the mesh or ``config`` (:func:`check_agreement`, one small all-gather)."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    size = mesh.devices.size
    processes = jax.process_count()
    where = ""
    if processes > 1:
        held = sorted({d.process_index for d in mesh.devices.flat})
        spans = len(held) == processes
        # a mesh of local devices differs by construction from process to process: digest what must agree
        layout = (mesh.axis_names, mesh.devices.shape, spans, [d.id for d in mesh.devices.flat] if spans else None)
        check_agreement(None, num_particles, layout, *config, what="num_particles, the mesh or the configuration")
        if not spans:
            raise ValueError(
                f"the mesh holds {size} devices of process(es) {', '.join(map(str, held))} only, but {processes} "
                f"processes with {jax.device_count()} devices joined this run: build it from every process's "
                "devices, pplalign.particle_mesh() (jax.devices(), not jax.local_devices())"
            )
        where = f" ({processes} processes × {jax.local_device_count()} local devices)"
    if num_particles % size:
        raise ValueError(f"num_particles={num_particles} is not divisible by the mesh's {size} devices{where}")


# ---------------------------------------------------------------------------------------------------------
# Sharding and gathering
# ---------------------------------------------------------------------------------------------------------


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


def sharded_vmap(fn: Callable, mesh: Optional[Mesh] = None) -> Callable:
    """``jit(vmap(fn))`` with the batch axis of every input and output leaf sharded over ``mesh`` (default:
    the global particle mesh): independent runs — DTS trees, seeds, prompts — split over devices and
    processes with no communication. The batch size must be divisible by the device count."""

    def batched(*args):
        m = particle_mesh() if mesh is None else mesh
        sizes = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(args) if getattr(leaf, "ndim", 0)}
        if any(size % m.devices.size for size in sizes):
            raise ValueError(f"sharded_vmap: batch size {sorted(sizes)} is not divisible by the mesh's {m.devices.size} devices")
        return constrain_particles(jax.vmap(fn)(*constrain_particles(args, m)), m)

    return jax.jit(batched)


def gather(tree: Any) -> Any:
    """Every leaf as a numpy array holding its full global value, on every process.

    Arrays spread over several processes' devices are all-gathered
    (``jax.experimental.multihost_utils.process_allgather``; a collective: call it on every process);
    others are fetched. Every process then holds the whole result: keep what is too large for one host on
    the devices, and reduce it there or save each process's own shards (``docs/multihost.md``)."""

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    named = [i for i in spread if isinstance(leaves[i].sharding, NamedSharding)]
    if named:  # one compiled all-gather for the whole tree (process_allgather compiles one per leaf shape)
        out = tuple(NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in named)
        for i, x in zip(named, jax.jit(lambda *xs: xs, out_shardings=out)(*(leaves[i] for i in named))):
            leaves[i] = x  # now fully replicated: every process reads its own copy
    for i in set(spread) - set(named):
        from jax.experimental import multihost_utils

        leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(jax.device_get(x)) for x in leaves])


def run(
    sampler: Callable,
    key: jax.Array,
    target: Any,
    num_particles: int,
    *args: Any,
    mesh: Optional[Mesh] = None,
    gather_result: bool = True,
    **kwargs: Any,
) -> Any:
    """``sampler(key, target, num_particles, *args, mesh=mesh, **kwargs)`` on the global particle mesh, after
    checking that every process passes the same key, target, N and options (:func:`check_agreement`).

    ``sampler`` is any of the samplers taking ``mesh=`` (``pplalign.smc``, ``csmc``, ``importance_sampling``,
    ``tempered_smc``, ``island_smc``, ``many``). Returns the result gathered to numpy on every process
    (process 0 included; :func:`gather`), or the sharded result with ``gather_result=False``."""
    mesh = particle_mesh() if mesh is None else mesh
    name = f"{getattr(sampler, '__module__', '')}.{getattr(sampler, '__qualname__', type(sampler).__qualname__)}"
    check_agreement(key, name, target, num_particles, args, kwargs)
    result = sampler(key, target, num_particles, *args, mesh=mesh, **kwargs)
    return gather(result) if gather_result else result
