"""MCTS over reasoning steps, step-level preference pairs and the DPO loss (issue 14, item 4; Xie et al. 2024).

The search runs on the exact Markov testbed (4 tokens, 6 steps, token 0 closes a step): every invariant of
the tree is checked node by node, and each stored number is recomputed from its definition. The DPO loss is
checked against a finite difference (float64) and against its closed-form optimum on two options. The
quick experiment runs MCTS-DPO on the shipped arithmetic LM end to end.
"""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.markov_lm import random_markov_lm
from pplalign.search import tree as tree_lib
from pplalign.search.mcts import MCTSConfig, MCTSTree, check_values, mcts, selection_scores, step_preferences
from pplalign.vi.dpo import dpo_logits, dpo_loss, masked_log_prob

V, T, DELIM, END, GOOD = 4, 6, 0, 2, 3
W = 0.3  # prm weight


def reward(x):
    return jnp.mean(x == GOOD).astype(jnp.float32)


def prm(state, t):  # the fraction of GOOD tokens among the first T positions drawn so far (zeros after t)
    return jnp.mean(state.tokens == GOOD).astype(jnp.float32)


BASE = MCTSConfig(delimiter=DELIM, num_children=3, num_iterations=12, selection="puct", c_explore=1.0, prm_weight=W)
CONFIGS = dict(
    puct=BASE,
    uct=dataclasses.replace(BASE, selection="uct", end_token=END),
    budget=dataclasses.replace(BASE, token_budget=3 * T),  # one root expansion
)


@pytest.fixture(scope="module")
def lm():
    return random_markov_lm(jax.random.key(3), V, T)


@pytest.fixture(scope="module")
def searched(lm):
    out = {}
    for name, cfg in CONFIGS.items():
        res = jax.jit(lambda k, cfg=cfg: mcts(k, lm, reward, prm, cfg))(jax.random.key(7))
        out[name] = jax.tree_util.tree_map(np.asarray, res)
    return out


