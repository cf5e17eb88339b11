"""Monte Carlo tree search over reasoning *steps* and the step-level preferences it yields (MCTS-DPO:
Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning").

A node is a partial solution that ends at a step boundary: the program state after the drawn tokens
x_0..x_{t−1}, where a step ends at the *delimiter* token (``MCTSConfig.delimiter``), at the end token, or at the
horizon T = ``base.num_steps``. The root is ``base.init(key)`` (the prompt, nothing drawn). Any
:class:`~pplalign.Sequential` with a finite-support transition (tokens) whose steps are delimited by a token
works: the arithmetic LM of :mod:`models.lm.reasoning` (delimiter ``;``), a Hugging Face LM (newline).

Value of a node. When node c is created, one rollout continues it to a finished x with p₀, and

    v(c) = (1 − w)·r(x) + w·u(c),

the outcome reward r of the rollout (an exact checker on training problems, an outcome verifier at test time)
blended with the process reward u(c) of the partial solution itself (a PRM; MCTS-DPO blends the outcome with
the model's self-evaluation of the step), w = ``prm_weight``. The backed-up value of a node is the mean of
every evaluation made in its subtree,

    Q(n) = S(n) / N(n),     S(n) = Σ_{evaluations e below or at n} v_e,     N(n) = number of them,

so a non-terminal node satisfies N(n) = 1 + Σ_c N(c) and S(n) = v(n) + Σ_c S(c) (its own creating evaluation
plus its children's), the root N = Σ_c N(c), and a terminal node, re-evaluated each time it is selected,
has S = N·v.

One iteration (one compiled ``lax.while_loop`` body):

1. **select** from the root, while the node has children, the child maximising (``selection``)

   * ``"puct"`` — Q(c) + c·P(c)·√N(n) / (1 + N(c)), with the policy prior P(c) = p₀(step_c | x_n) normalised
     over n's children (AlphaZero's rule, as MCTS-DPO uses it);
   * ``"uct"`` — Q(c) + c·√(ln N(n) / N(c)) (UCB1, Kocsis & Szepesvári 2006);

2. **expand** the selected node with k = ``num_children`` steps drawn from p₀ (one batched draw), each rolled
   out to the horizon and evaluated as above; a selected *terminal* node is re-evaluated instead (its stored
   value, no model call);
3. **back up** the k new values along the path to the root (S += Σ v, N += k).

Budget. ``num_iterations`` iterations (the tree holds 1 + k·num_iterations nodes); with ``token_budget`` an
iteration runs only if its worst case (k·(T − t) tokens below a node at position t) still fits, so
``policy_tokens ≤ token_budget`` always, and a budget below one root expansion (k·T) is a ``ValueError``.

Accounting, as the other reasoning searches report it: ``nfe`` counts transitions (k·(T − t) per expansion,
the rollouts run to the horizon so that any program's ``output`` is defined), ``policy_tokens`` the tokens
drawn before and including the end token (all transitions when ``end_token`` is None), ``verifier_calls``
one call of the PRM per new node (if w > 0) plus one outcome reward per rollout (if w < 1).

Entry points::

    mcts(key, base, reward, prm, config) -> MCTSResult
        base:    a Sequential with Categorical transitions; x_t are token ids.
        reward:  reward(base.output(final_state)) -> [] outcome reward of a finished rollout.
        prm:     prm(state, t) -> [] process reward of the partial solution whose last token is x_t
                 (``None`` when prm_weight == 0).
        config:  MCTSConfig (static: delimiter, end_token, num_children, num_iterations, selection,
                 c_explore, prm_weight, token_budget, value_range).
      MCTSResult.answer [T]         the answer: descend by most visits (ties: higher Q) to a node without
                                    children and take its tokens (its own path, completed by its rollout);
      MCTSResult.tree               the MCTSTree (for step_preferences, rollouts);
      MCTSResult.policy_tokens / verifier_calls / nfe   [] int32.

    rollouts(tree) -> (tokens [C, T], value [C], valid [C]): every evaluated completion, e.g. for a vote.
    step_preferences(tree, margin) -> StepPreferences: sibling pairs whose Q differ by ≥ margin.

``mcts`` jits and vmaps (one tree per prompt); outside a trace it also checks the values it saw
(:func:`check_values`: finite, inside ``value_range``), which a vmapped caller does itself.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import check_count, check_distribution, check_key
from ..programs import is_sequential
from . import tree as tree_lib
from .tree import NO_NODE, ROOT, Tree

__all__ = ["MCTSConfig", "MCTSTree", "MCTSResult", "StepPreferences", "mcts", "check_values", "rollouts",
           "selection_scores", "step_preferences", "SELECTIONS"]

SELECTIONS = ("puct", "uct")


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    """Static settings (hashable: part of the compile key).

    delimiter:      the token that closes a reasoning step (required).
    end_token:      the token that ends a solution (closes its last step; later transitions are not tokens).
    num_children:   k, steps drawn per expansion.
    num_iterations: iterations (select, expand, back up).
    selection:      "puct" (policy prior) or "uct".
    c_explore:      the exploration constant c of the selection rule, in units of the value.
    prm_weight:     w in v = (1 − w)·r(rollout) + w·PRM(node), in [0, 1].
    token_budget:   optional cap on policy_tokens (≥ k·T, one expansion of the root).
    value_range:    optional (low, high) the reward and the PRM are declared to lie in (checked after a run).
    """

    delimiter: int
    end_token: Optional[int] = None
    num_children: int = 4
    num_iterations: int = 16
    selection: str = "puct"
    c_explore: float = 1.0
    prm_weight: float = 0.5
    token_budget: Optional[int] = None
    value_range: Optional[tuple] = None

    def validate(self, num_steps: int, vocab_size: int) -> None:
        for name in ("delimiter",) + (("end_token",) if self.end_token is not None else ()):
            token = getattr(self, name)
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab_size:
                raise ValueError(f"{name} {token!r} is not a token of the program's vocabulary of {vocab_size}")
        check_count(self.num_children, "num_children")
        check_count(self.num_iterations, "num_iterations")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {self.selection!r}")
        if not (self.c_explore >= 0 and math.isfinite(self.c_explore)):
            raise ValueError(f"c_explore must be finite and >= 0; got {self.c_explore}")
        if not 0.0 <= self.prm_weight <= 1.0:
            raise ValueError(f"prm_weight must lie in [0, 1]; got {self.prm_weight}")
        if self.token_budget is not None:
            one = self.num_children * num_steps
            if check_count(self.token_budget, "token_budget") < one:
                raise ValueError(f"token_budget {self.token_budget} is too small for one expansion of the root "
                                 f"({self.num_children} children × {num_steps} steps = {one} tokens)")
        if self.value_range is not None:
            low, high = self.value_range
            if not low < high:
                raise ValueError(f"value_range must be (low, high) with low < high; got {self.value_range}")

    @property
    def capacity(self) -> int:
        return 1 + self.num_children * self.num_iterations


class MCTSTree(NamedTuple):
    """The search tree: ``nodes`` holds the structure, visit counts N and program states (the fixed-capacity
    :class:`~pplalign.search.tree.Tree`; its ``level`` counts steps, ``nfe`` transitions, ``log_value`` is
    unused); the other per-node fields have the capacity axis first.

    value_sum:  S(n), the sum of the evaluations below or at n (Q = S/N, :attr:`value`).
    own_value:  v(n) of the node's creating evaluation.
    outcome:    r of its rollout;  process: u(n), its PRM value (0 when w = 0).
    position:   tokens drawn up to the end of the node's step (0 at the root).
    step_logp:  log p₀(step | parent's prefix).
    terminal:   the node's step ended the solution (end token or horizon).
    tokens:     [capacity, T] the node's path x_{<position} followed by its rollout's tokens.
    policy_tokens, verifier_calls: [] int32 totals;  stopped: [] bool, the token budget ended the search.
    """

    nodes: Tree
    value_sum: jax.Array
    own_value: jax.Array
    outcome: jax.Array
    process: jax.Array
    position: jax.Array
    step_logp: jax.Array
    terminal: jax.Array
    tokens: jax.Array
    policy_tokens: jax.Array
    verifier_calls: jax.Array
    stopped: jax.Array

    @property
    def value(self) -> jax.Array:
        """Q(n) = S(n)/N(n) (0 for unvisited slots)."""
        visits = self.nodes.visits
        return jnp.where(visits > 0, self.value_sum / jnp.maximum(visits, 1), 0.0)


class MCTSResult(NamedTuple):
    answer: jax.Array  # [T] tokens of the robust-descent answer
    tree: MCTSTree
    policy_tokens: jax.Array
    verifier_calls: jax.Array
    nfe: jax.Array


class StepPreferences(NamedTuple):
    """M (prefix, better step, worse step) pairs. Row m of ``chosen`` holds the prefix x_{<prefix_len} and then
    the better step up to ``chosen_end`` (later entries belong to its rollout, not to the pair); likewise
    ``rejected``. ``gap`` = Q(better) − Q(worse) ≥ margin; ``parent`` the node whose children they are."""

    prefix_len: np.ndarray  # [M]
    chosen: np.ndarray  # [M, T]
    chosen_end: np.ndarray  # [M]
    rejected: np.ndarray  # [M, T]
    rejected_end: np.ndarray  # [M]
    gap: np.ndarray  # [M]
    parent: np.ndarray  # [M]

    def __len__(self) -> int:
        return int(self.prefix_len.shape[0])


# --------------------------------------------------------------------------------------------------
# selection


def selection_scores(tree: MCTSTree, node, config: MCTSConfig):
    """score_fn(child) of the selection rule at ``node`` (see the module docstring)."""
    n = tree.nodes
    q = tree.value
    # N(n) ≥ 1 in the exploration terms: at zero visits PUCT still follows the prior (and UCT the unvisited)
    parent_visits = jnp.maximum(n.visits[node], 1).astype(jnp.float32)
    c = config.c_explore
    if config.selection == "puct":
        log_norm = tree_lib.children_logsumexp(n, node, value_of=lambda ch: tree.step_logp[ch])
        return lambda ch: q[ch] + c * jnp.exp(tree.step_logp[ch] - log_norm) * jnp.sqrt(parent_visits) / (
            1.0 + n.visits[ch])
    return lambda ch: q[ch] + jnp.where(n.visits[ch] == 0, jnp.inf, c * jnp.sqrt(jnp.log(parent_visits) / jnp.maximum(n.visits[ch], 1)))


def _argmax_child(tree: MCTSTree, node, score_fn):
    return tree_lib.gumbel_over_children(tree.nodes, node, jax.random.key(0), score_fn, noise=False)


def _descend(tree: MCTSTree, config: MCTSConfig, score_of=None):
    """Follow the selection rule (or ``score_of(tree, node)``) from the root to a node without children."""
    score_of = score_of or (lambda t, node: selection_scores(t, node, config))

    def body(node):
        return _argmax_child(tree, node, score_of(tree, node))

    return jax.lax.while_loop(lambda node: tree.nodes.first_child[node] != NO_NODE, body, jnp.asarray(ROOT, jnp.int32))


# --------------------------------------------------------------------------------------------------
# expansion: one step drawn from p₀ and rolled out to the horizon


class _Child(NamedTuple):
    state: Any  # the program state at the end of the step
    position: jax.Array
    step_logp: jax.Array
    terminal: jax.Array
    tokens: jax.Array  # [T] path, step and rollout
    final: Any  # the program state at the horizon
    num_tokens: jax.Array  # tokens drawn (before and including the end token)


def _draw_step(key, base, state, start, tokens, config: MCTSConfig) -> _Child:
    T = base.num_steps
    end = -1 if config.end_token is None else config.end_token

    def body(c):
        t, st, saved, in_step, pos, logp, toks, count, ended, term = c
        d = check_distribution(base.transition(st, t), "base.transition")
        x = d.sample(jax.random.fold_in(key, t)).astype(jnp.int32)
        lp = d.log_prob(x)
        st = base.update(st, x, t)
        is_end = x == end
        closes = in_step & ((x == config.delimiter) | is_end | (t == T - 1))
        saved = jax.tree_util.tree_map(lambda new, old: jnp.where(closes, new, old), st, saved)
        return (t + 1, st, saved, in_step & ~closes, jnp.where(closes, t + 1, pos),
                logp + jnp.where(in_step, lp, 0.0), toks.at[t].set(x), count + (~ended).astype(jnp.int32),
                ended | is_end, jnp.where(closes, is_end | (t == T - 1), term))

    init = (start, state, state, jnp.asarray(True), start, jnp.asarray(0.0, jnp.float32), tokens,
            jnp.asarray(0, jnp.int32), jnp.asarray(False), jnp.asarray(False))
    _, final, saved, _, pos, logp, toks, count, _, term = jax.lax.while_loop(lambda c: c[0] < T, body, init)
    return _Child(saved, pos, logp, term, toks, final, count)


def _evaluate(base, reward, prm, child: _Child, config: MCTSConfig):
    """(v, r, u) of a new node; the blend's unused term is not computed (nor counted as a verifier call)."""
    w = config.prm_weight
    zero = jnp.asarray(0.0, jnp.float32)
    r = jnp.asarray(reward(base.output(child.final)), jnp.float32) if w < 1 else zero
    u = jnp.asarray(prm(child.state, child.position - 1), jnp.float32) if w > 0 else zero
    if r.shape != () or u.shape != ():
        raise ValueError(f"reward and prm must return scalars; got shapes {r.shape} and {u.shape}")
    return (1 - w) * r + w * u, r, u


def _add_to_path(tree: MCTSTree, node, value_sum, visits) -> MCTSTree:
    def body(c):
        n, vs, vis = c
        return tree.nodes.parent[n], vs.at[n].add(value_sum), vis.at[n].add(visits)

    _, vs, vis = jax.lax.while_loop(lambda c: c[0] != NO_NODE, body, (node, tree.value_sum, tree.nodes.visits))
    return tree._replace(value_sum=vs, nodes=tree.nodes._replace(visits=vis))


def _expand(key, base, reward, prm, tree: MCTSTree, node, config: MCTSConfig) -> MCTSTree:
    k = config.num_children
    state = jax.tree_util.tree_map(lambda a: a[node], tree.nodes.states)
    start = tree.position[node]
    children = jax.vmap(lambda kk: _draw_step(kk, base, state, start, tree.tokens[node], config))(jax.random.split(key, k))
    v, r, u = jax.vmap(lambda ch: _evaluate(base, reward, prm, ch, config))(children)
    level = tree.nodes.level[node]

    def add(j, t: MCTSTree) -> MCTSTree:
        pick = lambda a: a[j]
        nodes, idx = tree_lib.add_child(t.nodes, node, jax.tree_util.tree_map(pick, children.state), 0.0, level)
        return t._replace(nodes=nodes, value_sum=t.value_sum.at[idx].set(v[j]), own_value=t.own_value.at[idx].set(v[j]),
                          outcome=t.outcome.at[idx].set(r[j]), process=t.process.at[idx].set(u[j]),
                          position=t.position.at[idx].set(children.position[j]),
                          step_logp=t.step_logp.at[idx].set(children.step_logp[j]),
                          terminal=t.terminal.at[idx].set(children.terminal[j]),
                          tokens=t.tokens.at[idx].set(children.tokens[j]))

    tree = jax.lax.fori_loop(0, k, add, tree)
    calls = k * ((config.prm_weight < 1) + (config.prm_weight > 0))
    tree = tree._replace(nodes=tree.nodes._replace(nfe=tree.nodes.nfe + k * (base.num_steps - start)),
                         policy_tokens=tree.policy_tokens + children.num_tokens.sum(),
                         verifier_calls=tree.verifier_calls + calls)
    return _add_to_path(tree, node, v.sum(), k)


def _revisit(tree: MCTSTree, node) -> MCTSTree:
    """A selected terminal node: its evaluation is repeated from the stored value (no model call)."""
    return _add_to_path(tree, node, tree.own_value[node], 1)


# --------------------------------------------------------------------------------------------------
# the search


def _empty(base, key, config: MCTSConfig) -> MCTSTree:
    C, T = config.capacity, base.num_steps
    state = base.init(key)
    nodes = tree_lib.empty(C, state)
    nodes = nodes._replace(states=jax.tree_util.tree_map(lambda buf, leaf: buf.at[ROOT].set(leaf), nodes.states, state))
    f32, i32 = jnp.zeros((C,), jnp.float32), jnp.zeros((C,), jnp.int32)
    zero = jnp.asarray(0, jnp.int32)
    return MCTSTree(nodes, f32, f32, f32, f32, i32, f32, jnp.zeros((C,), bool), jnp.zeros((C, T), jnp.int32),
                    zero, zero, jnp.asarray(False))


def _search(key, base, reward, prm, config: MCTSConfig) -> MCTSTree:
    T = base.num_steps
    budget = config.token_budget

    def body(c):
        i, tree = c
        node = _descend(tree, config)
        worst = config.num_children * (T - tree.position[node])
        fits = jnp.asarray(True) if budget is None else tree.policy_tokens + worst <= budget
        grow = lambda t: jax.lax.cond(t.terminal[node], lambda s: _revisit(s, node),
                                      lambda s: _expand(jax.random.fold_in(key, i + 1), base, reward, prm, s, node, config), t)
        tree = jax.lax.cond(fits, grow, lambda t: t._replace(stopped=jnp.asarray(True)), tree)
        return i + 1, tree._replace(nodes=tree.nodes._replace(iteration=tree.nodes.iteration + fits.astype(jnp.int32)))

    cond = lambda c: (c[0] < config.num_iterations) & ~c[1].stopped
    return jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), _empty(base, jax.random.fold_in(key, 0), config)))[1]


