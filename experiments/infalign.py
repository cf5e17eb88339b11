"""InfAlign-CTRL against plain KL-RL at matched KL, exactly, on the Markov testbed (Balashankar et al. 2024;
issue 14, item 6). See :mod:`pplalign.vi.infalign` for the maths.

Testbed: ``models.markov_lm.random_markov_lm`` (V = 4 tokens, T = 5 steps: 1024 sequences) with a reward
table r ~ Normal(0, 1) over all sequences (one prompt). Everything is enumerated: p₀, the calibrated reward
C(x) = P_{p₀}[r < r(x)] + ½P[=] (here from p₀'s exact law; the KS distance of a sample-based calibration
from m p₀ draws is reported beside it), each policy's KL(π‖p₀) and the exact best-of-N win rates.

Policies. For each reward R, the KL-regularised RL optimum is σ_β ∝ p₀·exp(R/β) (the prefix-table family
contains it), and β is bisected until KL(σ_β‖p₀) meets each target, so every comparison is at matched KL:

* ``plain`` — R = r (standard RLHF on the untransformed reward);
* ``calibrated`` — R = C (the paper's calibration alone, the t → 0 limit);
* ``ctrl_N`` — R = Φ_t(C) = exp(t(C − 1)), t chosen for best-of-N by :func:`pplalign.vi.infalign.choose_t`
  on the uniform model at KL = 1 (one t per N, used at every KL target).

Win rates of BoN_N(π), N = 1, 4, 16, against BoN_N(p₀) (``vs_base_bon``, the paper's inference-time win
rate) and against one p₀ sample (``vs_base``). Then the existing KL-regularised VI (``vi.fit`` on
:func:`pplalign.vi.infalign.ctrl_objective` / ``vi.kl_regularised_rl``, exact ``enum`` gradients, prefix
table started at p₀) is fitted at the KL = 1 β of ``plain`` and ``ctrl_4``, and its exact KL(q‖σ) and win
rates are reported next to the enumerated optimum's.

    python -m experiments.infalign [--quick] [--out DIR]

Writes results.json, table.md and win_rates.png; prints the table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pplalign
from models.markov_lm import TableReward, random_markov_lm
from models.markov_vi import prefix_table_family
from pplalign import vi
from pplalign.vi import infalign

NS = (1, 4, 16)


def tilt_law(log_p0: np.ndarray, reward: np.ndarray, beta: float) -> np.ndarray:
    lw = log_p0 + reward / beta
    w = np.exp(lw - lw.max())
    return w / w.sum()


def kl(p: np.ndarray, q_log: np.ndarray) -> float:
    return float(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - q_log), 0.0)))


def beta_at_kl(log_p0, reward, target, iters: int = 80) -> float:
    """β with KL(σ_β‖p₀) = target (KL falls as β grows), by bisection on log β."""
    spread = float(reward.max() - reward.min())
    lo, hi = np.log(spread) - 25.0, np.log(spread) + 15.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if kl(tilt_law(log_p0, reward, np.exp(mid)), log_p0) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def ks_uniform(u: np.ndarray) -> float:
    u = np.sort(np.asarray(u))
    n = len(u)
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


def run(args) -> dict:
    start = time.perf_counter()
    lm = random_markov_lm(jax.random.key(args.seed), args.vocab, args.steps)
    seqs = lm.all_sequences()
    log_p0 = np.asarray(lm.log_prob(seqs), np.float64)
    p0 = np.exp(log_p0) / np.exp(log_p0).sum()
    rng = np.random.default_rng([args.seed, 1])
    r = rng.standard_normal(lm.num_sequences)
    cal = np.asarray(infalign.calibrate(r, r, p0), np.float64)  # exact C under p₀
    draws = rng.choice(len(p0), size=args.calib_samples, p=p0)
    cal_sampled = np.asarray(infalign.calibrate(r, r[draws]))
    fresh = rng.choice(len(p0), size=args.calib_samples, p=p0)
    t_for = {n: infalign.choose_t(n, 1.0)["t"] for n in NS[1:]}
    rewards = {"plain": r, "calibrated": cal, **{f"ctrl_{n}": np.asarray(infalign.exponential_transform(cal, t_for[n]),
                                                                         np.float64) for n in NS[1:]}}
    table = {}
    for name, reward in rewards.items():
        rows = []
        for target in args.kls:
            beta = beta_at_kl(log_p0, reward, target)
            pi = tilt_law(log_p0, reward, beta)
            rows.append(dict(kl=kl(pi, log_p0), beta=beta, expected_reward=float(pi @ r),
                             **{f"N={n}": infalign.bon_win_rates(r, pi, p0, n) for n in NS}))
        table[name] = rows
    fits = {}
    family, theta0 = prefix_table_family(lm)
    reward_fn = TableReward(jnp.asarray(r, jnp.float32), lm.vocab_size)
    k_at = list(args.kls).index(1.0)
    for name in args.fits:
        beta = table[name][k_at]["beta"]
        if name == "plain":
            objective = vi.kl_regularised_rl(family, pplalign.tilt(lm, reward_fn, beta), estimator="enum")
        else:
            objective = infalign.ctrl_objective(family, lm, reward_fn, r, t=t_for[4], beta=beta, base_weights=p0,
                                                estimator="enum")
        res = vi.fit(objective, theta0, key=jax.random.key(5), num_steps=args.fit_steps,
                     optimizer=optax.adam(args.lr), chunk_size=args.fit_steps, progress=False)
        s = {k: float(v) for k, v in vi.exact_summary(family, res.params, objective.target).items()}
        lq = np.asarray(family.log_prob(res.params, seqs), np.float64)
        q = np.exp(lq) / np.exp(lq).sum()
        fits[name] = dict(beta=beta, kl_q_sigma=s["kl_q_sigma"], kl_q_p0=s["kl_q_p0"], steps=args.fit_steps,
                          **{f"N={n}": infalign.bon_win_rates(r, q, p0, n) for n in NS})
    return dict(vocab=lm.vocab_size, steps=lm.num_steps, sequences=lm.num_sequences, kls=list(args.kls), t=t_for,
                table=table, vi_fits=fits,
                calibration_ks_sampled=ks_uniform(cal_sampled[fresh]), calib_samples=args.calib_samples,
                largest_atom=float(p0.max()),
                seconds=time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size (fewer VI steps)")
    ap.add_argument("--out", default="results/infalign")
    ap.add_argument("--vocab", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kls", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--calib-samples", type=int, default=4096)
    ap.add_argument("--fit-steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--fits", nargs="+", default=["plain", "ctrl_4"], choices=["plain", "ctrl_4"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:  # CI: one VI fit, two KL budgets
        args.fit_steps, args.fits, args.kls = min(args.fit_steps, 150), ["ctrl_4"], [0.5, 1.0]
    if 1.0 not in args.kls or any(k <= 0 for k in args.kls):
        raise ValueError(f"--kls must be positive and include 1.0 (the VI fits' budget); got {args.kls}")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows = ["| policy | KL(π‖p₀) | " + " | ".join(f"BoN{n} vs BoN{n}(p₀)" for n in NS) + " | "
            + " | ".join(f"BoN{n} vs p₀" for n in NS) + " |", "|---|---|" + "---|" * (2 * len(NS))]
    for name, table in result["table"].items():
        for row in table:
            rows.append(f"| {name} | {row['kl']:.3f} | " + " | ".join(f"{row[f'N={n}']['vs_base_bon']:.4f}" for n in NS)
                        + " | " + " | ".join(f"{row[f'N={n}']['vs_base']:.4f}" for n in NS) + " |")
    rows += ["", "VI fits (vi.fit, exact enum gradients) at the KL = 1 β:", ""]
    for name, f in result["vi_fits"].items():
        rows.append(f"- {name}: KL(q‖σ) = {f['kl_q_sigma']:.2e}, KL(q‖p₀) = {f['kl_q_p0']:.3f}, "
                    + ", ".join(f"BoN{n} vs BoN{n}(p₀) = {f[f'N={n}']['vs_base_bon']:.4f}" for n in NS))
    (out / "table.md").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NS), figsize=(13, 4))
    for ax, n in zip(axes, NS):
        for name, table in result["table"].items():
            ax.plot([row["kl"] for row in table], [row[f"N={n}"]["vs_base_bon"] for row in table], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("KL(π‖p₀) (nats)")
        ax.set_title(f"best-of-{n}: win rate vs best-of-{n}(p₀)")
    axes[0].set_ylabel("exact win rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "win_rates.png", dpi=120)
    print("\n".join(rows))
    at1 = {name: {f"N={n}": table[list(result["kls"]).index(1.0)][f"N={n}"]["vs_base_bon"] for n in NS}
           for name, table in result["table"].items()}
    print(json.dumps({"kl": 1.0, "win_rate_vs_base_bon_at_kl1": at1, "t": result["t"],
                      "vi_fit_kl_q_sigma": {k: f["kl_q_sigma"] for k, f in result["vi_fits"].items()},
                      "calibration_ks_sampled": result["calibration_ks_sampled"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
