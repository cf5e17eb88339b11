"""Reasoning searches (issue 14): A*-decoding, REBASE and their compute accounting, on an exact testbed.

The testbed is a Markov token chain over V = 4 tokens (0, 1, 2 content, 3 the step delimiter), horizon T = 8,
with a cumulative log-score verifier u(x_{<t}) = Σ_s W[x_{s−1}, x_s] (W ≤ 0), so the optimal cost-to-go
h*(last, t) = min over continuations of −Σ W is an exact, consistent A* heuristic by backward recursion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from pplalign.search import AStarConfig, RebaseConfig, astar, rebase, rebase_allocation

V, T, DELIM = 4, 6, 3
T_ARITH = 21  # corpora.SOLUTION_LEN, the arithmetic solutions
RNG = np.random.default_rng(0)
W = -RNG.exponential(1.0, size=(V + 1, V)).astype(np.float32)  # row 0: before the first token
LOGITS = (1.5 * W + 0.5 * RNG.normal(size=(V + 1, V))).astype(np.float32)  # a policy that likes cheap tokens


def _state(tokens, last, u):
    return dict(tokens=tokens, last=last, u=u)


class Chain:
    """p₀(x_t | x_{t−1}) = softmax(LOGITS[x_{t−1} + 1]); the state carries u(x_{<t}) = Σ W[x_{s−1}+1, x_s]."""

    num_steps = T

    def init(self, key):
        return _state(jnp.zeros((T,), jnp.int32), jnp.asarray(-1, jnp.int32), jnp.asarray(0.0, jnp.float32))

    def transition(self, state, t):
        return dist.CategoricalLogits(jnp.asarray(LOGITS)[state["last"] + 1])

    def update(self, state, x, t):
        x = jnp.asarray(x, jnp.int32)
        return _state(state["tokens"].at[t].set(x), x, state["u"] + jnp.asarray(W)[state["last"] + 1, x])

    def output(self, state):
        return state["tokens"]


def prm(state, t):
    return state["u"]


def _exact_h():
    """h*[last + 1, t] = min over x_t..x_{T−1} of −Σ W (backward recursion)."""
    h = np.zeros((V + 1, T + 1), np.float64)
    for t in range(T - 1, -1, -1):
        for prev in range(V + 1):
            h[prev, t] = min(-W[prev, x] + h[x + 1, t + 1] for x in range(V))
    return h


H_STAR = _exact_h()
OPTIMUM = -H_STAR[0, 0]  # the largest u over all sequences


def exact_h(state, t):
    return jnp.asarray(H_STAR, jnp.float32)[state["last"] + 1, t]


@pytest.fixture(scope="module")
def chain():
    return Chain()


def _astar(chain, h=None, **kw):
    cfg = AStarConfig(**{**dict(delimiter=DELIM, num_children=8, token_budget=2000, verifier_budget=800), **kw})
    return cfg, astar(jax.random.key(1), chain, prm, cfg, heuristic=h)


@pytest.fixture(scope="module")
def runs(chain):
    """A* with h = 0 and with the exact h*, three solutions each (two compiles shared by the tests below)."""
    return {name: _astar(chain, h, num_solutions=3)[1] for name, h in (("zero", None), ("exact", exact_h))}


def _created(q):
    n = int(q.num_nodes)
    return np.arange(1, n)


@pytest.mark.parametrize("name", ["zero", "exact"])
def test_astar_pops_in_nondecreasing_f(runs, name):
    """With step costs ≥ 0 and a consistent h (0, or the exact cost-to-go), A* pops in non-decreasing f."""
    q = runs[name].queue
    f = np.asarray(q.pop_f[: int(q.num_pops)])
    assert int(q.num_pops) >= 3
    assert np.all(np.diff(f) >= -1e-5), f


@pytest.mark.parametrize("name", ["zero", "exact"])
def test_astar_first_solution_is_best_in_tree(runs, name):
    """The first solution popped has the largest u of every finished node the search created, and solutions
    come out in non-increasing u (the A* goal test on pop)."""
    r = runs[name]
    q = r.queue
    assert int(r.num_found) == 3
    idx = _created(q)
    fin = idx[np.asarray(q.finished)[idx]]
    vals = np.asarray(r.solution_value)
    np.testing.assert_allclose(vals[0], np.asarray(q.value)[fin].max(), atol=1e-6)
    assert np.all(np.diff(vals) <= 1e-6)
    # each solution's tokens are its node's output and its value is the verifier's on them
    for tokens, v in zip(np.asarray(r.solutions), vals):
        u = sum(W[([-1] + list(tokens))[s] + 1, tokens[s]] for s in range(T))
        np.testing.assert_allclose(v, u, rtol=1e-5)


def test_astar_exact_heuristic_reaches_optimum_directly(runs):
    """With the exact h*, the root's f is the global optimum's cost (DP over all V^T sequences) and the first
    solution attains it when the optimal steps are among the k = 8 draws, which the policy, tilted towards
    cheap tokens, makes near certain here (fixed key); it then pops far fewer nodes than h = 0."""
    r = runs["exact"]
    np.testing.assert_allclose(float(r.queue.pop_f[0]), -OPTIMUM, rtol=1e-5)
    np.testing.assert_allclose(float(r.solution_value[0]), OPTIMUM, rtol=1e-5)
    assert int(runs["exact"].queue.num_pops) < int(runs["zero"].queue.num_pops)


@pytest.mark.parametrize("name", ["zero", "exact"])
def test_astar_counts_are_exact(runs, name):
    """policy_tokens = Σ over created nodes of the tokens of their step; verifier_calls = one per distinct
    created node (a duplicate of an earlier sibling is neither scored nor queued, and really repeats it);
    nfe = policy_tokens; a node's parent was popped before it and is not finished."""
    r = runs[name]
    q = r.queue
    idx = _created(q)
    pos, par = np.asarray(q.position), np.asarray(q.parent)
    assert int(r.policy_tokens) == int((pos[idx] - pos[par[idx]]).sum())
    dup = np.asarray(q.duplicate)
    assert int(r.verifier_calls) == int((~dup[idx]).sum()) and dup[idx].any()
    assert not np.asarray(q.popped_at)[idx][dup[idx]].max() >= 0
    tokens = np.asarray(jax.vmap(Chain().output)(q.states))
    for n in idx[dup[idx]]:
        twins = [m for m in idx if par[m] == par[n] and m < n and not dup[m] and pos[m] == pos[n]]
        assert any((tokens[m] == tokens[n]).all() for m in twins)
    for n in idx[~dup[idx]]:  # a distinct child repeats no earlier sibling
        assert not any((tokens[m] == tokens[n]).all() and pos[m] == pos[n] for m in idx if par[m] == par[n] and m < n)
    assert int(r.nfe) == int(r.policy_tokens)
    assert np.all(np.asarray(q.popped_at)[par[idx]] >= 0) and not np.asarray(q.finished)[par[idx]].any()