def _robust_score(tree: MCTSTree, node):
    # visits first; among equal visits the higher Q (tanh keeps the tie-break below one visit)
    return lambda ch: tree.nodes.visits[ch] + 0.25 * (1.0 + jnp.tanh(tree.value[ch]))


def _check_program(base, config: MCTSConfig) -> None:
    if not is_sequential(base):
        raise ValueError(f"base must be a Sequential program (num_steps, init, transition, update, output); "
                         f"got {type(base).__name__}")
    shape = jax.eval_shape(lambda: base.transition(base.init(jax.random.key(0)), 0))
    logits = getattr(shape, "logits", None)
    if logits is None:
        raise ValueError("MCTS over steps needs a finite-support (Categorical) transition: its tokens are the steps")
    config.validate(base.num_steps, logits.shape[-1])


def mcts(key: jax.Array, base, reward, prm, config: MCTSConfig) -> MCTSResult:
    """MCTS over the reasoning steps of ``base`` (see the module docstring). Jittable and vmappable; called
    eagerly it also raises ``ValueError`` on non-finite or out-of-range values (:func:`check_values`)."""
    check_key(key)
    _check_program(base, config)
    if prm is None and config.prm_weight > 0:
        raise ValueError("prm_weight > 0 needs a prm(state, t)")
    tree = _search(key, base, reward, prm, config)
    leaf = _descend(tree, config, _robust_score)
    result = MCTSResult(tree.tokens[leaf], tree, tree.policy_tokens, tree.verifier_calls, tree.nodes.nfe)
    if not isinstance(tree.policy_tokens, jax.core.Tracer):
        check_values(tree, config)
    return result


