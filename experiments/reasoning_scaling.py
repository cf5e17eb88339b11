"""Inference-time scaling on the arithmetic chains: accuracy against budget, NFE-matched (issue 4, item 6;
Puri et al. 2025, "A probabilistic inference approach to inference-time scaling of LLMs using particle-based
Monte Carlo methods").

The policy p₀ is the weak ``lm_arithmetic``; the verifier is ``lm_arithmetic_prm``, whose output after token
t is v_t = log P(every step so far is right | prompt, x_{≤t}) (see :mod:`models.lm.reasoning`). Two readings
of it are used by the methods, and neither peeks at the true answer:

* the **outcome reward** (ORM) r(x) = v after the last generated token (the whole solution judged);
* the **process reward** at step boundaries b_1 < … < b_K (each step's ``;`` and the answer number).

The true answer is used only to score the final pick (exact check, :func:`corpora.check_solution`).

Budget n = n sequences of T tokens, i.e. n·T LM transitions (NFE), for every method:

* greedy — argmax decoding (T transitions; shown flat);
* best-of-n (ORM) — the sample with the largest r(x);
* best-of-n (PRM) — the sample whose weakest step is best: max over samples of min_k v_{b_k};
* majority vote — the most frequent final answer; weighted majority — answers weighted by P_ORM = e^{r(x)};
* best-of-majority — among the answers with at least half the top vote count, the one of the sample with
  the best ORM;
* beam search — step level: at each boundary keep the n/4 partial solutions with the largest v_{b_k} and
  continue each 4 times (``pplalign.smc`` with a top-k "resampler" and the cumulative twist
  log ψ_t = Σ_{b_k ≤ t} v_{b_k}, whose increment at a boundary is exactly v_{b_k}); final pick by ORM;
* particle filtering — SMC on σ(x) ∝ p₀(x)·exp(r(x)/β) with the PRM as twist, log ψ_t = v_{b(t)}/β for the
  last completed boundary b(t), so the incremental weight is ψ_t/ψ_{t−1} (1 inside a step), never the raw
  step score (DESIGN §8); ESS-adaptive systematic resampling; answer by weighted majority
  over the final particles.

Compute is reported on three axes (:mod:`pplalign.search.budget`): ``nfe`` (LM transitions), ``policy_tokens``
(tokens the policy drew up to and including ``<eos>``: a sampler that stops a finished sequence spends no more;
the SMC methods advance every particle for all T steps, so theirs is n·T) and ``verifier_calls`` (PRM forward
passes over prompt + prefix: one per sample for the ORM/PRM readings, one per particle and step boundary plus
the final ranking for beam search and the particle filter).

To cut the Monte Carlo error, budget n is evaluated on R = n_max/n disjoint groups of samples (the
sampling methods share one pool of n_max samples per problem) or R independent runs (beam, particles), and
a problem's accuracy is the mean over them; the standard error is over problems.

    python -m experiments.reasoning_scaling [--quick] [--out DIR]

Writes results.json, table.md and accuracy.png to --out; prints the table, then one JSON line last.
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
from tqdm.auto import tqdm

import pplalign
from models.lm import corpora
from models.lm.checkpoint import load_model
from models.lm.program import LMProgram, prompt_caches, vmap_prompts
from models.lm.reasoning import prefix_scores, sample_solutions
from models.lm.rewards import PRMTwist, ProcessRewardModel, WithProcessReward

T = corpora.SOLUTION_LEN
BOUNDARIES = corpora.step_boundaries()
BOUNDARY_STEPS = np.flatnonzero(BOUNDARIES)
METHODS = ("greedy", "best_of_n_orm", "best_of_n_prm", "majority", "weighted_majority", "best_of_majority",
           "beam_search", "particle_filter")


def beam_resampler(expand: int = 4):
    """(key, log_weights, num) → indices keeping the top num/expand particles, each ``expand`` times; the
    identity when all weights are equal (between step boundaries nothing has been scored)."""

    def resample(key, log_weights, num):
        del key
        k = max(1, num // expand)
        top = jnp.argsort(-log_weights)[:k].astype(jnp.int32)
        tiled = jnp.tile(top, num // k + 1)[:num]
        flat = jnp.all(log_weights == log_weights[0])
        return jnp.where(flat, jnp.arange(num, dtype=jnp.int32), tiled)

    return resample


def vote(answers, weights=None):
    """The answer with the largest (weighted) count; None answers (malformed solutions) never win."""
    counts = collections.defaultdict(float)
    for i, a in enumerate(answers):
        if a is not None:
            counts[a] += 1.0 if weights is None else float(weights[i])
    return max(counts, key=counts.get) if counts else None


def best_of_majority(answers, scores):
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    keep = {a for a, c in counts.items() if 2 * c >= top}
    return max((s, a) for a, s in zip(answers, scores) if a in keep)[1]


def pick(method: str, answers, orm, prm):
    """The answer a pool-based method returns from n samples (answers, ORM r [n], PRM min-step score [n])."""
    if method == "best_of_n_orm":
        return answers[int(np.argmax(orm))]
    if method == "best_of_n_prm":
        return answers[int(np.argmax(prm))]
    if method == "majority":
        return vote(answers)
    if method == "weighted_majority":
        return vote(answers, np.exp(orm))
    if method == "best_of_majority":
        return best_of_majority(answers, orm)
    raise ValueError(method)


# verifier calls (PRM forward passes over prompt + prefix) per sample / particle
VERIFIER_CALLS = dict(greedy=0, best_of_n_orm=1, best_of_n_prm=1, majority=0, weighted_majority=1,
                       best_of_majority=1, beam_search=len(BOUNDARY_STEPS) + 1, particle_filter=len(BOUNDARY_STEPS) + 1)


def run(args):
    lm, tok = load_model("lm_arithmetic")
    prm_model, _ = load_model("lm_arithmetic_prm")
    problems = corpora.sample_problems(np.random.default_rng([args.seed, 7]), args.problems)
    num = len(problems)
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T, reorder_mode="full")
    boundaries = jnp.asarray(BOUNDARIES)
    key = jax.random.key(args.seed)
    budgets = sorted(args.budgets)
    nmax = max(budgets)
    right = lambda p, toks: corpora.check_solution(p, toks, tok)[1] == p.answer  # evaluation only
    start = time.perf_counter()

    # greedy and one pool of nmax samples per problem, with every prefix's PRM value
    greedy = sample_solutions(key, lm, tok, problems, 1, greedy=True)[:, 0]
    pool = sample_solutions(jax.random.fold_in(key, 1), lm, tok, problems, nmax)
    v = prefix_scores(prm_model, tok, problems, pool)  # [P, nmax, T]
    last = np.maximum((pool != 0).sum(-1) - 1, 0)
    orm = np.take_along_axis(v, last[..., None], -1)[..., 0]  # [P, nmax]
    prm = v[..., BOUNDARY_STEPS].min(-1)
    answers = [[corpora.check_solution(p, s, tok)[1] for s in pool[i]] for i, p in enumerate(problems)]

    per_problem = {m: np.zeros((len(budgets), num)) for m in METHODS}
    pass_at = np.zeros((len(budgets), num))  # oracle: some sample of the group is right (evaluation only)
    nfe = {m: [] for m in METHODS}
    verifier = {m: [] for m in METHODS}
    tokens = {m: [] for m in METHODS}
    lengths = np.minimum(last + 1, T)  # tokens drawn up to and including <eos>, per pool sample
    greedy_right = np.asarray([right(p, greedy[i]) for i, p in enumerate(problems)], float)

    def with_prm(program):
        return WithProcessReward(program, ProcessRewardModel.for_program(prm_model, program), boundaries)

    def smc_runs(kind: str, n: int, reps: int):
        def one(k, program):
            prog = with_prm(program)
            target = pplalign.tilt(prog, prog.prm, args.beta)
            if kind == "beam_search":
                return pplalign.smc(k, target, n, twist=PRMTwist(cumulative=True), proposal=prog.transition,
                                    resampling=beam_resampler(min(4, n)), ess_threshold=1.0)
            return pplalign.smc(k, target, n, twist=PRMTwist(args.beta), proposal=prog.transition,
                                ess_threshold=args.ess_threshold)

        fn = lambda k, program: jax.vmap(lambda kk: one(kk, program))(jax.random.split(k, reps))
        return vmap_prompts(fn, base, caches, jax.random.fold_in(key, 1000 + n))

    for b, n in enumerate(tqdm(budgets, desc="budgets")):
        per_problem["greedy"][b] = greedy_right
        nfe["greedy"].append(T)
        tokens["greedy"].append(float(np.minimum((greedy != 0).sum(-1), T).mean()))
        groups = nmax // n
        for i, p in enumerate(problems):
            pass_at[b, i] = np.mean([any(a == p.answer for a in answers[i][g * n:(g + 1) * n]) for g in range(groups)])
        for m in METHODS[1:6]:
            for i, p in enumerate(problems):
                hits = [pick(m, answers[i][g * n:(g + 1) * n], orm[i, g * n:(g + 1) * n], prm[i, g * n:(g + 1) * n])
                        == p.answer for g in range(groups)]
                per_problem[m][b, i] = np.mean(hits)
            nfe[m].append(n * T)
            tokens[m].append(float(lengths[:, :groups * n].reshape(num, groups, n).sum(-1).mean()))
        reps = max(1, args.smc_particles // n)
        for m in ("beam_search", "particle_filter"):
            res = smc_runs(m, n, reps)
            samples, lw = np.asarray(res.samples), np.asarray(res.log_weights)  # [P, R, n, T], [P, R, n]
            nfe[m].append(int(np.asarray(res.nfe).reshape(-1)[0]))
            tokens[m].append(float(n * T))  # every particle advances all T steps
            if m == "beam_search":  # rank the final beams by the ORM (one more verifier pass each)
                final = prefix_scores(prm_model, tok, problems, samples.reshape(num, reps * n, T))
                ends = np.maximum((samples != 0).sum(-1) - 1, 0).reshape(num, reps * n)
                score = np.take_along_axis(final, ends[..., None], -1)[..., 0].reshape(num, reps, n)
            for i, p in enumerate(problems):
                hits = []
                for r in range(reps):
                    ans = [corpora.check_solution(p, s, tok)[1] for s in samples[i, r]]
                    if m == "beam_search":
                        choice = ans[int(np.argmax(score[i, r]))]
                    else:
                        w = np.exp(lw[i, r] - lw[i, r].max())
                        choice = vote(ans, w / w.sum())
                    hits.append(choice == p.answer)
                per_problem[m][b, i] = np.mean(hits)
        for m in METHODS:
            verifier[m].append(VERIFIER_CALLS[m] * (1 if m == "greedy" else n))
    seconds = time.perf_counter() - start
    acc = {m: per_problem[m].mean(1).tolist() for m in METHODS}
    se = {m: (per_problem[m].std(1, ddof=1) / np.sqrt(num)).tolist() if num > 1 else [0.0] * len(budgets)
          for m in METHODS}
    pool_right = np.asarray([[a == p.answer for a in answers[i]] for i, p in enumerate(problems)], float)
    return dict(budgets=budgets, accuracy=acc, stderr=se, nfe=nfe, policy_tokens=tokens, verifier_calls=verifier, problems=num, steps=T,
                pass_at_n=pass_at.mean(1).tolist(),
                beta=args.beta, smc_particles=args.smc_particles, seconds=seconds,
                greedy_accuracy=float(greedy_right.mean()), sample_accuracy=float(pool_right.mean()),
                pass_at_max_budget=float(pool_right.max(1).mean()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a CI-sized run (4 problems, budget 4)")
    ap.add_argument("--out", default="results/reasoning_scaling")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--smc-particles", type=int, default=128,
                    help="particles per problem per budget for beam / particle filtering (runs of n each)")
    ap.add_argument("--beta", type=float, default=1.0, help="temperature of σ ∝ p0·exp(ORM/β)")
    ap.add_argument("--ess-threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.budgets, args.smc_particles = 4, [4], 4
    if any(n < 1 for n in args.budgets) or any(max(args.budgets) % n for n in args.budgets):
        raise ValueError(f"budgets must be positive and divide the largest one; got {args.budgets}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    budgets = result["budgets"]
    rows = ["| method | " + " | ".join(f"n={n}" for n in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in METHODS:
        cells = [f"{a:.3f} ± {s:.3f}" for a, s in zip(result["accuracy"][m], result["stderr"][m])]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    rows.append("| *pass@n (oracle bound of the pool methods)* | " + " | ".join(f"{a:.3f}" for a in result["pass_at_n"]) + " |")
    rows.append("| NFE (LM transitions, n·T) | " + " | ".join(str(n * T) for n in budgets) + " |")
    rows += ["", "policy tokens / verifier calls at each budget:", "",
             "| method | " + " | ".join(f"n={n}" for n in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in METHODS:
        cells = [f"{t:.0f} / {v}" for t, v in zip(result["policy_tokens"][m], result["verifier_calls"][m])]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    axis_of = (("nfe", f"NFE = LM transitions (n samples × T={T})"), ("policy_tokens", "policy tokens"),
               ("verifier_calls", "verifier calls (PRM passes)"))
    for ax, (name, label) in zip(axes, axis_of):
        for m in METHODS:
            a, s = np.asarray(result["accuracy"][m]), np.asarray(result["stderr"][m])
            x = np.asarray(result[name][m], float)
            if np.all(x > 0):  # greedy spends no verifier call: no point on a log axis
                ax.errorbar(x, a, yerr=s, marker="o", ms=3, capsize=2, label=m, ls="--" if m == "greedy" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
    axes[0].set_ylabel(f"accuracy ({result['problems']} problems, ± s.e.)")
    axes[0].set_title("arithmetic chains: inference-time scaling")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print("\n".join(rows))
    print(json.dumps({"budgets": budgets, "accuracy": result["accuracy"], "stderr": result["stderr"], "nfe": result["nfe"],
                      "policy_tokens": result["policy_tokens"], "verifier_calls": result["verifier_calls"],
                      "pass_at_n": result["pass_at_n"], "greedy_accuracy": result["greedy_accuracy"], "sample_accuracy": result["sample_accuracy"],
                      "problems": result["problems"], "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
