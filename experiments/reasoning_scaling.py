"""Inference-time scaling on the arithmetic chains: accuracy against budget, NFE-matched (issue 4, item 6).

Budget n = n sampled sequences of T tokens (n·T transitions) for every method:

* greedy — argmax decoding (one sequence, shown flat);
* best-of-n (ORM) — the sample with the highest outcome reward (the PRM's value after the last token);
* best-of-n (PRM) — the sample whose weakest step (min over step boundaries of the PRM value) is best;
* majority vote — the most frequent final answer; weighted majority — answers weighted by P_ORM(right);
* best-of-majority — among answers with at least half the top vote count, the one with the best ORM score;
* beam search — step-level: after every reasoning step keep the top n/4 partial solutions by cumulative PRM
  score and expand each into 4 (``pplalign.smc`` with a deterministic top-k "resampler" and a cumulative
  PRM twist), final pick by ORM;
* particle filtering — SMC targeting σ ∝ p₀·P_ORM(right) whose intermediate targets use the PRM as the twist
  ψ_t (the PRM value of the last completed step), so each incremental weight is the *ratio* ψ_t/ψ_{t−1}
  (Puri et al. 2025, with the correction of DESIGN §8); answer by weighted majority over the final particles.

    python -m experiments.reasoning_scaling [--quick] [--out DIR]

Writes results.json, table.md and accuracy.png to --out; prints one JSON line last.
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
from models.lm.program import LMProgram, ancestral_sample, prompt_caches, vmap_prompts
from models.lm.rewards import PRMTwist, ProcessRewardModel, WithProcessReward

T = corpora.NUM_OPS * corpora.STEP_LEN + 3  # steps, "A", answer, <eos>
BOUNDARIES = np.zeros(T, bool)
BOUNDARIES[[k * corpora.STEP_LEN + corpora.STEP_LEN - 1 for k in range(corpora.NUM_OPS)]] = True
BOUNDARIES[T - 2] = True  # the answer number
BOUNDARY_STEPS = np.flatnonzero(BOUNDARIES)
# β as a concrete array made outside jit: pplalign.tilt validates a Python float with jnp, which fails under
# jit/vmap (reported to the lead); a concrete array passes its check.
BETA = jnp.asarray(1.0, jnp.float32)


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


def answers_of(problem, tokens, tok) -> list:
    return [corpora.check_solution(problem, row, tok)[1] for row in np.asarray(tokens)]


def vote(answers, weights=None):
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
    best = max((s, a) for a, s in zip(answers, scores) if a in keep)
    return best[1]


def run(args):
    lm, tok = load_model("lm_arithmetic")
    prm_model, _ = load_model("lm_arithmetic_prm")
    problems = corpora.sample_problems(np.random.default_rng(args.seed), args.problems)
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T)
    boundaries = jnp.asarray(BOUNDARIES)
    key = jax.random.key(args.seed)
    budgets = args.budgets
    nmax = max(budgets)
    methods = ["greedy", "best_of_n_orm", "best_of_n_prm", "majority", "weighted_majority", "best_of_majority",
               "beam_search", "particle_filter"]
    acc = {m: [] for m in methods}

    def with_prm(program):
        return WithProcessReward(program, ProcessRewardModel.for_program(prm_model, program), boundaries)

    # one pool of nmax samples per problem; budget n uses the first n (nested subsets)
    def sample_and_score(k, program):
        tokens, _ = ancestral_sample(k, program, nmax)
        prm = ProcessRewardModel.for_program(prm_model, program)
        lp = jax.vmap(prm.prefix_log_probs)(tokens)  # [n, T]
        return tokens, lp

    start = time.perf_counter()
    tokens, lp = vmap_prompts(sample_and_score, base, caches, jax.random.fold_in(key, 1))
    greedy, _ = vmap_prompts(lambda k, p: ancestral_sample(k, p, 1, greedy=True), base, caches, key)
    tokens, lp, greedy = np.asarray(tokens), np.asarray(lp), np.asarray(greedy)
    last = np.maximum((tokens != 0).sum(-1) - 1, 0)
    orm = np.take_along_axis(lp, last[..., None], -1)[..., 0]  # [P, n]
    prm_min = lp[..., BOUNDARY_STEPS].min(-1)
    pool_answers = [answers_of(p, tokens[i], tok) for i, p in enumerate(problems)]
    greedy_acc = np.mean([answers_of(p, greedy[i], tok)[0] == p.answer for i, p in enumerate(problems)])

    for n in tqdm(budgets, desc="budgets"):
        acc["greedy"].append(float(greedy_acc))
        picks = collections.defaultdict(list)
        for i, p in enumerate(problems):
            ans = pool_answers[i][:n]
            picks["best_of_n_orm"].append(ans[int(np.argmax(orm[i, :n]))])
            picks["best_of_n_prm"].append(ans[int(np.argmax(prm_min[i, :n]))])
            picks["majority"].append(vote(ans))
            picks["weighted_majority"].append(vote(ans, np.exp(orm[i, :n])))
            picks["best_of_majority"].append(best_of_majority(ans, orm[i, :n]))

        def beam(k, program):
            prog = with_prm(program)
            target = pplalign.tilt(prog, prog.prm, BETA)
            return pplalign.smc(k, target, n, twist=PRMTwist(cumulative=True), proposal=prog.transition,
                                resampling=beam_resampler(4 if n >= 4 else n), ess_threshold=1.0)

        def particle_filter(k, program):
            prog = with_prm(program)
            target = pplalign.tilt(prog, prog.prm, BETA)
            return pplalign.smc(k, target, n, twist=PRMTwist(), proposal=prog.transition, ess_threshold=0.5)

        for name, fn in (("beam_search", beam), ("particle_filter", particle_filter)):
            res = vmap_prompts(fn, base, caches, jax.random.fold_in(key, 1000 + n))
            samples, lw = np.asarray(res.samples), np.asarray(res.log_weights)
            for i, p in enumerate(problems):
                ans = answers_of(p, samples[i], tok)
                if name == "beam_search":  # final log-weight = ORM − last cumulative step score: rank by ORM
                    prm = lp_of(prm_model, base, caches, i, samples[i])
                    picks[name].append(ans[int(np.argmax(prm))])
                else:
                    w = np.exp(lw[i] - lw[i].max())
                    picks[name].append(vote(ans, w / w.sum()))
        for m in methods[1:]:
            acc[m].append(float(np.mean([a == p.answer for a, p in zip(picks[m], problems)])))
    seconds = time.perf_counter() - start
    return dict(budgets=budgets, accuracy=acc, nfe=[n * T for n in budgets], problems=args.problems, steps=T,
                seconds=seconds, pool_step_accuracy=float(np.mean([corpora.check_solution(p, tokens[i, 0], tok)[1] == p.answer
                                                                  for i, p in enumerate(problems)])))


_orm_cache = {}


def lp_of(prm_model, base, caches, i, samples):
    """ORM scores of one problem's final samples."""
    program = LMProgram.build(base.model, jax.tree_util.tree_map(lambda a: a[i], caches), T)
    prm = ProcessRewardModel.for_program(prm_model, program)
    key = id(prm_model)
    if key not in _orm_cache:
        _orm_cache[key] = jax.jit(lambda prm, x: jax.vmap(prm)(x))
    return np.asarray(_orm_cache[key](prm, jnp.asarray(samples)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/reasoning_scaling")
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.budgets = 3, [2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows = ["| method | " + " | ".join(f"n={n}" for n in result["budgets"]) + " |",
            "|---|" + "---|" * len(result["budgets"])]
    for m, vals in result["accuracy"].items():
        rows.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, vals in result["accuracy"].items():
        ax.plot(result["budgets"], vals, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget n (samples; NFE = n·T)")
    ax.set_ylabel(f"accuracy ({result['problems']} problems)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print("\n".join(rows))
    summary = {m: v[-1] for m, v in result["accuracy"].items()}
    print(json.dumps({"budgets": result["budgets"], "accuracy_at_max_budget": summary, "accuracy": result["accuracy"],
                      "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
