"""Resampling with imperfect verifiers on the arithmetic chains (Stroebl et al. 2024, "Inference scaling fLaws";
issue 14, item 5). The maths (ceiling, finite-n curve, utility) is in :mod:`models.lm.verifiers`.

Stand-ins. The *weak* model is ``lm_arithmetic`` sampled at temperature 1 (its per-problem sample accuracy
p_i is measured on the pool); the *strong* model's single-sample accuracy is that of greedy decoding of the
same LM (a more accurate setting of it) — and the exact answer (accuracy 1) is the strongest reference. The
paper's claim, read here: resampling the weak model against a verifier with FPR > 0 is capped at
mean_i p_i / (p_i + (1 − p_i)·FPR), which can sit below the strong single-sample accuracy.

Verifiers: the exact checker corrupted at FPR ∈ {0, 0.05, 0.1, 0.2, 0.4} (TPR 1, keyed by the solution's
tokens), and the shipped PRM's outcome probability exp(v_last) thresholded at operating points chosen on the
pool (measured FPR/TPR reported).

Methods at budget n (each a compute point: ``nfe`` = LM transitions, ``policy_tokens``, ``verifier_calls``):

* ``resample`` — draw samples until one is accepted, at most n; abstain if none. It stops at the first
  accept, so its tokens and verifier calls are those of the samples actually drawn (measured);
* ``accepted_majority`` — draw n, majority vote over the accepted ones' answers (n verifier calls);
* ``particle_filter`` — SMC toward σ ∝ p₀·exp(ORM/β) with the PRM twist (as :mod:`experiments.reasoning_scaling`),
  n particles, then a weighted majority over the particles the verifier accepts (n·(steps+1) PRM passes
  plus n verifier calls).

Accuracy counts an abstention as not right; the utility charges a wrong answer −c (abstain 0, right 1), and
the utility-optimal n is found for c ∈ {0.5, 1, 2, 4}.

    python -m experiments.imperfect_verifiers [--quick] [--out DIR]

Writes results.json, table.md and accuracy.png; prints the table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pplalign
from models.lm import corpora
from models.lm.checkpoint import load_model
from models.lm.program import LMProgram, prompt_caches, vmap_prompts
from models.lm.reasoning import prefix_scores, sample_solutions
from models.lm.rewards import PRMTwist, ProcessRewardModel, WithProcessReward
from models.lm.verifiers import (
    NoisyChecker,
    ThresholdPRM,
    first_accepted,
    operating_points,
    resampling_ceiling,
    resampling_curve,
    utility_optimal_n,
)

T = corpora.SOLUTION_LEN
STEPS = int(corpora.step_boundaries().sum())
COSTS = (0.5, 1.0, 2.0, 4.0)


def majority(answers, keep, weights=None):
    counts = collections.defaultdict(float)
    for i, a in enumerate(answers):
        if keep[i] and a is not None:
            counts[a] += 1.0 if weights is None else float(weights[i])
    return max(counts, key=counts.get) if counts else None


def run(args) -> dict:
    start = time.perf_counter()
    lm, tok = load_model("lm_arithmetic")
    prm_model, _ = load_model("lm_arithmetic_prm")
    problems = corpora.sample_problems(np.random.default_rng([args.seed, 11]), args.problems)
    key = jax.random.key(args.seed)
    nmax, budgets = max(args.budgets), sorted(args.budgets)
    pool = sample_solutions(key, lm, tok, problems, nmax)  # [P, M, T]
    answers = [[corpora.check_solution(p, s, tok)[1] for s in pool[i]] for i, p in enumerate(problems)]
    correct = np.asarray([[a == p.answer for a in answers[i]] for i, p in enumerate(problems)])
    greedy = sample_solutions(key, lm, tok, problems, 1, greedy=True)[:, 0]
    greedy_acc = float(np.mean([corpora.check_solution(p, g, tok)[1] == p.answer for p, g in zip(problems, greedy)]))
    v = prefix_scores(prm_model, tok, problems, pool)
    last = np.maximum((pool != 0).sum(-1) - 1, 0)
    orm = np.exp(np.take_along_axis(v, last[..., None], -1)[..., 0])
    lengths = np.minimum(last + 1, T)
    p_i = correct.mean(1)

    verifiers = {f"checker_fpr{f:g}": (NoisyChecker(f, seed=args.seed).accepts(pool, correct), f, 1.0) for f in args.fprs}
    for op in operating_points(orm, correct, args.prm_fprs):
        acc = ThresholdPRM(op["threshold"]).accepts(orm)
        verifiers[f"prm_fpr{op['target_fpr']:g}"] = (acc, op["fpr"], op["tpr"])
    pf = particle_filter(args, lm, tok, prm_model, problems, budgets, key)

    out = {}
    for name, (accepts, fpr, tpr) in verifiers.items():
        rows = []
        for n in budgets:
            right, wrong = first_accepted(accepts, correct, n)
            cf_right, cf_wrong = resampling_curve(p_i, n, fpr, tpr)
            g = nmax // n
            a = accepts[:, :g * n].reshape(len(problems), g, n)
            drawn = np.where(a.any(-1), np.argmax(a, -1) + 1, n)  # samples drawn until the first accept
            toks = np.cumsum(lengths[:, :g * n].reshape(len(problems), g, n), -1)
            used = np.take_along_axis(toks, drawn[..., None] - 1, -1)[..., 0]
            maj = [np.mean([majority(answers[i][k * n:(k + 1) * n], accepts[i, k * n:(k + 1) * n]) == p.answer
                            for k in range(g)]) for i, p in enumerate(problems)]
            maj_wrong = [np.mean([majority(answers[i][k * n:(k + 1) * n], accepts[i, k * n:(k + 1) * n]) not in (None, p.answer)
                                  for k in range(g)]) for i, p in enumerate(problems)]
            pf_right, pf_wrong = pf_pick(pf[n], problems, tok, name, fpr, tpr, args, orm_threshold=_threshold(name, args, orm, correct))
            rows.append(dict(
                n=n,
                resample=dict(accuracy=float(right.mean()), wrong=float(wrong.mean()), closed_form=float(cf_right.mean()),
                              closed_form_wrong=float(cf_wrong.mean()), nfe=float(drawn.mean() * T),
                              policy_tokens=float(used.mean()), verifier_calls=float(drawn.mean())),
                accepted_majority=dict(accuracy=float(np.mean(maj)), wrong=float(np.mean(maj_wrong)), nfe=n * T,
                                       policy_tokens=float(lengths[:, :g * n].reshape(len(problems), g, n).sum(-1).mean()),
                                       verifier_calls=n),
                particle_filter=dict(accuracy=pf_right, wrong=pf_wrong, nfe=n * T, policy_tokens=n * T,
                                     verifier_calls=n * (STEPS + 1) + n)))
        ceiling = float(resampling_ceiling(p_i, fpr, tpr).mean())
        utility = {f"c={c:g}": {m: utility_optimal_n(budgets, [r[m]["accuracy"] for r in rows], [r[m]["wrong"] for r in rows], c)
                                for m in ("resample", "accepted_majority", "particle_filter")} for c in COSTS}
        out[name] = dict(fpr=fpr, tpr=tpr, ceiling=ceiling, rows=rows, utility=utility,
                         below_strong=ceiling < greedy_acc)
    return dict(budgets=budgets, problems=len(problems), verifiers=out, weak_sample_accuracy=float(p_i.mean()),
                strong_greedy_accuracy=greedy_acc, exact_answer_accuracy=1.0, seconds=time.perf_counter() - start)


def _threshold(name, args, orm, correct):
    if not name.startswith("prm_"):
        return None
    target = float(name[len("prm_fpr"):])
    return next(op["threshold"] for op in operating_points(orm, correct, [target]))


def particle_filter(args, lm, tok, prm_model, problems, budgets, key) -> dict:
    """{n: (tokens [P, R, n, T], log weights [P, R, n])} of R = max(1, particles // n) SMC runs per problem."""
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T, reorder_mode="full")
    boundaries = jnp.asarray(corpora.step_boundaries())
    out = {}
    for n in budgets:
        reps = max(1, args.smc_particles // n)

        def one(k, program, n=n, reps=reps):
            prog = WithProcessReward(program, ProcessRewardModel.for_program(prm_model, program), boundaries)
            target = pplalign.tilt(prog, prog.prm, args.beta)
            run1 = lambda kk: pplalign.smc(kk, target, n, twist=PRMTwist(args.beta), proposal=prog.transition)
            return jax.vmap(run1)(jax.random.split(k, reps))

        res = vmap_prompts(one, base, caches, jax.random.fold_in(key, 500 + n))
        out[n] = (np.asarray(res.samples), np.asarray(res.log_weights))
    return out


def pf_pick(res, problems, tok, name, fpr, tpr, args, orm_threshold=None) -> tuple[float, float]:
    """(P(right), P(wrong)) of a weighted majority over the verifier-accepted final particles."""
    samples, lw = res
    right, wrong = [], []
    checker = NoisyChecker(fpr, seed=args.seed, tpr=tpr) if orm_threshold is None else None
    for i, p in enumerate(problems):
        for r in range(samples.shape[1]):
            ans = [corpora.check_solution(p, s, tok)[1] for s in samples[i, r]]
            if checker is not None:
                keep = [checker(i, s, a == p.answer) for s, a in zip(samples[i, r], ans)]
            else:  # the PRM verifier re-scores the particles: P_ORM ≥ τ
                keep = list(_orm_prob(args, p, samples[i, r], tok) >= orm_threshold)
            w = np.exp(lw[i, r] - lw[i, r].max())
            choice = majority(ans, keep, w)
            right.append(choice == p.answer)
            wrong.append(choice is not None and choice != p.answer)
    return float(np.mean(right)), float(np.mean(wrong))


_PRM = {}


def _orm_prob(args, problem, samples, tok):
    if "model" not in _PRM:
        _PRM["model"] = load_model("lm_arithmetic_prm")[0]
    v = prefix_scores(_PRM["model"], tok, [problem], samples[None])[0]
    last = np.maximum((samples != 0).sum(-1) - 1, 0)
    return np.exp(v[np.arange(len(samples)), last])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size (4 problems, budgets 1, 4)")
    ap.add_argument("--out", default="results/imperfect_verifiers")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--fprs", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--prm-fprs", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--smc-particles", type=int, default=64)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.budgets, args.smc_particles, args.fprs, args.prm_fprs = 4, [1, 4], 4, [0.0, 0.2], [0.2]
    if any(n < 1 for n in args.budgets) or any(max(args.budgets) % n for n in args.budgets):
        raise ValueError(f"budgets must be positive and divide the largest one; got {args.budgets}")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    b = result["budgets"]
    rows = ["| verifier (FPR/TPR) | method | " + " | ".join(f"n={n}" for n in b) + " | ceiling |", "|---|---|" + "---|" * (len(b) + 1)]
    for name, vr in result["verifiers"].items():
        for m in ("resample", "accepted_majority", "particle_filter"):
            cells = [f"{r[m]['accuracy']:.3f}" + (f" ({r[m]['closed_form']:.3f})" if m == "resample" else "") for r in vr["rows"]]
            rows.append(f"| {name} ({vr['fpr']:.3f}/{vr['tpr']:.3f}) | {m} | " + " | ".join(cells) + f" | {vr['ceiling']:.3f} |")
    rows += ["", f"weak (sampled) single-sample accuracy {result['weak_sample_accuracy']:.3f}; strong (greedy) "
             f"{result['strong_greedy_accuracy']:.3f}; exact answer 1.", "", "utility-optimal n (resample / accepted_majority / particle_filter):", ""]
    for name, vr in result["verifiers"].items():
        rows.append(f"- {name}: " + "; ".join(f"{c}: " + "/".join(str(vr['utility'][c][m]['n']) for m in
                                                                   ("resample", "accepted_majority", "particle_filter")) for c in vr["utility"]))
    rows += ["", "compute at each n for resample (policy tokens / verifier calls / NFE):", ""]
    for name, vr in result["verifiers"].items():
        rows.append(f"- {name}: " + ", ".join(f"n={r['n']}: {r['resample']['policy_tokens']:.0f}/{r['resample']['verifier_calls']:.1f}/{r['resample']['nfe']:.0f}"
                                            for r in vr["rows"]))
    (out / "table.md").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for name, vr in result["verifiers"].items():
        line = axes[0].plot(b, [r["resample"]["accuracy"] for r in vr["rows"]], marker="o", label=name)[0]
        axes[0].axhline(vr["ceiling"], color=line.get_color(), ls=":", lw=1)
        axes[1].plot(b, [r["particle_filter"]["accuracy"] for r in vr["rows"]], marker="o", label=name)
    for ax, title in zip(axes, ("resample until accepted (dotted: closed-form ceiling)", "particle filter + verifier")):
        ax.axhline(result["strong_greedy_accuracy"], color="k", ls="--", lw=1, label="strong: greedy, one sample")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("accuracy (abstain = not right)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print("\n".join(rows))
    print(json.dumps({name: {"fpr": vr["fpr"], "tpr": vr["tpr"], "ceiling": vr["ceiling"],
                             "resample_accuracy": [r["resample"]["accuracy"] for r in vr["rows"]],
                             "particle_filter_accuracy": [r["particle_filter"]["accuracy"] for r in vr["rows"]],
                             "utility_optimal_n_resample": {c: vr["utility"][c]["resample"]["n"] for c in vr["utility"]}}
                      for name, vr in result["verifiers"].items()} | {
        "budgets": b, "strong_greedy_accuracy": result["strong_greedy_accuracy"],
        "weak_sample_accuracy": result["weak_sample_accuracy"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
