"""Issue 6, experiment (c): DTS as an anytime sampler, interrupted and resumed from a checkpoint midway.

One consistent DTS tree (growth blind to the values, see :mod:`pplalign.search.dts`) on the exact two-mode
Gaussian-mixture testbed of experiment (a) is grown in stages of doubling iteration counts. ``--variant
twisted_gp`` (the default) is variant "twisted" guided by the Gaussian-posterior twist, level-calibrated by a
128-particle pilot with a fixed key (the pilot's NFE are counted; the checkpoint carries the twist's digest, so a
resume with another twist is refused); ``--variant consistent`` is uniform selection. After each
stage the tree is read (``n_eval`` samples, no model evaluations) and scored against the exact target
(energy distance, log Ẑ − log Z, E‖x − c‖² − exact), and the tree is checkpointed (``.npz``: arrays, key and
configuration fingerprint). Midway the in-memory tree is dropped and the run continues from the checkpoint
file, as an interrupted job would; a second, uninterrupted run to the same total checks that the resumed
tree is bit-identical. Rerunning the script with the same ``--out`` resumes from the last stage saved.

Prints one JSON line last: the final energy distance and floor, log Ẑ error, and ``resume_identical``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from experiments.dts_gmm import build, evaluate, gaussian_posterior_twist
from pplalign import metrics, search
from pplalign.search import DTSConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/dts_anytime")
    ap.add_argument("--fresh", action="store_true", help="ignore a checkpoint left in --out")
    ap.add_argument("--variant", choices=("twisted_gp", "consistent"), default="twisted_gp")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if args.quick:
        num_steps, n_eval, stages = 10, 300, [40, 80, 160, 320]
    else:
        num_steps, n_eval, stages = 20, 1000, [250, 500, 1000, 2000, 4000, 8000, 16000, 32000]
    resume_after = len(stages) // 2  # stage index after which the run is "interrupted"
    model, reward, beta, target, exact = build(num_steps)
    center = np.asarray(reward.center)
    key = jax.random.PRNGKey(7)
    if args.variant == "twisted_gp":
        config, variant = DTSConfig("twisted"), "twisted"
        guess, _ = gaussian_posterior_twist(model, reward, beta)
        twist = search.calibrate_twist(jax.random.PRNGKey(5), target, guess, 32 if args.quick else 128)
        pilot_nfe = int(twist.pilot_nfe)
        # a twisted iteration adds ~16 nodes here (its rollouts branch and are cut); room for 1.5× the plain
        # worst case plus one iteration's full node budget
        capacity = int(search.nodes_needed(num_steps, stages[-1]) * 1.5) + 64 * (num_steps + 1)
    else:
        config, variant, twist, pilot_nfe = DTSConfig("consistent"), "consistent", None, 0
        capacity = search.nodes_needed(num_steps, stages[-1])
    x_exact = np.asarray(model.sample_tilted(jax.random.PRNGKey(100), n_eval, reward.center, reward.gamma, beta))
    x_exact2 = np.asarray(model.sample_tilted(jax.random.PRNGKey(101), n_eval, reward.center, reward.gamma, beta))
    floor = float(metrics.energy_distance(x_exact, x_exact2))
    exact_sq = float(np.sum(np.exp(exact.log_weights) * (np.sum((np.asarray(exact.means) - center) ** 2, -1) + 2 * np.asarray(exact.variances))))

    ckpt = os.path.join(args.out, "tree.npz")
    partial = os.path.join(args.out, "stages.json")
    rows, tree, done = [], None, 0
    if not args.fresh and os.path.exists(ckpt) and os.path.exists(partial):
        tree, key = search.load_tree(ckpt, config, target, twist)  # refuses a checkpoint of another configuration
        rows = json.load(open(partial))["rows"]
        done = int(tree.iteration)
        print(f"resuming from {ckpt} at iteration {done}", flush=True)

    def score(tree):
        particles = search.particles_from_tree(jax.random.fold_in(key, int(tree.iteration)), tree, target, n_eval)
        row = evaluate(particles.samples, x_exact, exact, center)
        row.update(iterations=int(tree.iteration), nfe=int(tree.nfe) + pilot_nfe, log_Z_error=float(particles.log_Z - exact.log_Z),
                   sq_bias=row["sq_dist"] - exact_sq, nodes=int(tree.num_nodes))
        return row

    for i, total in enumerate(stages):
        if total <= done:
            continue
        if tree is None:
            _, tree = search.dts(key, target, total, capacity=capacity, variant=variant, twist=twist, num_samples=1, chunk_size=2000, progress=not args.quick)
        else:
            _, tree = search.dts(key, target, total - int(tree.iteration), tree=tree, variant=variant, twist=twist, num_samples=1, chunk_size=2000, progress=not args.quick)
        rows.append(score(tree))
        search.save_tree(ckpt, tree, key, config, target, twist)
        json.dump({"rows": rows}, open(partial, "w"))
        print(f"[{time.time() - t0:6.1f}s] stage {i}: {rows[-1]}", flush=True)
        if i == resume_after - 1:
            # the interruption: forget the tree, continue from the file
            del tree
            tree, key = search.load_tree(ckpt, config, target, twist)
            rows[-1]["resumed_here"] = True

    # an uninterrupted run to the same total must give the same tree, array for array
    _, straight = search.dts(key, target, stages[-1], capacity=capacity, variant=variant, twist=twist, num_samples=1, chunk_size=2000)
    identical = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(tree))
    )
    summary = {
        "final_energy": rows[-1]["energy"],
        "floor": floor,
        "final_floor_ratio": rows[-1]["energy"] / floor,
        "final_log_Z_error": rows[-1]["log_Z_error"],
        "final_sq_bias": rows[-1]["sq_bias"],
        "final_nfe": rows[-1]["nfe"],
        "resume_identical": bool(identical),
        "resumed_after_iterations": stages[resume_after - 1],
        "seconds": round(time.time() - t0, 1),
        "quick": bool(args.quick),
        "variant": args.variant,
        "pilot_nfe": pilot_nfe,
    }
    json.dump({"summary": summary, "rows": rows, "num_steps": num_steps, "n_eval": n_eval}, open(os.path.join(args.out, "dts_anytime.json"), "w"), indent=1)
    plot(rows, floor, args.out, args.variant)
    print(json.dumps(summary))


def plot(rows, floor, out, variant_label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfe = [r["nfe"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(nfe, [r["energy"] for r in rows], "C4D-")
    axes[0].axhline(floor, color="k", ls="--", lw=1, label="exact-vs-exact floor")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("energy distance to σ")
    axes[1].plot(nfe, [r["log_Z_error"] for r in rows], "C4D-")
    axes[1].axhline(0, color="k", lw=1)
    axes[1].set_ylabel("log Ẑ_root − log Z")
    axes[2].plot(nfe, [r["sq_bias"] for r in rows], "C4D-")
    axes[2].axhline(0, color="k", lw=1)
    axes[2].set_ylabel("E‖x − c‖² − exact")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        for r in rows:
            if r.get("resumed_here"):
                ax.axvline(r["nfe"], color="C3", ls=":", lw=1, label="resumed from checkpoint")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"DTS ({variant_label}) as an anytime sampler (one tree, read after each stage)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dts_anytime.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
