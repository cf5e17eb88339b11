"""Reasoning search on the arithmetic chains, compute-matched on two axes (issue 14, item 7): accuracy against
policy tokens and against verifier calls for every method of :mod:`experiments.reasoning_scaling` (best-of-n,
majority votes, beam search, the PRM particle filter), A*-decoding and REBASE (:mod:`pplalign.search`), and
MCTS (:mod:`pplalign.search.mcts`, the MCTS-DPO search) when that module is present.

The policy is the weak ``lm_arithmetic``, the verifier ``lm_arithmetic_prm`` read as the process reward
v_t = log P(every step of x_{≤t} is right) (:class:`models.lm.reasoning.StepPRM`); steps end at ``;`` and the
solution at ``<eos>``. The exact check only scores the final answer.

* **A*-decoding** (k children per pop, path cost −v, h = 0): one solution (the first popped), or
  ``num_solutions`` of them and a weighted vote (weights e^{v}, the PRM's P(right)); budgets: verifier calls
  (which size the queue) and tokens.
* **REBASE** (width N, τ): the N solutions, weighted vote e^{v}.
* **MCTS**: PUCT, k = 4 children per expansion, values blending the ORM of a rollout and the PRM (w = ½);
  answer by robust descent.

Each search runs ``--repeats`` times per problem with fresh keys; a problem's accuracy is the mean over them,
policy tokens and verifier calls are the means over runs and problems. The goal of the issue: A* or REBASE
reaches best-of-64's accuracy (ORM pick, n = 64) with at most ⅓ of its policy tokens; ``tokens_to_match_bon64``
is, per method, the fewest mean policy tokens of a setting whose accuracy is at least best-of-64's (null when
no setting reaches it).

    python -m experiments.reasoning_search [--quick] [--out DIR]

Writes results.json, table.md, accuracy_tokens.png to --out; prints the table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reasoning_scaling
from experiments.reasoning_scaling import vote
from models.lm import corpora
from models.lm.checkpoint import load_model
from models.lm.program import LMProgram, prompt_caches, vmap_prompts
from models.lm.reasoning import StepPRM, step_tokens
from pplalign.search import AStarConfig, RebaseConfig, astar, rebase

try:  # the MCTS of issue 14, item 4 (another module); left out when absent
    from pplalign.search.mcts import MCTSConfig, mcts
except ImportError:  # pragma: no cover
    mcts = None

T = corpora.SOLUTION_LEN


def _searches(args, steps):
    """(method, label, config) for every setting swept."""
    out = []
    for k, sols, calls in args.astar:
        out.append(("astar", f"k={k},S={sols},calls={calls}",
                    AStarConfig(**steps, num_children=k, num_solutions=sols, verifier_budget=calls, token_budget=calls * T)))
    for width in args.rebase_widths:
        out.append(("rebase", f"N={width}", RebaseConfig(**steps, width=width, temperature=args.temperature)))
    if mcts is not None:
        for iters in args.mcts_iterations:
            out.append(("mcts", f"iters={iters}", MCTSConfig(**steps, num_children=4, num_iterations=iters,
                                                             prm_weight=0.5, value_range=(-np.inf, 0.0))))
    return out


def _runner(method, config, prm_model):
    """fn(key, program) -> (answer tokens [S, T], weights [S], valid [S], policy_tokens, verifier_calls, values to check)."""

    def fn(key, program):
        prm = StepPRM.for_program(prm_model, program)
        if method == "astar":
            r = astar(key, program, prm, config)
            return r.solutions, jnp.exp(r.solution_value), r.found, r.policy_tokens, r.verifier_calls, r
        if method == "rebase":
            r = rebase(key, program, prm, config)
            return r.solutions, jnp.exp(r.value), r.finished, r.policy_tokens, r.verifier_calls, r
        r = mcts(key, program, prm.prm, prm, config)
        return r.answer[None], jnp.ones((1,)), jnp.ones((1,), bool), r.policy_tokens, r.verifier_calls, None

    return fn


def run_searches(args, lm, tok, prm_model, problems):
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T, reorder_mode="full")
    steps = step_tokens(tok)
    rows = []
    for method, label, config in _searches(args, steps):
        fn = _runner(method, config, prm_model)
        start = time.perf_counter()
        hits, toks, calls = [], [], []
        for rep in range(args.repeats):
            sols, w, ok, pt, vc, res = vmap_prompts(fn, base, caches, jax.random.key(args.seed * 1000 + rep))
            if res is not None:  # the searches' own range check, per problem (vmapped: the caller's job)
                for i in range(len(problems)):
                    jax.tree_util.tree_map(lambda a: a[i], res).check(config.value_range)
            sols, w, ok = np.asarray(sols), np.asarray(w), np.asarray(ok)
            for i, p in enumerate(problems):
                answers = [corpora.check_solution(p, s, tok)[1] if v else None for s, v in zip(sols[i], ok[i])]
                hits.append(vote(answers, w[i]) == p.answer)
            toks.append(np.asarray(pt, float))
            calls.append(np.asarray(vc, float))
        acc_per_problem = np.asarray(hits, float).reshape(args.repeats, len(problems)).mean(0)
        rows.append(dict(method=method, setting=label, accuracy=float(acc_per_problem.mean()),
                         stderr=float(acc_per_problem.std(ddof=1) / np.sqrt(len(problems))) if len(problems) > 1 else 0.0,
                         policy_tokens=float(np.mean(toks)), verifier_calls=float(np.mean(calls)),
                         seconds=time.perf_counter() - start))
        print(f"{method:8s} {label:24s} acc {rows[-1]['accuracy']:.3f}  tokens {rows[-1]['policy_tokens']:7.1f}  "
              f"calls {rows[-1]['verifier_calls']:6.1f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def baseline_rows(scaling: dict) -> list[dict]:
    rows = []
    for m in reasoning_scaling.METHODS:
        for b, n in enumerate(scaling["budgets"]):
            rows.append(dict(method=m, setting=f"n={n}", accuracy=scaling["accuracy"][m][b], stderr=scaling["stderr"][m][b],
                             policy_tokens=float(scaling["policy_tokens"][m][b]),
                             verifier_calls=float(scaling["verifier_calls"][m][b])))
    return rows


def tokens_to_match(rows: list[dict], target: float) -> dict:
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        reach = [r["policy_tokens"] for r in rows if r["method"] == m and r["accuracy"] >= target - 1e-12]
        out[m] = min(reach) if reach else None
    return out


def plot(rows, path, bon):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, axis in zip(axes, ("policy_tokens", "verifier_calls")):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r[axis], r["accuracy"], r["stderr"]) for r in rows if r["method"] == m and r[axis] > 0)
            if pts:
                x, a, s = map(np.asarray, zip(*pts))
                ax.errorbar(x, a, yerr=s, marker="o", ms=3, capsize=2, label=m,
                            lw=2.2 if m in ("astar", "rebase", "mcts") else 1.0)
        ax.axhline(bon["accuracy"], color="k", lw=0.6, ls=":")
        if axis == "policy_tokens":
            ax.axvline(bon["policy_tokens"] / 3, color="k", lw=0.6, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis.replace("_", " "))
    axes[0].set_ylabel("accuracy (± s.e. over problems)")
    axes[0].set_title("dotted: best-of-64 accuracy; dashed: ⅓ of its tokens", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a CI-sized run (4 problems, one setting each)")
    ap.add_argument("--out", default="results/reasoning_search")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--smc-particles", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="independent runs of each search per problem")
    ap.add_argument("--temperature", type=float, default=0.2, help="REBASE's τ (in units of the log-PRM)")
    ap.add_argument("--astar", nargs="+", default=["2,1,16", "4,1,32", "8,1,64", "16,1,128", "8,4,128"],
                    help="A* settings k,S,calls (children per pop, solutions, verifier budget; tokens capped at calls·T)")
    ap.add_argument("--rebase-widths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--mcts-iterations", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.astar = [tuple(int(v) for v in a.split(",")) for a in args.astar]
    if args.quick:
        args.problems, args.budgets, args.smc_particles, args.repeats = 4, [4], 4, 1
        args.astar, args.rebase_widths, args.mcts_iterations = [(2, 1, 16)], [4], [2]
    scaling_args = argparse.Namespace(problems=args.problems, budgets=args.budgets, smc_particles=args.smc_particles,
                                      beta=1.0, ess_threshold=0.5, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scaling = reasoning_scaling.run(scaling_args)
    lm, tok = load_model("lm_arithmetic")
    prm_model, _ = load_model("lm_arithmetic_prm")
    problems = corpora.sample_problems(np.random.default_rng([args.seed, 7]), args.problems)  # as reasoning_scaling
    rows = baseline_rows(scaling) + run_searches(args, lm, tok, prm_model, problems)
    n_ref = max(args.budgets)
    bon = next(r for r in rows if r["method"] == "best_of_n_orm" and r["setting"] == f"n={n_ref}")
    match = tokens_to_match(rows, bon["accuracy"])
    table = ["| method | setting | accuracy | policy tokens | verifier calls |", "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['setting']} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {r['policy_tokens']:.0f} | "
              f"{r['verifier_calls']:.0f} |" for r in rows]
    (out / "table.md").write_text("\n".join(table) + "\n")
    seconds = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(dict(rows=rows, reference=bon, reference_budget=n_ref,
                                                      tokens_to_match_bon64=match, problems=args.problems,
                                                      mcts_included=mcts is not None, seconds=seconds), indent=1))
    plot(rows, out / "accuracy_tokens.png", bon)
    print("\n".join(table))
    ratio = {m: (None if t is None else t / bon["policy_tokens"]) for m, t in match.items()}
    print(json.dumps(dict(reference=dict(method="best_of_n_orm", n=n_ref, accuracy=bon["accuracy"],
                                         policy_tokens=bon["policy_tokens"]),
                          tokens_to_match_bon64=match, fraction_of_bon64_tokens=ratio,
                          goal_met=any(ratio.get(m) is not None and ratio[m] <= 1 / 3 for m in ("astar", "rebase")),
                          mcts_included=mcts is not None, problems=args.problems, seconds=seconds)))


if __name__ == "__main__":
    main()