@pytest.mark.parametrize("budget", [(48, None), (None, 16), (100, 40)])
def test_astar_budget_never_exceeded(chain, budget):
    """Tight budgets (one or a few expansions) stop the search before either cap is passed."""
    tokens, calls = budget
    cfg, r = _astar(chain, token_budget=tokens, verifier_budget=calls, num_solutions=50)
    if tokens is not None:
        assert int(r.policy_tokens) <= tokens
    if calls is not None:
        assert int(r.verifier_calls) <= calls
    assert bool(r.stopped) and int(r.queue.num_pops) >= 1


def test_steps_end_at_the_delimiter(runs):
    """Every created node's step holds the delimiter only as its last token, unless it ran to the horizon."""
    q = runs["zero"].queue
    tokens = np.asarray(jax.vmap(Chain().output)(q.states))
    pos, par = np.asarray(q.position), np.asarray(q.parent)
    for n in _created(q):
        step = tokens[n, pos[par[n]]:pos[n]]
        assert len(step) >= 1 and DELIM not in step[:-1]
        assert step[-1] == DELIM or pos[n] == T


def test_end_token_and_step_cap(chain):
    """An end token finishes a node early; max_step_tokens cuts a step."""
    cfg, r = _astar(chain, end_token=2, max_step_tokens=2, num_solutions=4)
    q = r.queue
    tokens = np.asarray(jax.vmap(chain.output)(q.states))
    pos, par, fin = np.asarray(q.position), np.asarray(q.parent), np.asarray(q.finished)
    for n in _created(q):
        step = tokens[n, pos[par[n]]:pos[n]]
        assert 1 <= len(step) <= 2
        assert fin[n] == (step[-1] == 2 or pos[n] == T)
        assert 2 not in step[:-1]
    assert fin[_created(q)].any() and (pos[_created(q)][fin[_created(q)]] < T).any()


# --- REBASE ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [1, 7, 16, 33])
def test_rebase_allocation_sums_to_width_and_follows_softmax(total):
    """Σ W = B exactly, W = 0 off the live leaves, and |W_j − B·softmax(u/τ)_j| < 1 on them."""
    scores = jnp.asarray(RNG.normal(size=9) * 2, jnp.float32)
    live = jnp.asarray(RNG.random(9) < 0.7).at[0].set(True)
    tau = 0.7
    w = np.asarray(rebase_allocation(scores, live, total, tau))
    p = np.where(np.asarray(live), np.exp(np.asarray(scores) / tau), 0.0)
    p /= p.sum()
    assert w.sum() == total and np.all(w[~np.asarray(live)] == 0) and np.all(w >= 0)
    assert np.all(np.abs(w - total * p) < 1.0), (w, total * p)


def test_rebase_allocation_degenerate_scores():
    """All live leaves at −inf: uniform over them; a single leaf takes the whole width."""
    w = np.asarray(rebase_allocation(jnp.full((4,), -jnp.inf), jnp.asarray([True, False, True, True]), 6, 1.0))
    assert w.tolist() == [2, 0, 2, 2]
    assert np.asarray(rebase_allocation(jnp.zeros(3), jnp.asarray([False, True, False]), 5, 0.1)).tolist() == [0, 5, 0]


