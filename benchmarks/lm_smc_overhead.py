"""How much does steering cost over plain sampling on a transformer LM? (issue 4, "speed it must reach")

Times, in one process and interleaved (so machine load hits every variant alike):

* plain ancestral sampling of N sequences of T tokens (``pplalign.ancestral.ancestral_sample``);
* bootstrap SMC with a per-token potential φ[x_t] ~ N(0, 1) per vocabulary entry, resampling when
  ESS < N/2 (``adaptive``) and at every step (``every_step``);
* twisted SMC with a twist head (one D×V layer on the LM's final hidden state, the forward pass shared with
  the LM) and the locally optimal proposal, ESS-adaptive (``twisted``);
* the naive resampling that gathers the whole float32 cache, for reference (``naive_*``).

Prints one JSON line last: ``every_step_ratio``, ``adaptive_ratio``, ``twisted_ratio`` (SMC time / plain
time) and the absolute times, resampling counts and configuration.

    python -m benchmarks.lm_smc_overhead            # d_model 256, 4 layers, N=256, T=64
    python -m benchmarks.lm_smc_overhead --quick    # a small configuration (seconds)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import pplalign
from pplalign.ancestral import ancestral_sample
from models.lm.program import LMProgram
from models.lm.potentials import TokenScores
from models.lm.transformer import LMConfig, Transformer
from models.lm.twist_head import HeadTwist, TwistHead


def build(args, cache_dtype, reorder_mode):
    prompt_len = 8
    cfg = LMConfig(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model, prompt_len + args.steps)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = [1] + list(np.random.default_rng(0).integers(3, args.vocab, prompt_len - 1))
    return LMProgram.from_prompt(model, prompt, args.steps, cache_dtype=cache_dtype, bucket=args.bucket,
                                 reorder_mode=reorder_mode, banned=[2])  # no <eos>: every particle runs T steps


def main(argv=None):
    ap = argparse.ArgumentParser(description="SMC overhead over plain sampling on a transformer LM")
    ap.add_argument("--num-particles", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=261)
    ap.add_argument("--bucket", type=int, default=8)
    ap.add_argument("--cache-dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive full-cache reference")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_particles, args.steps, args.d_model, args.layers, args.repeats = 32, 16, 64, 2, 2
    n = args.num_particles
    program = build(args, jnp.dtype(args.cache_dtype), "bucketed")
    scores = TokenScores(jax.random.normal(jax.random.key(1), (args.vocab,)))
    target = pplalign.tilt(program, scores, 1.0)
    head = TwistHead(args.d_model, args.vocab, rngs=nnx.Rngs(2))
    head.out.kernel[...] = 0.05 * jax.random.normal(jax.random.key(3), head.out.kernel[...].shape)
    twist = HeadTwist(head)

    runs = {
        "plain": lambda k: ancestral_sample(k, program, n),
        "adaptive": lambda k: pplalign.smc(k, target, n, twist=scores, proposal=program.transition, ess_threshold=0.5),
        "every_step": lambda k: pplalign.smc(k, target, n, twist=scores, proposal=program.transition, ess_threshold=1.0),
        "twisted": lambda k: pplalign.smc(k, target, n, twist=twist, ess_threshold=0.5),
    }
    if not args.no_naive:
        naive_prog = build(args, jnp.float32, "full")
        naive_target = pplalign.tilt(naive_prog, scores, 1.0)
        runs["naive_plain"] = lambda k: ancestral_sample(k, naive_prog, n)
        runs["naive_adaptive"] = lambda k: pplalign.smc(k, naive_target, n, twist=scores, proposal=naive_prog.transition, ess_threshold=0.5)
        runs["naive_every_step"] = lambda k: pplalign.smc(k, naive_target, n, twist=scores, proposal=naive_prog.transition, ess_threshold=1.0)

    resamples = {}
    for name, fn in runs.items():  # compile, and count resampling events
        out = jax.block_until_ready(fn(jax.random.key(0)))
        if hasattr(out, "ancestors"):
            moved = np.any(np.asarray(out.ancestors) != np.arange(n)[None], axis=1)
            resamples[name] = int(moved.sum())
    times = {name: [] for name in runs}
    for r in tqdm(range(args.repeats), desc="timing"):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(100 + r)))
            times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(v)) for name, v in times.items()}
    result = {
        "every_step_ratio": med["every_step"] / med["plain"],
        "adaptive_ratio": med["adaptive"] / med["plain"],
        "twisted_ratio": med["twisted"] / med["plain"],
        "seconds": med,
        "resampling_steps": resamples,
        "config": dict(num_particles=n, steps=args.steps, d_model=args.d_model, layers=args.layers, vocab=args.vocab,
                       cache_dtype=args.cache_dtype, bucket=args.bucket, repeats=args.repeats,
                       backend=jax.default_backend()),
    }
    if not args.no_naive:
        result["naive_adaptive_ratio"] = med["naive_adaptive"] / med["naive_plain"]
        result["naive_every_step_ratio"] = med["naive_every_step"] / med["naive_plain"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
