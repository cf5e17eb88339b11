"""Compile seconds of a whole SMC run for T = 16, 64, 256: flat in T, because the steps are a lax.scan.

Prints one JSON line last: ``compile_seconds`` per T and ``max_over_min``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import jax
import jax.numpy as jnp

import pplalign
from models.markov_lm import random_markov_lm

smc_module = importlib.import_module("pplalign.smc")


def compile_seconds(num_steps: int, num_particles: int, twisted: bool) -> float:
    lm = random_markov_lm(jax.random.PRNGKey(0), 8, num_steps)
    target = pplalign.tilt(lm, lambda tokens: jnp.sum(tokens == 1).astype(jnp.float32), 1.0)
    twist = (lambda state, t: 0.1 * jnp.sum(state.tokens == 1)) if twisted else None
    fn = jax.jit(lambda key: smc_module.run_smc(key, target, num_particles, twist=twist))
    start = time.perf_counter()
    fn.lower(jax.random.PRNGKey(0)).compile()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--particles", type=int, default=256)
    args = parser.parse_args(argv)
    compile_seconds(8, args.particles, True)  # warm up the tracing machinery
    out = {}
    for twisted in (False, True):
        key = "twisted" if twisted else "bootstrap"
        out[key] = {str(t): round(compile_seconds(t, args.particles, twisted), 3) for t in args.steps}
    ratios = [max(v.values()) / min(v.values()) for v in out.values()]
    result = dict(compile_seconds=out, max_over_min=round(max(ratios), 3), particles=args.particles)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