@pytest.fixture(scope="module")
def rebase_run(chain):
    cfg = RebaseConfig(delimiter=DELIM, width=8, temperature=0.5)
    return cfg, rebase(jax.random.key(2), chain, prm, cfg)


def test_rebase_fills_the_width_and_counts_exactly(rebase_run):
    """All N slots end as finished solutions; each round spends one call per child, B = N − (finished so
    far), non-increasing; Σ round counts = the totals; the values are the verifier's on the solutions."""
    cfg, r = rebase_run
    assert np.asarray(r.finished).all() and not bool(r.stopped)
    calls = np.asarray(r.round_calls)[: int(r.rounds)]
    assert calls[0] == cfg.width and np.all(np.diff(calls) <= 0) and np.all(calls > 0)
    assert int(r.verifier_calls) == calls.sum() and int(r.policy_tokens) == np.asarray(r.round_tokens).sum()
    assert int(r.policy_tokens) >= cfg.width  # every chain drew a first step
    for tokens, v in zip(np.asarray(r.solutions), np.asarray(r.value)):
        u = sum(W[([-1] + list(tokens))[s] + 1, tokens[s]] for s in range(T))
        np.testing.assert_allclose(v, u, rtol=1e-5)


def test_rebase_budget_never_exceeded(chain):
    """A token budget of a bit more than one round stops REBASE with live leaves left, inside the cap."""
    cfg = RebaseConfig(delimiter=DELIM, width=8, temperature=0.5, token_budget=60, verifier_budget=20)
    r = rebase(jax.random.key(2), chain, prm, cfg)
    assert int(r.policy_tokens) <= 60 and int(r.verifier_calls) <= 20 and bool(r.stopped)


# --- bad input ----------------------------------------------------------------------------------------------------
def test_delimiter_absent_from_vocabulary(chain):
    with pytest.raises(ValueError, match="not a token of the program's vocabulary of 4"):
        astar(jax.random.key(0), chain, prm, AStarConfig(delimiter=7, token_budget=100))
    with pytest.raises(ValueError, match="end_token"):
        rebase(jax.random.key(0), chain, prm, RebaseConfig(delimiter=DELIM, end_token=-1))


def test_budget_too_small_for_one_expansion(chain):
    with pytest.raises(ValueError, match="too small for one expansion"):
        astar(jax.random.key(0), chain, prm, AStarConfig(delimiter=DELIM, num_children=4, token_budget=4 * T - 1))
    with pytest.raises(ValueError, match="verifier-call budget 3 is too small"):
        astar(jax.random.key(0), chain, prm, AStarConfig(delimiter=DELIM, num_children=4, verifier_budget=3))
    with pytest.raises(ValueError, match="too small for one expansion"):
        rebase(jax.random.key(0), chain, prm, RebaseConfig(delimiter=DELIM, width=8, token_budget=8 * T - 1))
    with pytest.raises(ValueError, match="needs a budget"):
        astar(jax.random.key(0), chain, prm, AStarConfig(delimiter=DELIM))


def test_verifier_outside_declared_range(chain):
    """A verifier declared a log-probability (≤ 0) that returns a positive value is refused after the run."""
    bad = lambda state, t: -state["u"]  # ≥ 0
    with pytest.raises(ValueError, match="outside its declared range"):
        astar(jax.random.key(0), chain, bad, AStarConfig(delimiter=DELIM, token_budget=200))
    with pytest.raises(ValueError, match="outside its declared range"):
        rebase(jax.random.key(0), chain, bad, RebaseConfig(delimiter=DELIM, width=4))


# --- the experiment, CI-sized ---------------------------------------------------------------------------------------
def test_reasoning_search_quick(tmp_path):
    """``experiments.reasoning_search --quick`` runs every method and ends with the JSON line of
    tokens_to_match_bon64 (here against best-of-4, the quick run's largest budget)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    out = subprocess.run([sys.executable, "-m", "experiments.reasoning_search", "--quick", "--out", str(tmp_path)],
                         cwd=root, capture_output=True, text=True, timeout=900, env=dict(os.environ, XLA_FLAGS=flags.strip()))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"astar", "rebase", "best_of_n_orm", "beam_search", "particle_filter"} <= set(result["tokens_to_match_bon64"])
    assert result["reference"]["n"] == 4 and result["reference"]["policy_tokens"] <= 4 * T_ARITH
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["policy_tokens"] >= 0 and r["verifier_calls"] >= 0
    astar_row = next(r for r in rows if r["method"] == "astar")
    assert astar_row["verifier_calls"] <= 16 and astar_row["policy_tokens"] <= 16 * T_ARITH  # its budgets
    assert (tmp_path / "accuracy_tokens.png").exists() and (tmp_path / "table.md").exists()
