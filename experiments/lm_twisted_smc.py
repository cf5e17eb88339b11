"""Twisted SMC with learned twist heads on the story transformer: log Z bounds, KL, ESS (Zhao et al. 2024, §7).

Tasks (``models/lm/train_twist.py``): ``toxic`` — σ(x) ∝ p₀(x | prompt)·p(toxic | x), and ``infill`` —
σ(x) ∝ p₀(x | prompt)·p₀("dragon" | prompt, x); p₀ the shipped story LM, β = 1, r ≤ 0 in both. Twists:
``bootstrap`` (ψ ≡ 1, a zero head: proposal p₀ and final weight φ = e^{r/β}, the law of ``smc(twist=None)``)
and every shipped head ``models/checkpoints/lm_story_twist_<task>_<loss>`` (CTL, SIXO, DPG), used with the
locally optimal proposal q_t(k) ∝ p₀(k | x_{<t})·ψ_t(x_{<t}, k).

For each task, twist and particle count N, over 5 seeds (mean ± sd):

* SMC lower bound E[log Ẑ_SMC] ≤ log Z and conditional-SMC upper bound E[log Ẑ_CSMC] ≥ log Z, the CSMC pinned
  to an *exact* σ sample per seed. Exact samples come from rejection sampling (x ~ p₀ kept with probability
  e^{r(x)/β} ≤ 1); the same draws give a reference log Z (the log of the mean of e^{r/β}, unbiased for Z, with
  its standard error) that the bounds must sandwich.
* ESS/N of the SMC, averaged over steps and seeds.
* KL of the twisted proposal q^ψ (the law of one particle): with w = p₀φ/q^ψ, E_{q}[log w] = log Z − KL(q‖σ)
  and E_σ[log w] = log Z + KL(σ‖q), so from one-particle SMC (x ~ q) and one-particle CSMC (x ~ σ) runs,
  KL(q‖σ) ≈ log Z_ref − mean log w_q and KL(σ‖q) ≈ mean log w_σ − log Z_ref (Monte Carlo, ``kl_samples`` each).
  Their sum, the symmetrised KL, needs no log Z: it is the N = 1 gap E_σ[log w] − E_q[log w] between the two
  bounds, and for any N the bound gap upper − lower bounds how far each bound can be from log Z.

Run ``python -m experiments.lm_twisted_smc [--quick] [--out DIR]``; writes results.json, table.txt and
bounds.png (bounds against N, one panel per task) under ``--out`` and prints one JSON object as its last line:
{task: {"log_Z_ref", "num_particles", method: {"lower", "upper", "gap", "ess", "kl_q_sigma", "kl_sigma_q"}}}.
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
from pplalign import evaluation

QUICK = dict(tasks=("infill",), particle_counts=(1, 4), seeds=5, kl_samples=5, min_draws={"toxic": 512, "infill": 1024})
FULL = dict(tasks=("toxic", "infill"), particle_counts=(1, 4, 16, 64), seeds=5, kl_samples=64,
            min_draws={"toxic": 16384, "infill": 65536})
LOSSES = ("ctl", "sixo", "dpg", "soft_rl", "fudge")


def shipped_heads(task: str, model) -> dict:
    """{loss: HeadTwist} of the shipped heads for ``task`` (checked against the LM's shapes)."""
    from models.lm.checkpoint import CHECKPOINT_ROOT
    from models.lm.train_twist import head_name
    from models.lm.twist_head import HeadTwist, load_head

    out = {}
    for loss in LOSSES:
        path = CHECKPOINT_ROOT / head_name(task, loss)
        if (path / "head.json").exists():
            head, _ = load_head(path, d_model=model.cfg.d_model, vocab_size=model.cfg.vocab_size)
            out[loss] = HeadTwist(head)
    return out


def zero_twist(model):
    """ψ ≡ 1 as a head (bootstrap SMC), so every twist shares one compiled sampler per N."""
    from flax import nnx

    from models.lm.twist_head import HeadTwist, TwistHead

    return HeadTwist(TwistHead(model.cfg.d_model, model.cfg.vocab_size, rngs=nnx.Rngs(0)))


def evaluate(key, target, twist, refs, log_z_ref, cfg) -> dict:
    by_n = {}
    for n in cfg["particle_counts"]:
        b = evaluation.log_z_bounds(jax.random.fold_in(key, n), target, twist, n, refs, num_seeds=cfg["seeds"])
        b["lower_sd"] = float(np.std(b["lower_runs"], ddof=1))
        b["upper_sd"] = float(np.std(b["upper_runs"], ddof=1))
        b["gap"] = b["upper"] - b["lower"]
        by_n[str(n)] = b
    kl = evaluation.kl_estimates(jax.random.fold_in(key, 10_000), target, twist, refs[: cfg["kl_samples"]], log_z_ref,
                                 num_q=cfg["kl_samples"])
    return dict(by_num_particles=by_n, **kl, kl_sym=kl["kl_q_sigma"] + kl["kl_sigma_q"])


def compile_in_parallel(calls) -> list:
    """Run the zero-argument ``calls`` in threads and return their results. Each first call of a sampler
    configuration is dominated by its XLA compile, which releases the GIL, so on a multi-core CPU the
    compiles overlap; later calls with the same configuration reuse the executables."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def run_task(task: str, cfg: dict, lm, tok, clf, key) -> dict:
    from models.lm.train_twist import build_task, rejection_sample

    program, reward, beta = build_task(task, lm, tok, clf)
    target = pplalign.tilt(program, reward, beta)
    need = max(cfg["seeds"], cfg["kl_samples"])
    methods = {"bootstrap": zero_twist(lm), **shipped_heads(task, lm)}
    # compile every sampler at once (the same static configuration as evaluation.log_z_bounds uses)
    ref0 = jnp.full((program.num_steps,), 3, jnp.int32)  # any word: only its shape matters for the compile
    warm = [lambda n=n: pplalign.smc(key, target, n, twist=methods["bootstrap"]).log_Z for n in cfg["particle_counts"]]
    warm += [lambda n=n: pplalign.csmc(key, target, n, ref0, twist=methods["bootstrap"]).log_Z for n in cfg["particle_counts"]]
    warm.append(lambda: rejection_sample(jax.random.fold_in(key, 1), program, reward, beta, need,
                                         min_draws=cfg["min_draws"][task]))
    refs, info = compile_in_parallel(warm)[-1]
    results = {m: evaluate(jax.random.fold_in(key, 2), target, tw, refs, info["log_Z"], cfg) for m, tw in methods.items()}
    return dict(log_Z_ref=info["log_Z"], log_Z_ref_se=info["log_Z_se"], rejection=info, num_steps=program.num_steps,
                beta=beta, methods=results)


def table(task: str, res: dict, counts) -> str:
    title = (f"task {task}: T = {res['num_steps']}, β = {res['beta']:g}, reference log Z = {res['log_Z_ref']:.3f} "
             f"± {res['log_Z_ref_se']:.3f} (rejection, {res['rejection']['draws']} draws)")
    return title + "\n" + evaluation.bounds_table(res["methods"], particle_counts=list(counts))


def plot(results: dict, counts, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (task, res) in zip(axes[0], results.items()):
        for i, (m, r) in enumerate(res["methods"].items()):
            bs = [r["by_num_particles"][str(n)] for n in counts]
            ax.errorbar(counts, [b["lower"] for b in bs], yerr=[b["lower_sd"] for b in bs], color=f"C{i}", marker="o",
                        label=f"{m} SMC lower")
            ax.errorbar(counts, [b["upper"] for b in bs], yerr=[b["upper_sd"] for b in bs], color=f"C{i}", marker="s",
                        ls="--", label=f"{m} CSMC upper")
        z, se = res["log_Z_ref"], res["log_Z_ref_se"]
        ax.axhspan(z - 2 * se, z + 2 * se, color="k", alpha=0.15)
        ax.axhline(z, color="k", lw=1, label="log Z (rejection MC)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="particles N", ylabel="log Z bound (mean ± sd, 5 seeds)", title=f"{task} (T = {res['num_steps']})")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: N = 1, 4; few rejection draws")
    ap.add_argument("--out", default="results/lm_twisted_smc")
    ap.add_argument("--tasks", default=None, help="comma-separated subset of toxic,infill")
    ap.add_argument("--particle-counts", default=None, help="override, e.g. 1,4,16")
    args = ap.parse_args(argv)
    if args.quick and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # CI size: compiling the samplers is most of the run, and the runs are tiny, so compile cheaply
        # (set before jax's CPU backend starts; no effect if this process already ran a computation)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    cfg = dict(QUICK if args.quick else FULL)
    if args.tasks:
        cfg["tasks"] = tuple(args.tasks.split(","))
    if args.particle_counts:
        cfg["particle_counts"] = tuple(int(n) for n in args.particle_counts.split(","))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    from models.lm.checkpoint import load_model

    lm, tok = load_model("lm_stories")
    clf, _ = load_model("lm_story_classifier")
    key = jax.random.key(0)
    results = {task: run_task(task, cfg, lm, tok, clf, jax.random.fold_in(key, i)) for i, task in enumerate(cfg["tasks"])}
    counts = list(cfg["particle_counts"])
    text = "\n\n".join(table(t, r, counts) for t, r in results.items())
    print(text)
    with open(os.path.join(args.out, "table.txt"), "w") as fh:
        fh.write(text + "\n")
    plot(results, counts, os.path.join(args.out, "bounds.png"))
    n = str(counts[-1])
    summary = {}
    for task, r in results.items():
        summary[task] = {"log_Z_ref": r["log_Z_ref"], "log_Z_ref_se": r["log_Z_ref_se"], "num_particles": int(n)}
        for m, mr in r["methods"].items():
            b = mr["by_num_particles"][n]
            summary[task][m] = {"lower": b["lower"], "upper": b["upper"], "gap": b["gap"], "lower_sd": b["lower_sd"],
                                "upper_sd": b["upper_sd"], "ess": b["ess"], "kl_q_sigma": mr["kl_q_sigma"],
                                "kl_sigma_q": mr["kl_sigma_q"]}
    full = dict(results=results, config=dict(cfg, quick=bool(args.quick)), seconds=round(time.time() - t0, 1))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(full, fh, indent=1)
    summary["seconds"] = full["seconds"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