def _kids(tree, node):
    n = int(tree.nodes.num_nodes)
    return [c for c in range(1, n) if tree.nodes.parent[c] == node]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_visits_and_values_are_backed_up_means(searched, name):
    """N(n) = 1 + Σ_c N(c), S(n) = v(n) + Σ_c S(c) (root: no own term; terminal: S = N·v)."""
    tree = searched[name].tree
    n = int(tree.nodes.num_nodes)
    S, N, v = tree.value_sum, tree.nodes.visits, tree.own_value
    if CONFIGS[name].token_budget is None:
        assert n > 1 + CONFIGS[name].num_children  # the search went below the root
    for node in range(n):
        kids = _kids(tree, node)
        assert len(kids) in (0, CONFIGS[name].num_children), node
        own_n, own_s = (0, 0.0) if node == 0 else (1, v[node])
        if tree.terminal[node]:
            assert not kids and N[node] >= 1
            np.testing.assert_allclose(S[node], N[node] * v[node], rtol=1e-5)
        else:
            assert N[node] == own_n + sum(N[c] for c in kids), node
            np.testing.assert_allclose(S[node], own_s + sum(S[c] for c in kids), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(MCTSTree.value.fget(tree))[:n], S[:n] / N[:n], rtol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nodes_are_steps_of_the_program(searched, lm, name):
    """Each child extends its parent's path by one step (ending at the delimiter, the end token or T), its
    stored log-prob is p₀'s, and its value is (1 − w)·r(rollout) + w·PRM(node)."""
    cfg, tree = CONFIGS[name], searched[name].tree
    log_init, log_trans = np.asarray(lm.log_init), np.asarray(lm.log_trans)
    for c in range(1, int(tree.nodes.num_nodes)):
        p = tree.nodes.parent[c]
        s, e = tree.position[p], tree.position[c]
        row = tree.tokens[c]
        np.testing.assert_array_equal(row[:s], tree.tokens[p][:s])
        assert s < e <= T
        closers = {DELIM} | ({cfg.end_token} if cfg.end_token is not None else set())
        assert row[e - 1] in closers or e == T
        assert not closers & set(row[s:e - 1].tolist())
        assert tree.terminal[c] == (e == T or row[e - 1] == cfg.end_token)
        lp = sum(log_init[row[t]] if t == 0 else log_trans[row[t - 1], row[t]] for t in range(s, e))
        np.testing.assert_allclose(tree.step_logp[c], lp, rtol=1e-5, atol=1e-5)
        r, u = np.mean(row == GOOD), np.sum(row[:e] == GOOD) / T
        np.testing.assert_allclose([tree.outcome[c], tree.process[c], tree.own_value[c]], [r, u, (1 - W) * r + W * u], atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_accounting(searched, name):
    """nfe = Σ_expansions k·(T − t), policy_tokens ≤ nfe (= without an end token), two verifier calls a node."""
    cfg, res = CONFIGS[name], searched[name]
    tree = res.tree
    expanded = [p for p in range(int(tree.nodes.num_nodes)) if _kids(tree, p)]
    assert int(res.nfe) == sum(cfg.num_children * (T - tree.position[p]) for p in expanded)
    assert int(res.verifier_calls) == 2 * (int(tree.nodes.num_nodes) - 1)
    if cfg.end_token is None:
        assert int(res.policy_tokens) == int(res.nfe)
    else:  # tokens after an end token are not drawn by the policy
        ends = sum(int(np.sum(np.cumsum(tree.tokens[c] == END) > (tree.tokens[c] == END))) for c in range(1, int(tree.nodes.num_nodes)))
        assert int(res.policy_tokens) == int(res.nfe) - ends


def test_budget_is_respected(searched):
    cfg, res = CONFIGS["budget"], searched["budget"]
    """The root's expansion spends the whole budget (k·T); the next expansion would not fit, so the search
    stops there (unless it only revisits terminal children, which costs no token)."""
    assert int(res.policy_tokens) == cfg.token_budget
    tree = res.tree
    assert bool(tree.stopped) or all(tree.terminal[c] for c in _kids(tree, 0))
    assert int(tree.nodes.num_nodes) == 1 + cfg.num_children
    unbounded = searched["puct"]
    assert int(unbounded.policy_tokens) > cfg.token_budget and int(unbounded.tree.nodes.iteration) == cfg.num_iterations


def test_answer_is_the_most_visited_path(searched):
    tree, answer = searched["puct"].tree, searched["puct"].answer
    node = 0
    while _kids(tree, node):
        kids = _kids(tree, node)
        node = max(kids, key=lambda c: (tree.nodes.visits[c], tree.value_sum[c] / tree.nodes.visits[c]))
    np.testing.assert_array_equal(answer, tree.tokens[node])


# --- hand-built trees -------------------------------------------------------------------------------------

def hand_tree(parents, values, visits, positions, tokens, logps=None) -> MCTSTree:
    """An MCTSTree with nodes 1.. under the given parents (node 0 the root), Q = values, N = visits."""
    C = len(parents) + 1
    nodes = tree_lib.empty(C, jnp.zeros(()))
    for p in parents:
        nodes, _ = tree_lib.add_child(nodes, jnp.asarray(p), jnp.zeros(()), 0.0)
    root_visits = sum(n for p, n in zip(parents, visits) if p == 0)
    visits = np.asarray([root_visits] + list(visits), np.int32)
    values = np.asarray([0.0] + list(values), np.float32)
    f = lambda a: jnp.asarray(a, jnp.float32)
    return MCTSTree(nodes._replace(visits=jnp.asarray(visits)), f(values * visits), f(values), f(values), f(values),
                    jnp.asarray([0] + list(positions), jnp.int32), f([0.0] + list(logps or [0.0] * len(parents))),
                    jnp.zeros(C, bool), jnp.asarray(np.vstack([np.zeros(T, int)] + list(tokens)), jnp.int32),
                    jnp.asarray(0), jnp.asarray(0), jnp.asarray(False))


def _select(tree, cfg):
    return int(tree_lib.gumbel_over_children(tree.nodes, jnp.asarray(0), jax.random.key(0),
                                             selection_scores(tree, jnp.asarray(0), cfg), noise=False))


def test_puct_follows_the_prior_at_zero_visits_and_uct_the_least_visited():
    rows = [np.zeros(T, int)] * 3
    prior = list(np.log([0.2, 0.7, 0.1]))
    zero = hand_tree([0, 0, 0], [0.0, 0.0, 0.0], [0, 0, 0], [1, 1, 1], rows, prior)
    assert _select(zero, BASE) == 2  # node 2 carries the prior 0.7
    equal = hand_tree([0, 0, 0], [0.5, 0.5, 0.5], [4, 4, 4], [1, 1, 1], rows, prior)
    assert _select(equal, BASE) == 2
    # a value gap larger than the exploration bonus wins over the prior
    better = hand_tree([0, 0, 0], [0.9, 0.1, 0.1], [4, 4, 4], [1, 1, 1], rows, prior)
    assert _select(better, dataclasses.replace(BASE, c_explore=0.1)) == 1
    uct = hand_tree([0, 0, 0], [0.5, 0.5, 0.5], [5, 1, 3], [1, 1, 1], rows, prior)
    assert _select(uct, dataclasses.replace(BASE, selection="uct")) == 2


def _row(*tokens):
    row = np.full(T, GOOD)
    row[:len(tokens)] = tokens
    return row


def test_step_preferences_on_a_hand_built_tree():
    # root → a [1 0] (0.9), b [2 3 0] (0.5), c [3 0] (0.45);  a → d [.. 1 0] (1.0), e [.. 1 0] (0.0, same step), f [.. 2 0] (0.2)
    rows = [_row(1, 0), _row(2, 3, 0), _row(3, 0), _row(1, 0, 1, 0), _row(1, 0, 1, 0), _row(1, 0, 2, 0)]
    tree = hand_tree([0, 0, 0, 1, 1, 1], [0.9, 0.5, 0.45, 1.0, 0.0, 0.2], [4, 1, 1, 1, 1, 1], [2, 3, 2, 4, 4, 4], rows)
    prefs = step_preferences(tree, margin=0.3)
    got = sorted((int(prefs.parent[m]), int(prefs.prefix_len[m]), tuple(prefs.chosen[m][:prefs.chosen_end[m]]),
                  tuple(prefs.rejected[m][:prefs.rejected_end[m]]), round(float(prefs.gap[m]), 4)) for m in range(len(prefs)))
    assert got == [(0, 0, (1, 0), (2, 3, 0), 0.4), (0, 0, (1, 0), (3, 0), 0.45), (1, 2, (1, 0, 1, 0), (1, 0, 2, 0), 0.8)]


def test_step_preferences_without_pairs_warn_and_return_empty():
    single = hand_tree([0], [0.5], [1], [2], [_row(1, 0)])
    with pytest.warns(UserWarning, match="no sibling pair"):
        prefs = step_preferences(single, margin=0.1)
    assert len(prefs) == 0 and prefs.chosen.shape == (0, T)
    ties = hand_tree([0, 0], [0.5, 0.5], [1, 1], [2, 2], [_row(1, 0), _row(2, 0)])
    with pytest.warns(UserWarning, match="no sibling pair"):
        assert len(step_preferences(ties, margin=0.1)) == 0


def test_preferences_of_a_search_respect_the_margin(searched):
    tree = searched["puct"].tree
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefs = step_preferences(tree, margin=0.05)
    q = tree.value_sum / np.maximum(tree.nodes.visits, 1)
    assert len(prefs) > 0 and np.all(prefs.gap >= 0.05)
    for m in range(len(prefs)):  # the pair's rows are the tokens of two children of prefs.parent, better first
        kids = _kids(tree, int(prefs.parent[m]))
        b = [c for c in kids if np.array_equal(tree.tokens[c], prefs.chosen[m])][0]
        w = [c for c in kids if np.array_equal(tree.tokens[c], prefs.rejected[m])][0]
        np.testing.assert_allclose(q[b] - q[w], prefs.gap[m], rtol=1e-5)


def test_bad_input(lm, searched):
    with pytest.raises(ValueError, match="not a token of the program's vocabulary"):
        mcts(jax.random.key(0), lm, reward, prm, dataclasses.replace(BASE, delimiter=V))
    with pytest.raises(ValueError, match="too small for one expansion"):
        mcts(jax.random.key(0), lm, reward, prm, dataclasses.replace(BASE, token_budget=3 * T - 1))
    with pytest.raises(ValueError, match="prm_weight"):
        mcts(jax.random.key(0), lm, reward, prm, dataclasses.replace(BASE, prm_weight=1.5))
    with pytest.raises(ValueError, match="outside its declared range"):
        check_values(searched["puct"].tree, dataclasses.replace(BASE, value_range=(0.0, 0.01)))
    check_values(searched["puct"].tree, dataclasses.replace(BASE, value_range=(0.0, 1.0)))
    with pytest.raises(ValueError, match="margin"):
        step_preferences(searched["puct"].tree, margin=-1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.0)


# --- DPO --------------------------------------------------------------------------------------------------

def _markov_step_logps(theta, seqs, masks):
    """log π(step | prefix) under a Markov policy with logits θ = (init [V], trans [V, V])."""
    init, trans = theta
    prev = jnp.concatenate([jnp.zeros_like(seqs[:, :1]), seqs[:, :-1]], axis=1)
    logits = jnp.where((jnp.arange(seqs.shape[1]) == 0)[None, :, None], init[None, None], trans[prev])
    return masked_log_prob(logits, seqs, masks)


def test_dpo_gradient_matches_finite_difference_on_the_markov_policy():
    """Central differences in float64 (step 1e-5: truncation ~1e-10, rounding ~1e-11) against jax.grad."""
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
        theta = (jax.random.normal(k1, (V,), jnp.float64), jax.random.normal(k2, (V, V), jnp.float64))
        ref = jax.tree_util.tree_map(lambda a: 0.5 * a + 0.1, theta)
        seqs = jax.random.randint(k3, (2, 5, T), 0, V)  # [chosen/rejected, M, T]
        masks = jnp.broadcast_to((jnp.arange(T) >= 2) & (jnp.arange(T) < 5), seqs.shape)  # the step: positions 2..4
        beta = 0.7

        def loss(th):
            pol, rf = (_markov_step_logps(x, seqs.reshape(-1, T), masks.reshape(-1, T)).reshape(2, -1) for x in (th, ref))
            return dpo_loss(pol[0], pol[1], rf[0], rf[1], beta)

        loss = jax.jit(loss)
        grad = jax.jit(jax.grad(loss))(theta)
        flat, unravel = jax.flatten_util.ravel_pytree(theta)
        eps = 1e-5
        fd = np.asarray([(loss(unravel(flat.at[i].add(eps))) - loss(unravel(flat.at[i].add(-eps)))) / (2 * eps)
                         for i in range(flat.size)])
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grad)[0], fd, rtol=1e-6, atol=1e-9)
        assert np.abs(fd).max() > 1e-3  # a non-trivial gradient


