"""MCTS-DPO on the arithmetic chains: held-out accuracy against iterations, on-policy against offline pairs
(issue 14, item 4; Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference
Learning").

Starting from the shipped weak policy ``lm_arithmetic`` (and the PRM ``lm_arithmetic_prm`` for the value
blend), :func:`models.lm.reasoning_dpo.run_loop` runs

* **on-policy** — each iteration collects step preference pairs with MCTS from the *current* policy on fresh
  training problems, then fine-tunes it with step-level DPO (reference = the collecting policy);
* **offline** — the same problems and fine-tuning, but every iteration's pairs were collected once, up
  front, from the *initial* policy.

Accuracy is measured on held-out problems that no training problem repeats, by the exact check: the greedy
solution's answer and the mean over independent samples. With several seeds the table gives mean ± s.e.
over seeds.

    python -m experiments.mcts_dpo [--quick] [--out DIR] [--seeds 0 1 2]

Writes results.json, table.md and accuracy.png to --out; prints the table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from models.lm import corpora
from models.lm.checkpoint import load_model
from models.lm.reasoning_dpo import MODES, LoopConfig, run_loop

METRICS = ("greedy_accuracy", "sample_accuracy")


def run(args) -> dict:
    lm, tok = load_model("lm_arithmetic")
    prm_model, _ = load_model("lm_arithmetic_prm")
    held_out = corpora.sample_problems(np.random.default_rng([99, 7]), args.held_out)
    cfg = LoopConfig(iterations=args.iterations, problems_per_iteration=args.problems, mcts_iterations=args.mcts_iterations,
                     num_children=args.children, prm_weight=args.prm_weight, margin=args.margin, dpo_beta=args.beta,
                     dpo_steps=args.dpo_steps, lr=args.lr, nll_weight=args.nll_weight)
    start = time.perf_counter()
    runs = {m: [] for m in MODES}
    for seed in args.seeds:
        for mode in MODES:
            out = run_loop(jax.random.key(seed), lm, prm_model, tok, held_out, cfg, mode, seed=seed,
                           eval_samples=args.eval_samples, progress=not args.quiet)
            runs[mode].append(out["history"])
    summary = {}
    for mode in MODES:
        summary[mode] = {}
        for metric in METRICS:
            a = np.asarray([[h[metric] for h in hist] for hist in runs[mode]])  # [seeds, iterations + 1]
            se = a.std(0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])
            summary[mode][metric] = dict(mean=a.mean(0).tolist(), stderr=se.tolist())
        summary[mode]["pairs"] = [float(np.mean([hist[i]["pairs"] for hist in runs[mode]])) for i in range(1, cfg.iterations + 1)]
        summary[mode]["informative_pairs"] = [float(np.mean([hist[i]["pair_quality"]["informative"] for hist in runs[mode]]))
                                              for i in range(1, cfg.iterations + 1)]
    return dict(config=dataclasses.asdict(cfg), seeds=list(args.seeds), held_out=len(held_out),
                eval_samples=args.eval_samples, summary=summary, runs=runs, seconds=time.perf_counter() - start)


def table(result: dict) -> list[str]:
    iters = len(result["summary"]["on_policy"]["greedy_accuracy"]["mean"])
    rows = ["| mode | metric | " + " | ".join(f"iter {i}" for i in range(iters)) + " |", "|---|---|" + "---|" * iters]
    for mode in MODES:
        for metric in METRICS:
            s = result["summary"][mode][metric]
            rows.append(f"| {mode} | {metric} | " + " | ".join(f"{m:.3f} ± {e:.3f}" for m, e in zip(s["mean"], s["stderr"])) + " |")
        rows.append(f"| {mode} | pairs | – | " + " | ".join(f"{p:.0f}" for p in result["summary"][mode]["pairs"]) + " |")
        rows.append(f"| {mode} | informative pairs (exact check) | – | "
                    + " | ".join(f"{p:.2f}" for p in result["summary"][mode]["informative_pairs"]) + " |")
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, METRICS):
        for mode in MODES:
            s = result["summary"][mode][metric]
            x = np.arange(len(s["mean"]))
            ax.errorbar(x, s["mean"], yerr=s["stderr"], marker="o", capsize=2, label=mode)
        ax.set_xlabel("MCTS-DPO iteration")
        ax.set_ylabel(f"held-out {metric.replace('_', ' ')}")
        ax.legend(fontsize=8)
    fig.suptitle(f"MCTS-DPO on arithmetic ({result['held_out']} held-out problems, {len(result['seeds'])} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a CI-sized run (2 iterations of 4 problems)")
    ap.add_argument("--out", default="results/mcts_dpo")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--problems", type=int, default=64, help="training problems per iteration")
    ap.add_argument("--mcts-iterations", type=int, default=8)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--prm-weight", type=float, default=0.3)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--beta", type=float, default=0.1, help="the DPO temperature")
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--nll-weight", type=float, default=0.0, help="> 0: add the chosen steps' NLL (RPO); 0: plain DPO")
    ap.add_argument("--held-out", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.problems, args.mcts_iterations, args.dpo_steps = 2, 4, 3, 3
        args.held_out, args.eval_samples, args.seeds = 4, 2, [0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows = table(result)
    (out / "table.md").write_text("\n".join(rows) + "\n")
    plot(result, out / "accuracy.png")
    print("\n".join(rows))
    print(json.dumps({"summary": result["summary"], "seeds": result["seeds"], "held_out": result["held_out"],
                      "config": result["config"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
