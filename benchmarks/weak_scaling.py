"""Weak scaling of sharded SMC: seconds per SMC step with N per device held constant, at 1, 2 and 4 processes
joined by ``jax.distributed`` on this machine (``docs/multihost.md``), or over 1, 2, 4, 8… devices of one
process (``--in-process``, the GPU host's mode in ``benchmarks/gpu.sh``).

The workload is every-step bootstrap SMC on a Markov LM whose particle state holds the token history [N, T],
so each step's systematic resampling is a global gather across devices and processes. Perfect weak scaling
keeps the seconds per step flat as devices are added; ``efficiency_pK`` = t(1) / t(K).

    .venv/bin/python -m benchmarks.weak_scaling                              # 1, 2, 4 processes × 1 CPU device
    .venv/bin/python -m benchmarks.weak_scaling --in-process --devices 1 2 4 8   # one process, its devices

Each run: one warm-up call (compiles), then the median of ``--repeats`` calls, measured on process 0.
Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _target(vocab: int, steps: int):
    import jax

    import pplalign
    from models.markov_lm import random_markov_lm

    lm = random_markov_lm(jax.random.PRNGKey(0), vocab, steps, concentration=0.3)
    scores = jax.random.normal(jax.random.PRNGKey(1), (vocab,))
    reward = lambda tokens: 0.1 * jax.numpy.sum(scores[tokens])  # a per-token score of the finished sequence
    return pplalign.tilt(lm, reward, 1.0)


def _seconds_per_step(mesh, args) -> float:
    import jax

    import pplalign
    from benchmarks._timing import median_seconds

    target = _target(args.vocab, args.steps)
    n = args.particles_per_device * mesh.devices.size
    run = lambda key: pplalign.smc(key, target, n, ess_threshold=1.0, mesh=mesh).log_Z
    return median_seconds(run, jax.random.key(0), repeats=args.repeats) / args.steps


def worker(args) -> None:
    """One process of a multi-process run: join, time, and (process 0) print one JSON line."""
    import jax

    from pplalign import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        cluster = distributed.initialize(args.coordinator, args.num_processes, args.process_id, verbose=False)
    else:
        cluster = distributed.initialize(num_processes=1, verbose=False)
    seconds = _seconds_per_step(cluster.mesh, args)
    if cluster.is_main:
        print(json.dumps(dict(processes=cluster.num_processes, devices=cluster.num_devices, seconds_per_step=seconds)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_process(args) -> list[dict]:
    """Start ``p`` processes × ``--devices-per-process`` CPU devices for each ``p`` in ``--processes``."""
    rows = []
    for p in args.processes:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTEST_"))}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
                   PYTHONPATH=str(ROOT))
        address = f"127.0.0.1:{_free_port()}"
        common = ["--vocab", str(args.vocab), "--steps", str(args.steps), "--repeats", str(args.repeats),
                  "--particles-per-device", str(args.particles_per_device)]
        procs = [
            subprocess.Popen([sys.executable, "-m", "benchmarks.weak_scaling", "--worker", address, str(p), str(i), *common],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
            for i in range(p)
        ]
        start = time.perf_counter()
        try:
            outs = [proc.communicate(timeout=max(1.0, args.timeout - (time.perf_counter() - start))) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"{p} processes: a worker failed\n" + "\n".join(err[-2000:] for _, err in outs))
        rows.append(json.loads(outs[0][0].strip().splitlines()[-1]))
    return rows


def in_process(args) -> list[dict]:
    import jax

    import pplalign

    counts = [k for k in args.devices if k <= jax.device_count()]
    return [dict(processes=1, devices=k, seconds_per_step=_seconds_per_step(pplalign.particle_mesh(jax.devices()[:k]), args))
            for k in counts]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--in-process", action="store_true", help="one process, meshes over its first k devices")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--particles-per-device", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for each group of processes")
    parser.add_argument("--worker", nargs=3, metavar=("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.coordinator, args.num_processes, args.process_id = args.worker[0], int(args.worker[1]), int(args.worker[2])
        return worker(args)

    rows = in_process(args) if args.in_process else multi_process(args)
    import jax

    base = rows[0]["seconds_per_step"]
    print(f"N per device {args.particles_per_device}, T {args.steps}, vocab {args.vocab}, every-step resampling"
          f" ({jax.default_backend() if args.in_process else 'cpu'})")
    print(f"{'processes':>9s} {'devices':>7s} {'N':>8s} {'ms/step':>9s} {'efficiency':>10s}")
    for r in rows:
        print(f"{r['processes']:9d} {r['devices']:7d} {r['devices'] * args.particles_per_device:8d} "
              f"{1e3 * r['seconds_per_step']:9.3f} {base / r['seconds_per_step']:10.2f}")
    key = "devices" if args.in_process else "processes"
    summary = dict(benchmark="weak_scaling", mode="in_process" if args.in_process else "multi_process",
                   particles_per_device=args.particles_per_device, steps=args.steps, cpu_count=os.cpu_count())
    for r in rows:
        summary[f"seconds_per_step_{key[0]}{r[key]}"] = r["seconds_per_step"]
        summary[f"efficiency_{key[0]}{r[key]}"] = base / r["seconds_per_step"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