def _used(tree: MCTSTree) -> np.ndarray:
    """[C] bool, slots that hold an evaluated node (the root holds none)."""
    idx = np.arange(np.asarray(tree.nodes.parent).shape[-1])
    return (idx > ROOT) & (idx < int(np.asarray(tree.nodes.num_nodes)))


def check_values(tree: MCTSTree, config: MCTSConfig) -> None:
    """``ValueError`` if a reward or PRM value the search saw was non-finite or outside ``value_range``
    (one tree; index a vmapped result first)."""
    used = _used(tree)
    w = config.prm_weight
    for name, values, active in (("reward", tree.outcome, w < 1), ("prm", tree.process, w > 0)):
        vals = np.asarray(values)[used]
        if not active or vals.size == 0:
            continue
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"the {name} returned non-finite values ({vals[~np.isfinite(vals)][:3]})")
        if config.value_range is not None:
            low, high = config.value_range
            bad = vals[(vals < low) | (vals > high)]
            if bad.size:
                raise ValueError(f"the {name} returned {bad[:3]} outside its declared range [{low}, {high}]")


def rollouts(tree: MCTSTree):
    """(tokens [C, T], value v [C], valid [C]): every completion the search evaluated (one per node)."""
    return tree.tokens, tree.own_value, jnp.asarray(_used(tree))


