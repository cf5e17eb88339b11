"""The main job: importance sampling, SMC and twisted SMC on the exact Markov-LM testbed.

For each method and particle count it reports NFE, log Ẑ against the exact log Z (by enumeration), the TV
distance of the weighted particles to the exact tilted law, and the final ESS; averaged over seeds.
Writes ``results.json`` and ``main_job.png`` into ``--out`` and prints one JSON line last.

    python -m experiments.main_job            # embedded default (V=4, T=6, 4096 sequences)
    python -m experiments.main_job --quick    # smaller, for CI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

import pplalign
from models.markov_lm import TableReward, random_markov_lm
from pplalign.metrics import empirical_pmf, tv_distance


def build_testbed(vocab_size: int, num_steps: int, beta: float, reward_scale: float, seed: int = 0):
    """A random Markov LM and a random non-decomposable reward over all sequences."""
    k_lm, k_r = jax.random.split(jax.random.PRNGKey(seed))
    lm = random_markov_lm(k_lm, vocab_size, num_steps)
    reward = TableReward(reward_scale * jax.random.normal(k_r, (vocab_size**num_steps,)), vocab_size)
    return lm, reward, pplalign.tilt(lm, reward, beta)


def methods(lm, reward, beta, twist_noise: float = 0.5):
    """The samplers compared. Without intermediate potentials bootstrap SMC has nothing to resample on
    (all the weight arrives at the last step) and equals IS, so SMC here runs with twists: the exact ψ*
    as Feynman–Kac potentials under the p₀ proposal, and an approximate twist (ψ* with N(0, noise²) errors
    in log space, a stand-in for a learned one) with the locally optimal proposal."""
    exact = lm.optimal_twist(reward, beta)
    noise = twist_noise * jax.random.normal(jax.random.PRNGKey(123), exact.table.shape)
    approx = dataclasses.replace(exact, table=exact.table + noise)
    return {
        "importance_sampling": lambda k, t, n: pplalign.importance_sampling(k, t, n),
        "smc_bootstrap": lambda k, t, n: pplalign.smc(k, t, n),
        "smc_fk_exact_potentials": lambda k, t, n: pplalign.smc(k, t, n, twist=exact, optimal_proposal=False),
        "twisted_smc_approx_twist": lambda k, t, n: pplalign.smc(k, t, n, twist=approx),
        "twisted_smc_exact_twist": lambda k, t, n: pplalign.smc(k, t, n, twist=exact),
    }


def run(args) -> dict:
    lm, reward, target = build_testbed(args.vocab, args.steps, args.beta, args.reward_scale)
    log_Z = float(lm.log_Z(reward, args.beta))
    posterior = lm.posterior(reward, args.beta)
    rows = []
    todo = [(name, fn, n) for name, fn in methods(lm, reward, args.beta).items() for n in args.particles]
    for name, fn, n in tqdm(todo, desc="main job", unit="run"):
        batched = jax.jit(jax.vmap(lambda k: fn(k, target, n)))
        start = time.perf_counter()
        res = batched(jax.random.split(jax.random.PRNGKey(1), args.seeds))
        jax.block_until_ready(res.log_Z)
        seconds = time.perf_counter() - start
        codes = jax.vmap(lm.codes)(res.samples)
        pmfs = jax.vmap(lambda c, w: empirical_pmf(c, lm.num_sequences, w))(codes, res.log_weights)
        tv = np.asarray(jax.vmap(lambda p: tv_distance(p, posterior))(pmfs))
        err = np.asarray(res.log_Z) - log_Z
        rows.append(
            dict(
                method=name,
                N=n,
                nfe=int(res.nfe[0]),
                log_Z_hat=float(np.mean(np.asarray(res.log_Z))),
                log_Z_error_mean=float(err.mean()),
                log_Z_error_sd=float(err.std()),
                tv=float(tv.mean()),
                tv_sd=float(tv.std()),
                final_ess=float(np.mean(np.asarray(res.ess[:, -1]))),
                seconds_incl_compile=seconds,
            )
        )
    return dict(
        testbed=dict(vocab_size=args.vocab, num_steps=args.steps, beta=args.beta, reward_scale=args.reward_scale),
        exact_log_Z=log_Z,
        seeds=args.seeds,
        rows=rows,
    )


def print_table(result: dict) -> None:
    print(f"exact log Z = {result['exact_log_Z']:.4f}   ({result['seeds']} seeds per row)")
    header = f"{'method':<27}{'N':>6}{'NFE':>8}{'log Ẑ':>10}{'err':>9}{'±sd':>8}{'TV':>8}{'ESS':>9}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['method']:<27}{r['N']:>6}{r['nfe']:>8}{r['log_Z_hat']:>10.4f}{r['log_Z_error_mean']:>9.4f}"
            f"{r['log_Z_error_sd']:>8.4f}{r['tv']:>8.4f}{r['final_ess']:>9.1f}"
        )


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == name]
        n = [r["N"] for r in rows]
        axes[0].errorbar(n, [r["log_Z_error_mean"] for r in rows], yerr=[r["log_Z_error_sd"] for r in rows], marker="o", label=name, capsize=3)
        axes[1].plot(n, [r["tv"] for r in rows], marker="o", label=name)
    axes[0].axhline(0.0, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="particles N", ylabel="log Ẑ − log Z", title="evidence estimate")
    axes[1].set(xscale="log", yscale="log", xlabel="particles N", ylabel="TV to exact σ", title="sample quality")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings for CI")
    parser.add_argument("--out", default="results/main_job")
    parser.add_argument("--vocab", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--reward-scale", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--particles", type=int, nargs="+", default=[64, 256, 1024, 4096])
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.particles, args.steps = 4, [64, 512], 5
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    print_table(result)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "main_job.png"))
    summary = {
        "exact_log_Z": result["exact_log_Z"],
        **{f"{r['method']}@{r['N']}": {"log_Z_error": round(r["log_Z_error_mean"], 4), "tv": round(r["tv"], 4)} for r in result["rows"]},
        "out": args.out,
    }
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
