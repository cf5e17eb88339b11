"""Writes notebooks/08_reasoning_search.ipynb (kept as code so the notebook stays reviewable)."""

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# 08 · Reasoning search: A*-decoding, REBASE and compute on two axes\n\n"
        "The weak arithmetic policy `lm_arithmetic` solves 3-step chains; the process reward model "
        "`lm_arithmetic_prm` gives v_t = log P(every step so far is right). `pplalign.search` searches over "
        "*steps* — runs of tokens closed by a delimiter (`;` here, a newline for a Hugging Face LM) — on any "
        "`Sequential` with token transitions:\n\n"
        "* **A*-decoding** pops the partial solution of least f = g + h, g = −v (a path cost ≥ 0), and expands it "
        "with k sampled steps;\n"
        "* **REBASE** grows a tree level by level, giving each live leaf W_j = B·softmax(v/τ)_j children under a "
        "fixed width.\n\n"
        "Every method reports `policy_tokens` and `verifier_calls` next to NFE. See `docs/reasoning_search.md`."
    ),
    nbf.v4.new_code_cell(
        """import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from models.lm import corpora
from models.lm.checkpoint import load_model
from models.lm.program import LMProgram, prompt_caches, vmap_prompts
from models.lm.reasoning import StepPRM, prefix_scores, sample_solutions, step_tokens
from pplalign.search import AStarConfig, RebaseConfig, astar, rebase

def vote(answers, weights):
    \"\"\"The answer with the largest total weight (None, a malformed solution, never wins).\"\"\"
    totals = {}
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(w)
    return max(totals, key=totals.get) if totals else None

lm, tok = load_model("lm_arithmetic")
prm_model, _ = load_model("lm_arithmetic_prm")
T = corpora.SOLUTION_LEN
problems = corpora.sample_problems(np.random.default_rng([0, 7]), 6)
caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T, reorder_mode="full")
steps = step_tokens(tok)          # {'delimiter': id of ';', 'end_token': <eos>}
print(steps, "| problem 0:", problems[0].prompt, "→", problems[0].answer)"""
    ),
    nbf.v4.new_markdown_cell(
        "## Accuracy against policy tokens and verifier calls\n\n"
        "Best-of-n (ORM pick) from one pool of 16 samples per problem, A* (one solution) and REBASE (width 8, "
        "weighted vote), on 6 problems. The searches stop a branch at its step's end and drop repeated steps, "
        "so they spend far fewer tokens than n full samples; the full comparison is "
        "`python -m experiments.reasoning_search`."
    ),
    nbf.v4.new_code_cell(
        """right = lambda p, toks: corpora.check_solution(p, toks, tok)[1] == p.answer
astar_cfg = AStarConfig(**steps, num_children=8, verifier_budget=64, token_budget=64 * T)
pool = sample_solutions(jax.random.key(1), lm, tok, problems, 16)
v = prefix_scores(prm_model, tok, problems, pool)
orm = np.take_along_axis(v, np.maximum((pool != 0).sum(-1) - 1, 0)[..., None], -1)[..., 0]
points = {"best_of_n": []}
for n in (1, 4, 16):
    acc = np.mean([[right(p, pool[i, g * n + np.argmax(orm[i, g * n:(g + 1) * n])]) for g in range(16 // n)]
                   for i, p in enumerate(problems)])
    points["best_of_n"].append((n * T, n, acc))

def answers(p, sols, weights, ok):
    return vote([corpora.check_solution(p, s, tok)[1] if o else None for s, o in zip(sols, ok)], weights)

def search_astar(key, program):
    r = astar(key, program, StepPRM.for_program(prm_model, program), astar_cfg)
    return r.solutions, jnp.exp(r.solution_value), r.found, r.policy_tokens, r.verifier_calls, r.queue

rebase_cfg = RebaseConfig(**steps, width=8, temperature=0.2)
def search_rebase(key, program):
    r = rebase(key, program, StepPRM.for_program(prm_model, program), rebase_cfg)
    return r.solutions, jnp.exp(r.value), r.finished, r.policy_tokens, r.verifier_calls, None

for name, fn in (("astar", search_astar), ("rebase", search_rebase)):
    *out, queue = vmap_prompts(fn, base, caches, jax.random.key(2))
    sols, w, ok, pt, vc = map(np.asarray, out)
    if name == "astar":
        astar_queue = queue
    acc = np.mean([answers(p, sols[i], w[i], ok[i]) == p.answer for i, p in enumerate(problems)])
    points[name] = [(pt.mean(), vc.mean(), acc)]
    print(f"{name}: accuracy {acc:.2f}, policy tokens {pt.mean():.0f}, verifier calls {vc.mean():.0f}")
print("best-of-n (tokens, calls, accuracy):", [(t, c, round(a, 2)) for t, c, a in points["best_of_n"]])

fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
for ax, j, label in ((axes[0], 0, "policy tokens"), (axes[1], 1, "verifier calls")):
    for name, pts in points.items():
        ax.plot([x[j] for x in pts], [x[2] for x in pts], marker="o", label=name)
    ax.set_xscale("log", base=2); ax.set_xlabel(label)
axes[0].set_ylabel(f"accuracy ({len(problems)} problems)"); axes[1].legend()
fig.tight_layout()"""
    ),
    nbf.v4.new_markdown_cell(
        "## A* on one problem: the pops, in order\n\n"
        "The vmapped run above kept every problem's queue. With h = 0 and a non-increasing v the pops come in "
        "non-decreasing f; the first finished node popped is the answer; a repeated step is never queued."
    ),
    nbf.v4.new_code_cell(
        """i = 1
q = jax.tree_util.tree_map(lambda a: a[i], astar_queue)
texts = np.asarray(jax.vmap(base.output)(q.states))
for n in np.argsort(np.where(np.asarray(q.popped_at) >= 0, np.asarray(q.popped_at), 10**6))[: int(q.num_pops)]:
    print(f"pop {int(q.popped_at[n])}: f = {float(q.g[n] + q.h[n]):.3f}  ", tok.decode([int(t) for t in texts[n][: int(q.position[n])]]))
print(problems[i].prompt, "→", problems[i].answer)"""
    ),
]

nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
nbf.write(nb, "notebooks/08_reasoning_search.ipynb")
