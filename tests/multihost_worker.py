"""One process of the multi-host test (tests/test_multihost.py), also the script docs/multihost.md runs.

    python tests/multihost_worker.py OUT_DIR                                  # one process, all its devices
    python tests/multihost_worker.py OUT_DIR 127.0.0.1:PORT NUM_PROCESSES ID  # one of several processes

Every process runs every method with the same keys on the global particle mesh, gathers each result to numpy
(``pplalign.distributed.gather``) and writes ``OUT_DIR/process{ID}.npz`` (the gathered arrays) and
``OUT_DIR/process{ID}.json`` (counts, timings and the messages of the bad-input checks, multi-process only).
Sizes are tiny: compiles are the cost. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import pplalign  # noqa: E402  (importing pplalign starts no JAX backend)
from pplalign import distributed  # noqa: E402

FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                "--xla_cpu_parallel_codegen_split_count=1"]
TIMES: dict = {}  # seconds per method (compile included), for the JSON


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    if len(argv) > 1:
        address, count, pid = argv[1], int(argv[2]), int(argv[3])
        cluster = distributed.initialize(address, count, pid, initialization_timeout=60)
    else:
        cluster = distributed.initialize(num_processes=1)
    start = time.perf_counter()
    results, errors = compute(cluster), {}
    if cluster.num_processes > 1:
        errors = bad_inputs(cluster)
    arrays = {f"{name}/{field}": value for name, fields in results.items() for field, value in fields.items()}
    import numpy as np

    np.savez(out / f"process{cluster.process_id}.npz", **arrays)
    meta = dict(
        process_id=cluster.process_id,
        num_processes=cluster.num_processes,
        num_devices=cluster.num_devices,
        num_local_devices=cluster.num_local_devices,
        describe=cluster.describe(),
        seconds=time.perf_counter() - start,
        errors=errors,
        times=TIMES,
    )
    (out / f"process{cluster.process_id}.json").write_text(json.dumps(meta))


@functools.cache
def _setup():
    """The Markov-LM target, a rough twist, a CSMC reference and reward tables, from numpy draws: set-up
    written with JAX ops would compile dozens of small programs (a second or more each on a busy CPU)."""
    import numpy as np

    from models.markov_lm import MarkovLM, TableReward
    from models.markov_twists import TabularTwist

    rng = np.random.default_rng(0)
    v, steps = 4, 5
    log_softmax = lambda x: (x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))).astype(np.float32)
    lm = MarkovLM(log_softmax(rng.normal(size=v)), log_softmax(rng.normal(size=(v, v))), steps)
    reward = TableReward(rng.normal(size=v**steps).astype(np.float32), v)
    sizes = [v ** (t + 1) for t in range(steps)]
    rough = TabularTwist(rng.normal(size=sum(sizes)).astype(np.float32),
                         np.cumsum([0] + sizes[:-1]).astype(np.int32), v)  # weights vary, resampling runs
    ref = rng.integers(0, v, steps).astype(np.int32)
    tables = rng.normal(size=(2, v**steps)).astype(np.float32)
    lm, reward, rough, ref, tables = jax.tree_util.tree_map(jax.numpy.asarray, (lm, reward, rough, ref, tables))
    return lm, reward, pplalign.tilt(lm, reward, 1.0), rough, ref, tables


def _network(cfg):
    """A random transformer whose weights are numpy draws (no compile for its initialisers)."""
    import numpy as np
    from flax import nnx

    from models.lm.transformer import Transformer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)
    state = jax.tree_util.tree_map(lambda s: jax.numpy.asarray(0.3 * rng.normal(size=s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


def compute(cluster) -> dict:
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from models.lm.potentials import TokenScores
    from models.lm.program import LMProgram
    from models.lm.tokenizer import BOS
    from models.lm.transformer import LMConfig
    from models.markov_lm import TableReward
    from pplalign import search
    from pplalign.islands import island_smc, many
    from pplalign.tempered import tempered_smc

    mesh = cluster.mesh
    lm, reward, target, rough, ref, tables = _setup()
    key = jax.random.key(3)
    n = 16  # two particles per device
    res = {}

    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        TIMES[name] = round(now - clock[0], 2)
        clock[0] = now

    def keep(name, particles):
        g = distributed.gather(particles)
        lap(name)
        res[name] = dict(log_Z=g.log_Z, log_weights=g.log_weights, ancestors=g.ancestors, ess=g.ess,
                         **{f"samples{i}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(g.samples))})

    keep("smc_bootstrap", distributed.run(pplalign.smc, key, target, n, ess_threshold=1.0))
    keep("smc_twisted", pplalign.smc(key, target, n, twist=rough, mesh=mesh))
    adaptive = pplalign.smc(key, target, n, ess_threshold=0.5, mesh=mesh)
    keep("smc_adaptive", adaptive)
    keep("csmc", pplalign.csmc(key, target, n, ref, mesh=mesh))

    def model():
        return numpyro.sample("z", dist.Normal(jnp.zeros(2), 1.5).to_event(1))

    static = pplalign.tilt(model, lambda z: -0.5 * jnp.sum((z - 1.0) ** 2) / 0.25, 1.0)
    keep("tempered_smc", tempered_smc(key, static, n, max_stages=6, num_mcmc_steps=2, mesh=mesh))
    keep("island_smc", island_smc(key, target, n, num_islands=cluster.num_devices, mesh=mesh))
    targets = jax.vmap(lambda v: pplalign.tilt(lm, TableReward(v, 4), 1.0))(tables)
    keep("many", many(key, targets, n, mesh=mesh))

    # DTS: a vmapped batch of trees, one per device, split over the processes with no communication
    tree0 = search.init(target, search.nodes_needed(lm.num_steps, 6))
    grow = distributed.sharded_vmap(lambda k: search.run_loop(k, tree0, target, 6, search.DTSConfig(), None), mesh)
    trees = distributed.gather(grow(jax.random.split(key, cluster.num_devices)))
    res["dts"] = dict(log_value=trees.log_value, visits=trees.visits, num_nodes=trees.num_nodes, nfe=trees.nfe,
                      **{f"states{i}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(trees.states))})
    lap("dts")

    # the language-model program: KV cache reordered at every step's resampling
    cfg = LMConfig(12, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=16)
    program = LMProgram.from_prompt(_network(cfg), [BOS, 5, 7], 4, bucket=4, reorder_mode="bucketed")
    scores = TokenScores(0.7 * np.random.default_rng(2).normal(size=cfg.vocab_size).astype(np.float32))
    keep("lm_smc", pplalign.smc(key, pplalign.tilt(program, scores, 1.0), n, twist=scores, ess_threshold=1.0, mesh=mesh))

    # results too large to gather: reduce on the devices (a replicated scalar), or keep each process's rows
    p = adaptive
    mean = jax.jit(lambda p: jnp.sum(p.normalized_weights * jnp.sum(p.samples, axis=-1)))(p)
    rows = {s.index[0].start or 0: np.asarray(s.data) for s in p.samples.addressable_shards}
    res["reduce"] = dict(mean=np.asarray(mean),  # replicated: readable on every process without a gather
                         local_starts=np.asarray(sorted(rows)), local_rows=np.concatenate([rows[k] for k in sorted(rows)]))
    lap("reduce")
    return res


def bad_inputs(cluster) -> dict:
    """Each expected ValueError's message (None if none was raised); every process raises the same."""
    target = _setup()[2]
    key = jax.random.key(3)
    other = jax.random.key(3 + cluster.process_id)  # process 1 disagrees on the key
    errors = {}
    cases = {
        "not_divisible": lambda: pplalign.smc(key, target, 12, mesh=cluster.mesh),
        "local_mesh": lambda: pplalign.smc(key, target, 16, mesh=pplalign.particle_mesh(jax.local_devices())),
        "key_disagrees": lambda: distributed.run(pplalign.smc, other, target, 16),
        "config_disagrees": lambda: distributed.run(pplalign.smc, key, target, 16, ess_threshold=0.5 + 0.1 * cluster.process_id),
        "beta_disagrees": lambda: distributed.run(pplalign.smc, key, pplalign.tilt(target.base, target.reward, 1.0 + cluster.process_id), 16),
        "n_disagrees": lambda: pplalign.smc(key, target, 16 + 8 * cluster.process_id, mesh=cluster.mesh),
    }
    for name, call in cases.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # compiles are this script's cost: cheaper CPU code generation (about 20 % less CPU time), added here so that
    # the commands in docs/multihost.md stay the test's; every run compiles alike, so no comparison depends on it
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE])
    main(sys.argv[1:])
