"""Issue 6 (b): per-class digit generation by classifier reward, quality against compute.

Base p₀: the shipped unconditional 8×8-digits DDPM (models/checkpoints/digits_mlp.npz, strided DDIM with η = 1).
Reward r(x) = log p(c ∈ C | x) from the shipped classifier, β = 1, so σ ∝ p₀(x)·p(C | x), which is p(x | C)·p(C)
when the models are right: the target is "digits from C" (C = the even digits by default). For each method and
budget n (particles per produced sample) we draw M samples — each from an independent run, one particle picked by
its weight — and measure, against the real digits of C:

* Fréchet distance in the classifier's feature space (its last hidden layer; ``pplalign.metrics.frechet_distance``);
* class-frequency TV: the law of the classifier's label on the samples against the class frequencies of the real
  digits in C (outside C counts as error mass);
* the mean reward and the fraction of samples classified in C.

Methods: ``best_of_n`` (``pplalign.best_of_n``), ``fk_smc`` (Feynman–Kac steering, difference potential on
r(x̂_0), ``pplalign.potentials.fk_steering``), ``tds`` (twisted diffusion sampler, ``pplalign.guidance.tds``),
``smc_gp`` (``pplalign.smc`` with the Gaussian-posterior twist log E_{N(x̂_0, v_s I)}[p(C | x)],
``pplalign.potentials.GaussianPosteriorTwist``, 16 antithetic draws, v_s from the data's pixel variance),
``dts`` (DTS as published, n iterations, one sample drawn from the tree), ``dts_twisted_gp`` (DTS variant
"twisted" — unbiased values, consistent samples — guided by that twist, level-calibrated once by a 64-particle
pilot, ``pplalign.search.calibrate_twist``, whose NFE are shared by the M samples and counted), and
``dts_star`` (DTS*, Jain et al. 2025: a UCT tree search of n iterations per produced sample, whose output is
the greedy leaf, ``pplalign.search``; a maximiser, so it is compared with best-of-N on reward, not on σ).
NFE is per produced sample, as each sampler counts it (TDS: 2 per particle-step; DTS/DTS*: the tree's
transitions, at most n·K, more for the twisted variant, whose rollouts branch).

Run: ``python -m experiments.diffusion_digits [--quick] [--out DIR]``; writes results.json and quality_vs_nfe.png,
prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import pplalign
from models.diffusion.data import load_digits
from models.diffusion.pretrained import classifier_reward, load_classifier, program
from pplalign import search
from pplalign.guidance import tds
from pplalign.potentials import GaussianPosteriorTwist, fk_steering
from pplalign.search.dts import leaf_outputs

QUICK = dict(num_steps=10, budgets=(4,), num_samples=12, classes=(0, 2, 4, 6, 8))
FULL = dict(num_steps=25, budgets=(1, 4, 16, 64), num_samples=128, classes=(0, 2, 4, 6, 8))
METHODS = ("best_of_n", "fk_smc", "tds", "smc_gp", "dts", "dts_twisted_gp", "dts_star")
TREES = {  # method: (config, uses the calibrated twist, output greedy leaf)
    "dts": (search.DTSConfig("published"), False, False),
    "dts_twisted_gp": (search.DTSConfig("twisted"), True, False),
    "dts_star": (search.DTSConfig(greedy=True), False, True),
}


def _one_sample(method: str, target, n: int, twist=None):
    """key -> (one sample, nfe) from an independent run of ``method`` with n particles (trees: n iterations)."""

    if method in TREES:
        config, twisted, greedy = TREES[method]
        # the twisted variant's rollouts branch: an iteration adds at most 64·(K + 1) nodes, so that many per
        # iteration can never fill (the trees run one after the other, so only one is in memory)
        capacity = 1 + n * 64 * (target.num_steps + 1) if twisted else search.nodes_needed(target.num_steps, n)

        def run_tree(key):
            tree = search.run_loop(key, search.init(target, capacity), target, n, config, twist if twisted else None)
            leaf = search.sample_leaves(key, tree, target.num_steps, 1, greedy)
            return leaf_outputs(target, tree, leaf)[0], tree.nfe, tree.full | tree.nonfinite

        return run_tree

    def run(key):
        k_run, k_pick = jax.random.split(key)
        if method == "best_of_n":
            p = pplalign.best_of_n(k_run, target, n)
        elif method == "fk_smc":
            p = fk_steering(k_run, target, n, potential="difference")
        elif method == "tds":
            p = tds(k_run, target, n)
        elif method == "smc_gp":
            p = pplalign.smc(k_run, target, n, twist=twist)
        else:
            raise ValueError(f"unknown method {method!r}")
        idx = jax.random.categorical(k_pick, jnp.where(jnp.isfinite(p.log_weights), p.log_weights, -1e30))
        return p.samples[idx], p.nfe, p.nonfinite_reward

    return run


def evaluate(samples, clf, ref_features, ref_freq, reward) -> dict:
    feats = clf.features(samples)
    labels = np.asarray(jnp.argmax(clf(samples), -1))
    freq = np.bincount(labels, minlength=10) / len(labels)
    return dict(
        frechet=float(pplalign.metrics.frechet_distance(feats, ref_features)),
        class_tv=float(0.5 * np.abs(freq - ref_freq).sum()),
        mean_reward=float(jnp.mean(jax.vmap(reward)(samples))),
        in_class=float(np.sum(freq[ref_freq > 0])),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/diffusion_digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset to run; the other methods' rows are kept from OUT/results.json")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    os.makedirs(args.out, exist_ok=True)
    start = time.time()

    base = program("digits", num_steps=cfg["num_steps"], label=-1)
    reward = classifier_reward(list(cfg["classes"]))
    target = pplalign.tilt(base, reward, 1.0)
    clf = load_classifier()
    x_data, y_data = load_digits()
    in_c = np.isin(y_data, cfg["classes"])
    ref = jnp.asarray(x_data[in_c])
    ref_features = clf.features(ref)
    ref_freq = np.bincount(y_data[in_c], minlength=10) / in_c.sum()

    key = jax.random.PRNGKey(args.seed)
    # the Gaussian-posterior twist, calibrated once for this target by an independent pilot (shared by every
    # tree; its NFE are spread over the samples that use it)
    data_variance = float(np.mean(np.var(x_data, axis=0)))
    guess = GaussianPosteriorTwist.create(base, reward, 1.0, data_variance=data_variance, num_draws=16)
    twist = search.calibrate_twist(jax.random.fold_in(key, 12345), target, guess, 64)
    pilot_share = float(twist.pilot_nfe) / cfg["num_samples"]
    rows = []
    # The base model itself (one particle, no reward): where every method starts (skipped by --quick, to save
    # a compile; best-of-N with n = 1 is the same law).
    if not args.quick:
        base_target = pplalign.tilt(base, lambda x: jnp.zeros(()), 1.0)
        plain = pplalign.importance_sampling(jax.random.fold_in(key, 999), base_target, cfg["num_samples"])
        rows.append(dict(method="base", n=1, nfe_per_sample=cfg["num_steps"],
                         **evaluate(plain.samples, clf, ref_features, ref_freq, reward)))
    # The real digits of C (a floor for the metrics at this sample size).
    floor_idx = np.random.default_rng(0).choice(len(ref), cfg["num_samples"], replace=False)
    rows.append(dict(method="data", n=0, nfe_per_sample=0, **evaluate(ref[floor_idx], clf, ref_features, ref_freq, reward)))

    jobs = [(m, n) for m in METHODS for n in cfg["budgets"]]
    wanted = set(METHODS) if args.methods is None else set(args.methods.split(","))
    if wanted - set(METHODS):
        raise ValueError(f"unknown methods {sorted(wanted - set(METHODS))}; choose from {METHODS}")
    old_path = os.path.join(args.out, "results.json")
    if wanted != set(METHODS) and os.path.exists(old_path):
        old = json.load(open(old_path))
        if old["config"] == {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}:
            rows.extend(r for r in old["rows"] if r["method"] in set(METHODS) - wanted)
    for i, (method, n) in enumerate(tqdm(jobs, desc="methods × budgets")):
        if method not in wanted:
            continue
        keys = jax.random.split(jax.random.fold_in(key, i), cfg["num_samples"])
        one = _one_sample(method, target, n, twist)
        # trees one after the other (lax.map): under vmap a while_loop with a batched predicate selects the
        # whole carry, every node array of every tree, on each trip
        batched = (lambda ks: jax.lax.map(one, ks)) if method in TREES else jax.vmap(one)
        samples, nfe, broken = jax.jit(batched)(keys)
        if bool(np.any(np.asarray(broken))):  # a filled tree skipped iterations, or a reward was NaN/+inf
            raise RuntimeError(f"{method} with n={n}: {int(np.sum(np.asarray(broken)))} of {len(keys)} runs filled their "
                               "capacity or saw a non-finite reward; the row would be mislabelled")
        # mean over the produced samples (a tree's NFE depends on where it widened and branched; the others' is
        # fixed), plus the calibration pilot's share for the method that uses it
        extra = pilot_share if method == "dts_twisted_gp" else 0.0
        rows.append(dict(method=method, n=n, nfe_per_sample=int(round(float(np.mean(nfe)) + extra)),
                         **evaluate(samples, clf, ref_features, ref_freq, reward)))

    results = dict(config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, rows=rows,
                   seconds=time.time() - start)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(rows, os.path.join(args.out, "quality_vs_nfe.png"))
    summary = {
        "frechet": {m: [r["frechet"] for r in rows if r["method"] == m] for m in METHODS},
        "class_tv": {m: [r["class_tv"] for r in rows if r["method"] == m] for m in METHODS},
        "nfe": {m: [r["nfe_per_sample"] for r in rows if r["method"] == m] for m in METHODS},
        "mean_reward": {m: [r["mean_reward"] for r in rows if r["method"] == m] for m in METHODS},
        "base": {k: r[k] for r in rows if r["method"] == "base" for k in ("frechet", "class_tv", "in_class")},
        "data_floor": {k: r[k] for r in rows if r["method"] == "data" for k in ("frechet", "class_tv")},
        "seconds": round(results["seconds"], 1),
        "calibration": {"pilot_nfe": int(twist.pilot_nfe), "data_variance": data_variance,
                        "offsets": [round(float(o), 3) for o in twist.offsets]},
    }
    print(json.dumps(summary))
    return summary


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [(axes[0], "frechet", "Fréchet distance (classifier features)"), (axes[1], "class_tv", "class-frequency TV"),
              (axes[2], "mean_reward", "mean reward log p(C | x)  (DTS*: greedy output)")]
    for ax, key, label in panels:
        for m in METHODS:
            pts = [(r["nfe_per_sample"], r[key]) for r in rows if r["method"] == m]
            ax.plot(*zip(*pts), marker="o", label=m)
        for ref, style in [("base", ":"), ("data", "--")]:
            val = next((r[key] for r in rows if r["method"] == ref), None)
            if val is None:
                continue
            ax.axhline(val, ls=style, color="gray", label=f"{ref} model" if ref == "base" else "real digits (floor)")
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Even digits by classifier reward (β = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