def test_dpo_optimum_matches_the_closed_form_on_two_options():
    """Pairs (a ≻ b) with weight q and (b ≻ a) with 1 − q: at the optimum
    log π(a)/π(b) = log π_ref(a)/π_ref(b) + logit(q)/β (module docstring of pplalign.vi.dpo)."""
    q, beta = 0.8, 0.5
    log_ref = jnp.log(jnp.asarray([0.3, 0.7]))

    def loss(theta):
        lp = jax.nn.log_softmax(theta)
        chosen, rejected = jnp.asarray([lp[0], lp[1]]), jnp.asarray([lp[1], lp[0]])
        return dpo_loss(chosen, rejected, log_ref[jnp.asarray([0, 1])], log_ref[jnp.asarray([1, 0])], beta,
                        weights=jnp.asarray([q, 1 - q]))

    opt = optax.adam(0.05)

    def step(c, _):
        theta, s = c
        g = jax.grad(loss)(theta)
        u, s = opt.update(g, s)
        return (optax.apply_updates(theta, u), s), None

    theta0 = jnp.zeros(2)
    (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=3000)
    want = float(log_ref[0] - log_ref[1]) + float(np.log(q / (1 - q))) / beta
    np.testing.assert_allclose(float(theta[0] - theta[1]), want, atol=1e-3)
    h = dpo_logits(jax.nn.log_softmax(theta)[0], jax.nn.log_softmax(theta)[1], log_ref[0], log_ref[1], beta)
    np.testing.assert_allclose(float(jax.nn.sigmoid(h)), q, atol=1e-4)  # σ(h) = q at the optimum


# --- the arithmetic loop ------------------------------------------------------------------------------------

def test_quick_experiment_runs(tmp_path, capsys):
    from experiments import mcts_dpo

    mcts_dpo.main(["--quick", "--out", str(tmp_path), "--quiet"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("on_policy", "offline"):
        s = last["summary"][mode]
        assert len(s["greedy_accuracy"]["mean"]) == last["config"]["iterations"] + 1
        assert all(0.0 <= a <= 1.0 for m in ("greedy_accuracy", "sample_accuracy") for a in s[m]["mean"])
        assert all(p > 0 for p in s["pairs"])  # MCTS found step pairs on the arithmetic LM
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "table.md").exists()