# --------------------------------------------------------------------------------------------------
# step-level preference pairs


def step_preferences(tree: MCTSTree, margin: float) -> StepPreferences:
    """Every ordered pair of siblings (b, w) with Q(b) − Q(w) ≥ ``margin``: the shared prefix is their parent's
    path, the better step b's, the worse w's (MCTS-DPO's step-level preference data). Siblings with the same
    step tokens are skipped (a step is not preferable to itself). One tree (index a vmapped result first).

    A tree without such a pair (no node with two children, or every gap below the margin) gives an empty
    result and a ``UserWarning``."""
    margin = float(margin)
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be finite and >= 0; got {margin}")
    nodes = jax.tree_util.tree_map(np.asarray, tree.nodes._replace(states=None))
    q = np.asarray(tree.value)
    pos, toks = np.asarray(tree.position), np.asarray(tree.tokens)
    used = _used(tree)
    rows = []
    for parent in range(int(nodes.num_nodes)):
        kids = [c for c in np.flatnonzero(used & (nodes.parent == parent))]
        start = pos[parent]
        for b in kids:
            for w in kids:
                if b == w or q[b] <= q[w] or q[b] - q[w] < margin:
                    continue
                same = pos[b] == pos[w] and np.array_equal(toks[b, start:pos[b]], toks[w, start:pos[w]])
                if not same:
                    rows.append((start, b, w, q[b] - q[w], parent))
    T = toks.shape[-1]
    if not rows:
        warnings.warn(f"step_preferences: no sibling pair differs by the margin {margin}; no preference data",
                      UserWarning, stacklevel=2)
        z = np.zeros((0,), np.int32)
        return StepPreferences(z, np.zeros((0, T), np.int32), z, np.zeros((0, T), np.int32), z,
                               np.zeros((0,), np.float32), z)
    start, b, w, gap, parent = (np.asarray(col) for col in zip(*rows))
    return StepPreferences(start.astype(np.int32), toks[b], pos[b].astype(np.int32), toks[w], pos[w].astype(np.int32),
                           gap.astype(np.float32), parent.astype(np.int32))
