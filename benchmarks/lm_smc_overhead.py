"""How much does steering cost over plain sampling on a transformer LM? (issue 4, "speed it must reach")

Times, in one process and interleaved (so machine load hits every variant alike):

* ``plain`` — ancestral sampling of N sequences of T tokens (``pplalign.ancestral.ancestral_sample``);
* ``adaptive`` / ``every_step`` — bootstrap SMC with a per-token potential φ[x_t], φ ~ N(0, 1) per vocabulary
  entry, resampling when ESS < N/2 / at every step;
* ``twisted`` — twisted SMC with a twist head (one D×V layer on the LM's final hidden state, so the forward
  pass is shared with the LM) and the locally optimal proposal, ESS-adaptive;
* ``naive_*`` (``--naive``) — the same with a gather of the whole float32 cache at every resampling.

The SMC runs use ``reorder_mode="inplace"`` with ``stay_in_place(systematic)``: surviving particles keep their
slot and only the dead particles' filled cache slots are overwritten, in place.

On a CPU shared with other jobs, wall-clock time is noisy; the process CPU time of a single-threaded XLA run
(``--threads 1``, the default on CPU) measures the work itself. Both are reported; the three headline ratios
use CPU time on the CPU backend and wall time on accelerators. Prints one JSON line last.

    python -m benchmarks.lm_smc_overhead            # d_model 256, 4 layers, N=256, T=64
    python -m benchmarks.lm_smc_overhead --quick    # a small configuration
    python -m benchmarks.lm_smc_overhead --random-config gpt2-small --num-particles 32 --steps 32
    python -m benchmarks.lm_smc_overhead --hf PATH/TO/HF_MODEL_DIR --dtype bfloat16

``--hf`` loads a Hugging Face model directory (``models.hf.load_pretrained``); ``--random-config`` builds a real
architecture with random weights and no download: ``gpt2-small`` (124M) or ``llama-1b`` (Llama-3.2-1B's shape:
GQA 32/8 heads, llama3 RoPE scaling, tied 128256-token embedding).
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks._threads import pin_xla_cpu_threads

# Published shapes (config.json of gpt2 and meta-llama/Llama-3.2-1B), for speed without a download.
RANDOM_CONFIGS = {
    "gpt2-small": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                     max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                   "rope_theta": 500000.0}),
}


def build_model(args, nnx):
    """(model, vocab size, ids never to draw) for the in-house transformer, a loaded or a random HF model."""
    if args.hf or args.random_config:
        from models.hf import Decoder, config_from_hf, load_pretrained
        from models.hf.pretrained import DTYPES

        if args.hf:
            model, tok = load_pretrained(args.hf, dtype=args.dtype)  # its end/pad ids are recorded on the model
            return model, model.cfg.vocab_size, sorted(set(tok.eos_ids))
        cfg = config_from_hf(RANDOM_CONFIGS[args.random_config])
        model = Decoder(cfg, dtype=DTYPES[args.dtype], rngs=nnx.Rngs(0))
        return model, cfg.vocab_size, [2]
    from models.lm.transformer import LMConfig, Transformer

    cfg = LMConfig(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model, 8 + args.steps)
    return Transformer(cfg, rngs=nnx.Rngs(0)), args.vocab, [2]


def parse(argv=None):
    ap = argparse.ArgumentParser(description="SMC overhead over plain sampling on a transformer LM")
    ap.add_argument("--num-particles", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=261)
    ap.add_argument("--bucket", type=int, default=8)
    # bfloat16 halves the bytes each resampling moves (logits within 5e-2 of float32: tests/test_lm_program.py)
    ap.add_argument("--cache-dtype", default="bfloat16", help="KV-cache dtype (float32 for the full-precision cache)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="XLA CPU threads (0: XLA's default)")
    ap.add_argument("--naive", action="store_true", help="also time the naive whole-cache gather")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hf", metavar="PATH", help="a Hugging Face model directory (or cached hub name) to steer")
    ap.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), help="a real architecture, random weights")
    ap.add_argument("--dtype", default="float32", help="weights' dtype for --hf / --random-config")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_particles, args.steps, args.d_model, args.layers, args.repeats = 32, 16, 64, 2, 2
    return args


def main(argv=None):
    args = parse(argv)
    pin_xla_cpu_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm.auto import tqdm

    import pplalign
    from models.lm.potentials import TokenScores
    from models.lm.program import LMProgram, stay_in_place
    from models.lm.twist_head import HeadTwist, TwistHead
    from pplalign.ancestral import ancestral_sample

    n = args.num_particles
    prompt_len = 8
    model, vocab, ends = build_model(args, nnx)
    d_model = model.cfg.d_model
    prompt = [1] + [int(i) for i in np.random.default_rng(0).integers(3, vocab, prompt_len - 1)]

    def build(cache_dtype, mode):  # the end tokens banned: every particle runs all T steps
        return LMProgram.from_prompt(model, prompt, args.steps, cache_dtype=jnp.dtype(cache_dtype),
                                     bucket=args.bucket, reorder_mode=mode, banned=ends)

    program = build(args.cache_dtype, "inplace")
    scores = TokenScores(jax.random.normal(jax.random.key(1), (vocab,)))
    target = pplalign.tilt(program, scores, 1.0)
    head = TwistHead(d_model, vocab, rngs=nnx.Rngs(2))
    head.out.kernel[...] = 0.05 * jax.random.normal(jax.random.key(3), head.out.kernel[...].shape)
    twist = HeadTwist(head)
    resampler = stay_in_place(pplalign.systematic)

    runs = {
        "plain": lambda k: ancestral_sample(k, program, n),
        "adaptive": lambda k: pplalign.smc(k, target, n, twist=scores, proposal=program.transition,
                                           ess_threshold=0.5, resampling=resampler),
        "every_step": lambda k: pplalign.smc(k, target, n, twist=scores, proposal=program.transition,
                                             ess_threshold=1.0, resampling=resampler),
        "twisted": lambda k: pplalign.smc(k, target, n, twist=twist, ess_threshold=0.5, resampling=resampler),
    }
    if args.naive:
        naive = build("float32", "full")
        naive_target = pplalign.tilt(naive, scores, 1.0)
        runs["naive_plain"] = lambda k: ancestral_sample(k, naive, n)
        runs["naive_adaptive"] = lambda k: pplalign.smc(k, naive_target, n, twist=scores, proposal=naive.transition, ess_threshold=0.5)
        runs["naive_every_step"] = lambda k: pplalign.smc(k, naive_target, n, twist=scores, proposal=naive.transition, ess_threshold=1.0)

    resamples = {}
    for name, fn in tqdm(runs.items(), desc="compile"):  # compile, and count resampling events
        out = jax.block_until_ready(fn(jax.random.key(0)))
        if hasattr(out, "ancestors"):
            resamples[name] = int(np.any(np.asarray(out.ancestors) != np.arange(n)[None], axis=1).sum())
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for r in tqdm(range(args.repeats), desc="timing"):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(jax.random.key(100 + r)))
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    wall_med = {k: float(np.median(v)) for k, v in wall.items()}
    cpu_med = {k: float(np.median(v)) for k, v in cpu.items()}
    on_cpu = jax.default_backend() == "cpu"
    head_t = cpu_med if on_cpu else wall_med
    ratio = lambda t, a, b: t[a] / t[b]
    result = {
        "every_step_ratio": ratio(head_t, "every_step", "plain"),
        "adaptive_ratio": ratio(head_t, "adaptive", "plain"),
        "twisted_ratio": ratio(head_t, "twisted", "plain"),
        "measure": "process CPU time, single-threaded XLA" if on_cpu else "wall time",
        "wall_ratios": {k: ratio(wall_med, k, "plain") for k in ("every_step", "adaptive", "twisted")},
        "cpu_seconds": cpu_med,
        "wall_seconds": wall_med,
        "resampling_steps": resamples,
        "config": dict(num_particles=n, steps=args.steps, d_model=d_model, layers=model.cfg.num_layers, vocab=vocab,
                       model=args.hf or args.random_config or "in-house", dtype=args.dtype,
                       cache_dtype=args.cache_dtype, bucket=args.bucket, repeats=args.repeats, threads=args.threads,
                       backend=jax.default_backend()),
        "tokens_per_second": {k: n * args.steps / wall_med[k] for k in ("plain", "adaptive", "every_step", "twisted")},
    }
    if args.naive:
        result["naive_ratios"] = {k: ratio(head_t, f"naive_{k}", "naive_plain") for k in ("adaptive", "every_step")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
