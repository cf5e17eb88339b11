"""Pin XLA's CPU thread pool before jax starts its backend, so that timings on a shared machine compare like with like."""

from __future__ import annotations

import os


def pin_xla_cpu_threads(threads: int) -> None:
    """Run XLA's CPU work on ``threads`` threads (0 keeps XLA's default); call before the first jax computation."""
    if threads > 0:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
