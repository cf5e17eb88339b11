"""Twisted SMC with learned twists on the exact Markov testbed: log Z bounds and KL (Zhao et al. 2024, §7).

For each twist-learning method (CTL, SIXO, DPG, soft RL) an MLP twist is trained on the exact Markov
"language model" of models/markov_lm.py with a sparse, non-decomposable reward (r = log sigmoid(a·(#token 0 − c)),
so r ≤ 0 and φ = e^r is the probability a "classifier" says yes). Then, against the exact log Z:

- SMC lower bound and CSMC upper bound (pinned to exact σ samples) over 5 seeds, for several particle counts;
- KL(σ‖q) and KL(q‖σ) of the twisted proposal, exactly by enumeration, and the one-particle Monte Carlo
  estimates of pplalign.metrics;
- ESS.

``bootstrap`` is ψ ≡ 1 (a zero MLP twist): its locally optimal proposal is p₀ and its final weight φ, the same
law as ``pplalign.smc(twist=None)`` (``--bootstrap-none`` runs that path instead, at one more compile per N).

Run: ``python -m experiments.twisted_smc_bounds [--quick] [--out DIR]``. Writes results.json, table.txt,
bounds.png (bounds against particle count) and checkpoints/ (training resumes from them); prints one JSON
line last: {method: {lower, upper, kl_sigma_q, kl_q_sigma, ...}, "log_Z": exact, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import pplalign
from models import markov_twists
from models.markov_lm import random_markov_lm
from pplalign import evaluation, twists

METHODS = ("ctl", "sixo", "dpg", "soft_rl")

QUICK = dict(train_steps=100, batch=64, particle_counts=(1, 4, 16), headline=4, seeds=5, kl_samples=64)
FULL = dict(train_steps=1000, batch=128, particle_counts=(1, 2, 4, 8, 16, 32, 64), headline=4, seeds=5, kl_samples=512)


def make_testbed(vocab: int = 4, steps: int = 6, sharpness: float = 4.0, threshold: float = 5.5, beta: float = 1.0):
    """The exact testbed: random Markov LM, reward log sigmoid(sharpness·(#zeros − threshold)), σ ∝ p₀ e^{r/β}."""
    lm = random_markov_lm(jax.random.PRNGKey(0), vocab, steps)
    return lm, markov_twists.count_reward(lm, 0, sharpness, threshold), beta


def train_twist(method, lm, reward, beta, cfg, out_dir, progress=True):
    target = pplalign.tilt(lm, reward, beta)
    sample_sigma = lambda k, n: lm.sample_posterior(k, n, reward, beta)
    loss_fn = twists.make_loss_fn(method, target, sample_sigma, batch_size=cfg["batch"], num_negatives=cfg["batch"])
    init = markov_twists.mlp_twist(jax.random.PRNGKey(1), lm)
    ckpt = os.path.join(out_dir, "checkpoints", f"{method}.npz")
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    twist, history = twists.fit(
        loss_fn, init, jax.random.PRNGKey(2), cfg["train_steps"], checkpoint=ckpt, checkpoint_every=50,
        progress=progress, description=method,
    )
    return twist, history


def evaluate_twist(twist, lm, reward, beta, cfg, log_Z, sigma_refs, log_sigma, key):
    target = pplalign.tilt(lm, reward, beta)
    by_n = {}
    for n in cfg["particle_counts"]:
        by_n[str(n)] = evaluation.log_z_bounds(
            jax.random.fold_in(key, n), target, twist, n, sigma_refs, num_seeds=cfg["seeds"]
        )
    exact = evaluation.exact_kl(target, twist, lm.all_sequences(), log_sigma)
    mc = evaluation.kl_estimates(
        jax.random.fold_in(key, 10_000), target, twist, sigma_refs[: cfg["kl_samples"]], log_Z
    )
    head = by_n[str(cfg["headline"])]
    return dict(
        lower=head["lower"],
        upper=head["upper"],
        lower_se=head["lower_se"],
        upper_se=head["upper_se"],
        num_particles=cfg["headline"],
        ess=head["ess"],
        kl_sigma_q=exact["kl_sigma_q"],
        kl_q_sigma=exact["kl_q_sigma"],
        kl_sigma_q_mc=mc["kl_sigma_q"],
        kl_q_sigma_mc=mc["kl_q_sigma"],
        by_num_particles=by_n,
    )


def plot(results, log_Z, counts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (m, r) in enumerate(results.items()):
        color = f"C{i}"
        lo = [r["by_num_particles"][str(n)]["lower"] for n in counts]
        up = [r["by_num_particles"][str(n)]["upper"] for n in counts]
        lo_se = [r["by_num_particles"][str(n)]["lower_se"] for n in counts]
        up_se = [r["by_num_particles"][str(n)]["upper_se"] for n in counts]
        ax.errorbar(counts, lo, yerr=lo_se, color=color, marker="o", label=f"{m} (SMC lower)")
        ax.errorbar(counts, up, yerr=up_se, color=color, marker="s", ls="--", label=f"{m} (CSMC upper)")
        gap_ax.plot(counts, np.maximum(np.subtract(up, lo), 1e-3), color=color, marker="o", label=m)
    ax.axhline(log_Z, color="k", lw=1, label="exact log Z")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of particles N")
    ax.set_ylabel("log Z bound (mean ± s.e. over seeds)")
    ax.set_title("Twisted SMC bounds on the exact Markov testbed")
    ax.legend(fontsize=7, ncol=2)
    gap_ax.set_xscale("log", base=2)
    gap_ax.set_yscale("log")
    gap_ax.set_xlabel("number of particles N")
    gap_ax.set_ylabel("upper − lower (nats; floored at 1e-3)")
    gap_ax.set_title("Gap between the bounds")
    gap_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI")
    parser.add_argument("--out", default="results/twisted_smc_bounds")
    parser.add_argument("--bootstrap-none", action="store_true", help="bootstrap via pplalign.smc(twist=None)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--train-steps", type=int, default=None, help="override the mode's training steps")
    parser.add_argument("--particle-counts", default=None, help="override, e.g. 1,4,16,64")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.train_steps is not None:
        cfg["train_steps"] = args.train_steps
    if args.particle_counts is not None:
        cfg["particle_counts"] = tuple(int(n) for n in args.particle_counts.split(","))
        if cfg["headline"] not in cfg["particle_counts"]:
            cfg["headline"] = cfg["particle_counts"][0]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    lm, reward, beta = make_testbed()
    log_Z = float(lm.log_Z(reward, beta))
    log_sigma = jax.nn.log_softmax(lm.log_target(reward, beta))
    n_refs = max(cfg["seeds"], cfg["kl_samples"])
    sigma_refs = lm.sample_posterior(jax.random.PRNGKey(3), n_refs, reward, beta)
    eval_key = jax.random.PRNGKey(4)

    twists_by_method = {}
    histories = {}
    for m in METHODS:
        twists_by_method[m], histories[m] = train_twist(m, lm, reward, beta, cfg, args.out, not args.no_progress)

    zero = markov_twists.mlp_twist(jax.random.PRNGKey(1), lm)
    zero = jax.tree_util.tree_map(jnp.zeros_like, zero)  # ψ ≡ 1: bootstrap
    results = {"bootstrap": evaluate_twist(None if args.bootstrap_none else zero, lm, reward, beta, cfg, log_Z, sigma_refs, log_sigma, eval_key)}
    for m in METHODS:
        r = evaluate_twist(twists_by_method[m], lm, reward, beta, cfg, log_Z, sigma_refs, log_sigma, eval_key)
        h = histories[m]
        k = max(1, min(10, len(h) // 5))
        r["loss_first"] = float(np.mean(h[:k]))
        r["loss_last"] = float(np.mean(h[-k:]))
        results[m] = r

    table = evaluation.bounds_table(results, log_Z, cfg["particle_counts"])
    print(table)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    plot(results, log_Z, list(cfg["particle_counts"]), os.path.join(args.out, "bounds.png"))
    summary = dict(results)
    summary["log_Z"] = log_Z
    summary["config"] = dict(cfg, quick=bool(args.quick), vocab=lm.vocab_size, steps=lm.num_steps, beta=beta)
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
