"""Diffusion Tree Sampling (DTS) and its greedy variant DTS* (Jain et al. 2025), compiled and resumable.

Target: σ(x) ∝ p₀(x)·exp(r(x)/β) for a :class:`~pplalign.Sequential` program p₀ (a diffusion sampler: level
ℓ of the tree holds x after ℓ − 1 reverse steps). The tree's nodes are states drawn from p₀; the value of a
node estimates the soft value log ψ(x_n) = log E_{p₀}[exp(r(x)/β) | x_n] by the soft Bellman backup

    Ŵ_leaf = exp(r(x)/β),     Ŵ_n = (1/m_n) Σ_{c ∈ children(n)} Ŵ_c      (stored as log Ŵ),

so the root's β·log Ŵ estimates β·log Z. One iteration (:func:`step`, one compiled function):

1. **select**: from the root, at node n with m_n children and N_n visits, *widen* (stop here) if
   m_n < C·(N_n + 1)^α (progressive widening); otherwise move to a child chosen by the variant's rule;
2. **expand**: draw a new child of n from p₀(· | x_n) (from ``base.init`` at the virtual root);
3. **roll out** to a finished object with p₀, adding every visited state as a node (one transition
   evaluation — one NFE — per step);
4. **back up** the leaf value r/β along the path with the log-mean-exp above, and count the visits.

Selection rules (``variant``):

* ``"published"`` — DTS as published: Boltzmann selection over children ∝ exp(log Ŵ_c) (= exp(v̂_c/β)).
  Because visits follow the values, progressive widening makes m_n depend on the values of n's own
  descendants; the plain mean of a value-dependent number of children is biased (a node whose first
  children look poor is rarely revisited and keeps its low estimate), and the samples under-tilt.
* ``"consistent"`` — growth that never reads the tree's values: Boltzmann selection ∝ exp(h(x_c)) on a
  heuristic twist h that is a function of the child's state alone (e.g. r(denoised mean)/β, the FK-steering
  potential), or uniform (ancestral) selection without one. Then m_n depends only on n's own state, its
  ancestors and its siblings — never on its descendants — so, given the tree's shape, each child is an
  i.i.d. p₀ draw whose estimate is (inductively) unbiased, and Ŵ_n is an *unbiased* estimate of ψ(x_n):
  E[Ŵ_root] = Z exactly. The tree's tilted leaf measure Σ_ℓ exp(r_ℓ/β) ∏_{a<ℓ} (1/m_a) is then a nested
  importance sampler of σ, consistent as the tree grows (every m_a → ∞ under progressive widening).
* ``"twisted"`` — value-blind growth that uses a twist ψ̃ (``twist=``, a guess of the soft value: the
  reward of the denoised mean, the exact soft value on a testbed, or one fitted on earlier, independent
  trees) in three places, as SMC uses its potentials: Boltzmann selection ∝ ψ̃(x_c) among the live children,
  and, in a *branching* rollout below the expanded node (:func:`_expand_twisted`), **Russian roulette and
  splitting** against a weight window: a new node c gets the score s = log ψ̃(x_c) − log ρ (ρ: its parent's
  window level); if s < 0 it survives with probability p_c = e^s, else it is split into
  k_c = min(max_split, ⌊e^s + U⌋) children grown in the same iteration. A killed node has value 0 and no
  children (its rollout ends, saving its NFE); a survivor's value carries 1/p_c:

      Ŵ_n = (1/(m_n·p_n)) Σ_{c live} Ŵ_c        (p_n = 1 for nodes the roulette did not touch).

  Why this stays unbiased: p_c and k_c are functions of the states on c's path and of node counts fixed
  before c was created; an iteration reaching a node whose children are all dead stops there (a visit, no
  NFE) instead of widening because of it; a split is capped by the iteration's node budget so that no planned
  child is ever dropped. So m_n never depends on n's descendants. Given x_c and everything outside c's
  subtree, E[1{c survives}·Ŵ_c/p_c] = ψ(x_c), hence by induction E[Ŵ_n | x_n] = ψ(x_n) and E[Ŵ_root] = Z.
  The tree's leaf measure exp(r_ℓ/β)∏_a 1/(m_a p_a) (which :func:`sample_tree` draws from) is an unbiased
  random measure for p₀·exp(r/β); pooling independent trees k with weights ∝ Ŵ_root,k (as islands of SMC
  are combined) is consistent as the number of trees grows, and one tree is consistent as its root's
  children grow. ψ̃ only moves the variance and the cost: with ψ̃ = the exact soft value the leaves carry
  nearly equal weights (twisted SMC's genealogy, grown one family per iteration); a ψ̃ that over-states
  differences splits often, and each iteration then spends up to its budget of 64·(T + 1) nodes.
* DTS* (``greedy=True``): UCT selection argmax_c log Ŵ_c + c_uct·√(log N_n / N_c) and, for the output,
  greedy descent argmax_c log Ŵ_c (a mode-seeking search for high reward).

Sampling from a built tree costs no model evaluation: descend from the root choosing children ∝ exp(log Ŵ_c)
(:func:`sample_tree`), which draws leaf ℓ with probability exp(r_ℓ/β)∏_a(1/m_a)/Ŵ_root.

NFE (``tree.nfe``) counts transition evaluations; ``base.init`` and the twist/reward are not counted (as in
:func:`pplalign.smc`). Iteration k draws its randomness from ``fold_in(key, k)``, so a tree saved after k
iterations and resumed with the same key continues exactly as if never stopped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._filter_jit import filter_jit
from .._numerics import sanitize_log as _sanitize
from .._validation import check_count, check_distribution, check_key, refuse_traced
from ..particles import Particles, mark_invalid_beta
from ..programs import Tilted, is_sequential, validate_beta
from . import tree as tree_lib
from .fingerprint import check_setup, setup_components, setup_stamp
from .tree import NO_NODE, ROOT, Tree

__all__ = ["DTSConfig", "init", "step", "run", "sample_tree", "greedy_leaf", "dts", "nodes_needed", "check_stochastic"]

VARIANTS = ("published", "consistent", "twisted")


@dataclasses.dataclass(frozen=True)
class DTSConfig:
    """Static configuration (hashable; part of the compile key and of a checkpoint's fingerprint).

    variant:        "published", "consistent" or "twisted" (see the module docstring).
    greedy:         DTS* (UCT selection, greedy output).
    widening_c, widening_alpha: progressive widening, widen while m_n < C·(N_n + 1)^α.
    uct_c:          exploration constant of DTS*'s UCT score (in units of log Ŵ, i.e. reward/β).
    max_split:      variant "twisted": the most children a node is split into at creation (1: roulette only).
    """

    variant: str = "published"
    greedy: bool = False
    widening_c: float = 1.0
    widening_alpha: float = 0.5
    uct_c: float = 1.0
    max_split: int = 8

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {self.variant!r}")
        if not (self.widening_c > 0 and math.isfinite(self.widening_c)):
            raise ValueError(f"widening_c must be finite and > 0; got {self.widening_c}")
        if not 0.0 < self.widening_alpha <= 1.0:
            raise ValueError(f"widening_alpha must lie in (0, 1]; got {self.widening_alpha}")
        if isinstance(self.max_split, bool) or not isinstance(self.max_split, int) or self.max_split < 1:
            raise ValueError(f"max_split must be an int >= 1; got {self.max_split!r}")
        if not (self.uct_c >= 0 and math.isfinite(self.uct_c)):
            raise ValueError(f"uct_c must be finite and >= 0; got {self.uct_c}")
        if self.greedy and self.variant != "published":
            raise ValueError(f"greedy (DTS*) uses the tree's values to select; it has no {self.variant!r} variant")


def nodes_needed(num_steps: int, num_iterations: int) -> int:
    """Worst-case nodes for ``num_iterations`` iterations: the root plus T + 1 new nodes per iteration
    (an expansion at the root adds an initial state and T stepped states)."""
    return 1 + num_iterations * (num_steps + 1)


def _scalar(value, what: str):
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(f"{what} must return a scalar per state; got shape {value.shape}")
    return value


# --------------------------------------------------------------------------------------------------
# one iteration
# --------------------------------------------------------------------------------------------------


def _widen(tree: Tree, node, config: DTSConfig):
    """Progressive widening: widen while m_n < C·(N_n + 1)^α (the +1 counts the current visit)."""
    limit = config.widening_c * jnp.power(tree.visits[node].astype(jnp.float32) + 1.0, config.widening_alpha)
    return tree.num_children[node].astype(jnp.float32) < limit


def _choose(tree: Tree, node, key, config: DTSConfig):
    if config.greedy:
        log_n = jnp.log(tree.visits[node].astype(jnp.float32) + 1.0)
        score = lambda c: tree.log_value[c] + config.uct_c * jnp.sqrt(log_n / jnp.maximum(tree.visits[c], 1))
        return tree_lib.gumbel_over_children(tree, node, key, score, noise=False)
    if config.variant == "consistent":
        return tree_lib.gumbel_over_children(tree, node, key, lambda c: tree.heuristic[c])
    if config.variant == "twisted":  # Boltzmann on the twist among the children the roulette kept
        power = 1.0
        alive = lambda c: jnp.where(tree.log_survival[c] > -jnp.inf, power * tree.heuristic[c], -jnp.inf)
        return tree_lib.gumbel_over_children(tree, node, key, alive)
    return tree_lib.select_child(tree, node, key)


def _descend(tree: Tree, key, config: DTSConfig, leaf_level: int):
    """Walk from the root to the node to widen; returns (node, expand?). Stops without expanding at a leaf,
    and (variant "twisted") at a node that does not widen and whose children the roulette all killed."""

    def cond(c):
        return ~c[1]

    def body(c):
        node, _, depth, _ = c
        at_leaf = tree.level[node] == leaf_level
        widen = (~at_leaf) & _widen(tree, node, config)
        child = _choose(tree, node, jax.random.fold_in(key, depth), config)
        dead_end = (~at_leaf) & (~widen) & (child != NO_NODE) & (tree.log_survival[jnp.maximum(child, 0)] == -jnp.inf)
        stop = at_leaf | widen | (child == NO_NODE) | dead_end
        return jnp.where(stop, node, child), stop, depth + 1, dead_end

    init = (jnp.asarray(ROOT, jnp.int32), jnp.asarray(False), jnp.asarray(0), jnp.asarray(False))
    node, _, _, dead_end = jax.lax.while_loop(cond, body, init)
    return node, (tree.level[node] < leaf_level) & ~dead_end


def _new_child(target: Tilted, twist, tree: Tree, node, level, key, config: DTSConfig):
    """Draw one child state of ``node``: from init at the root, else from the transition (one NFE).
    Returns (state, heuristic, log_value-if-leaf, nfe increment, nonfinite)."""
    base = target.base
    num_steps = target.num_steps
    parent_state = jax.tree_util.tree_map(lambda buf: buf[node], tree.states)
    use_twist = twist is not None and config.variant in ("consistent", "twisted") and not config.greedy

    def from_init(_):
        return base.init(key), jnp.asarray(0, jnp.int32)

    def from_transition(_):
        t = level - 1
        x = check_distribution(base.transition(parent_state, t), "transition").sample(key)
        return base.update(parent_state, x, t), jnp.asarray(1, jnp.int32)

    state, nfe = jax.lax.cond(level == 0, from_init, from_transition, None)
    t = level - 1  # the step that produced the child (−1: init)
    is_leaf = level + 1 == num_steps + 1
    reward, bad_r = _sanitize(_scalar(target.log_potential(base.output(state)), "reward"))
    leaf_value = jnp.where(is_leaf, reward, -jnp.inf)
    bad = is_leaf & bad_r
    if use_twist and config.variant == "twisted":  # scored at every level, t = −1 for the initial state
        h, bad_h = _sanitize(_scalar(twist(state, t), "twist"))
        h = jnp.where(is_leaf, reward, h)
        bad = bad | (~is_leaf & bad_h)
    elif use_twist:
        h, bad_h = _sanitize(_scalar(twist(state, jnp.maximum(t, 0)), "twist"))
        h = jnp.where(t < 0, 0.0, jnp.where(is_leaf, reward, h))
        bad = bad | ((t >= 0) & ~is_leaf & bad_h)
    else:
        h = jnp.zeros((), jnp.float32)
    return state, h, leaf_value, nfe, bad


def _expand_and_rollout(target, twist, tree: Tree, node, key, config: DTSConfig, active=True):
    """Add a child of ``node`` and roll out from it to a leaf, adding every state; returns (tree, leaf).
    With ``active`` false nothing is added and ``node`` is returned."""
    leaf_level = target.num_steps + 1

    def cond(c):
        _, _, level, _ = c
        return active & (level < leaf_level)

    def body(c):
        tree, cur, level, i = c
        state, h, leaf_value, nfe, bad = _new_child(target, twist, tree, cur, level, jax.random.fold_in(key, i), config)
        tree, idx = tree_lib.add_child(tree, cur, state, h, parent_level=level)
        tree = tree._replace(
            log_value=tree.log_value.at[idx].set(leaf_value),
            nfe=tree.nfe + nfe,
            nonfinite=tree.nonfinite | bad,
        )
        return tree, idx, level + 1, i + 1

    tree, leaf, _, _ = jax.lax.while_loop(cond, body, (tree, node, tree.level[node], jnp.asarray(0)))
    return tree, leaf


def _expand_twisted(target, twist, tree: Tree, node, key, config: DTSConfig, active=True) -> Tree:
    """Variant "twisted": add a child of ``node`` and grow below it a *branching* rollout with splitting and
    Russian roulette on the twist (a weight window, as in particle transport), then set the new nodes' values.

    Each new node c arrives with a window level log ρ (its parent's ``log_ref``, plus log k if the parent was
    split into k children in this rollout) and gets the score s = log ψ̃(x_c) − log ρ. If s < 0 it survives
    with probability p_c = e^s (value 0 and no children otherwise); if s ≥ 0 it is split into
    k_c = min(max_split, ⌊e^s + U⌋) children (leaves are never split; ψ̃ = exp(r/β) there); its own
    ``log_ref`` is log ρ + log p_c (a survivor's weight carries 1/p_c, so the bar for its descendants drops by
    p_c). A level-1 node sets log ρ = log ψ̃(x_c) for its subtree, and a child added later by progressive
    widening starts from its parent's ``log_ref``. Both decisions read only the states on c's path and the
    child counts, never a value. Tasks are kept on a
    depth-first stack. An iteration adds at most 64·(T + 1) nodes (and never more than the capacity left):
    a split is capped so that every pending task keeps a full path in reserve, so no task is ever dropped
    and every iteration stays exact (a poor twist costs NFE, never correctness)."""
    leaf_level = target.num_steps + 1
    kmax = config.max_split
    stack_size = (leaf_level + 1) * kmax
    num_before = tree.num_nodes
    max_new = 64 * leaf_level  # static bound on the nodes one iteration adds (the values' buffer)
    budget = jnp.minimum(max_new, tree.capacity - num_before)  # ≥ T + 1: step checked that a rollout fits
    i32, f32 = jnp.int32, jnp.float32
    stack = (
        jnp.zeros((stack_size,), i32).at[0].set(node),
        jnp.zeros((stack_size,), i32).at[0].set(tree.level[node]),
        jnp.zeros((stack_size,), f32).at[0].set(tree.log_ref[node]),
    )

    def cond(c):
        return active & (c[2] > 0)

    def body(c):
        tree, (st_par, st_lvl, st_ref), top, i, reserved = c
        top = top - 1
        par, lvl, log_ref = st_par[top], st_lvl[top], st_ref[top]
        reserved = reserved - (leaf_level - lvl)  # this task's path, reserved when it was pushed
        k_child, k_roulette, k_split = jax.random.split(jax.random.fold_in(key, i), 3)
        state, h, leaf_value, nfe, bad = _new_child(target, twist, tree, par, lvl, k_child, config)
        tree, idx = tree_lib.add_child(tree, par, state, h, parent_level=lvl)
        is_leaf = lvl + 1 == leaf_level
        top_level = lvl == 0  # a level-1 node: its ψ̃ sets the window of its subtree
        score = jnp.where(top_level, 0.0, h - log_ref)
        score = jnp.where(jnp.isnan(score), -jnp.inf, score)
        log_p = jnp.minimum(0.0, score)
        alive = jnp.log(jax.random.uniform(k_roulette, minval=1e-38)) < log_p
        ref_c = jnp.where(top_level, h, log_ref + log_p)
        excess = jnp.exp(jnp.clip(score, 0.0, math.log(kmax)))
        # split only within the iteration's node budget, keeping one full path reserved for every pending
        # task (so no task is ever dropped: k ≥ 1 is always affordable). The cap reads node counts of
        # earlier-created nodes only, never c's descendants: it is value-blind.
        path = jnp.maximum(leaf_level - lvl - 1, 1)
        affordable = jnp.maximum((budget - (tree.num_nodes - num_before) - reserved) // path, 1)
        k = jnp.clip(jnp.floor(excess + jax.random.uniform(k_split)), 1, kmax).astype(i32)
        k = jnp.minimum(k, affordable).astype(i32)
        k = jnp.where(alive & ~is_leaf, k, 0)
        slots = top + jnp.arange(kmax)
        push = jnp.arange(kmax) < k
        put = lambda arr, v: arr.at[slots].set(jnp.where(push, v, arr[jnp.minimum(slots, stack_size - 1)]), mode="drop")
        child_ref = ref_c + jnp.log(jnp.maximum(k, 1).astype(f32))
        stack = (put(st_par, idx), put(st_lvl, lvl + 1), put(st_ref, child_ref))
        tree = tree._replace(
            log_survival=tree.log_survival.at[idx].set(jnp.where(alive, log_p, -jnp.inf)),
            log_ref=tree.log_ref.at[idx].set(ref_c),
            log_value=tree.log_value.at[idx].set(jnp.where(alive & is_leaf, leaf_value - log_p, -jnp.inf)),
            nfe=tree.nfe + nfe,
            nonfinite=tree.nonfinite | bad,
        )
        return tree, stack, top + k, i + 1, reserved + k * (leaf_level - lvl - 1)

    init = (tree, stack, jnp.asarray(1, i32), jnp.asarray(0), leaf_level - tree.level[node])
    tree, _, top, _, _ = jax.lax.while_loop(cond, body, init)
    count = tree.num_nodes - num_before

    # values of the new internal nodes, children before parents (reverse creation order): a read-only pass
    # into a buffer, then a write-only pass (see _backup for why).
    def read(j, buf):
        n = num_before + count - 1 - j
        internal = (tree.level[n] < leaf_level) & (tree.log_survival[n] > -jnp.inf)

        lse = tree_lib.children_logsumexp(tree, n, value_of=lambda child: buf[child - num_before])
        mean = lse - jnp.log(jnp.maximum(tree.num_children[n], 1).astype(f32)) - tree.log_survival[n]
        return buf.at[n - num_before].set(jnp.where(internal, mean, tree.log_value[n]))

    buf = jax.lax.fori_loop(0, count, read, jnp.full((max_new,), -jnp.inf, f32))
    tree = jax.lax.fori_loop(0, count, lambda j, tr: tr._replace(log_value=tr.log_value.at[num_before + j].set(buf[j])), tree)
    return tree


def _backup(tree: Tree, bottom, num_before, leaf_level: int) -> Tree:
    """From ``bottom`` up to the root: recompute log Ŵ_n = log Σ_c Ŵ_c − log m_n and count the visit of
    every node that existed before this iteration (new nodes were created with one visit).

    Two passes so that XLA updates the node arrays in place: a read-only pass walks up and computes the new
    values into a path buffer (the path child's new value is carried, its siblings are unchanged), then a
    write-only pass stores them. (Reading a node array inside a loop that also writes it makes XLA copy the
    whole array on every iteration, which would make an iteration cost O(capacity).)"""
    path_len = leaf_level + 1

    def read_cond(c):
        node = c[0]
        return node != NO_NODE

    def read_body(c):
        node, child, child_value, i, nodes, values = c
        internal = tree.level[node] < leaf_level
        others = tree_lib.children_logsumexp(tree, node, exclude=child)
        m = jnp.maximum(tree.num_children[node], 1).astype(jnp.float32)
        log_p = tree.log_survival[node]  # 0 unless the roulette of variant "twisted" ran; −inf: killed
        mean = jnp.logaddexp(others, child_value) - jnp.log(m) - jnp.where(log_p > -jnp.inf, log_p, 0.0)
        value = jnp.where(internal & (log_p > -jnp.inf), mean, tree.log_value[node])
        return tree.parent[node], node, value, i + 1, nodes.at[i].set(node), values.at[i].set(value)

    init = (
        bottom,
        jnp.asarray(NO_NODE, jnp.int32),
        jnp.asarray(-jnp.inf, jnp.float32),
        jnp.asarray(0),
        jnp.full((path_len,), NO_NODE, jnp.int32),
        jnp.zeros((path_len,), jnp.float32),
    )
    _, _, _, count, nodes, values = jax.lax.while_loop(read_cond, read_body, init)

    def write(i, tree):
        node = nodes[i]
        return tree._replace(
            log_value=tree.log_value.at[node].set(values[i]),
            visits=tree.visits.at[node].add(jnp.where(node < num_before, 1, 0)),
        )

    return jax.lax.fori_loop(0, count, write, tree)


def step(key: jax.Array, tree: Tree, target: Tilted, config: DTSConfig = DTSConfig(), twist=None) -> Tree:
    """One DTS iteration (select, expand, roll out, back up), using ``fold_in(key, tree.iteration)``.

    If the next rollout might not fit (num_nodes + T + 1 > capacity) the tree is returned unchanged with
    ``full`` set (``dts`` refuses such runs up front unless ``on_full="stop"``)."""
    leaf_level = target.num_steps + 1
    it_key = jax.random.fold_in(key, tree.iteration)
    select_key, expand_key = jax.random.split(it_key)
    fits = tree.num_nodes + leaf_level <= tree.capacity

    num_before = tree.num_nodes
    node, expand = _descend(tree, select_key, config, leaf_level)
    # No lax.cond over the tree (XLA would copy every node array): when the rollout would not fit, start
    # the rollout and the backup from NO_NODE-free no-ops — the loops below simply run zero times.
    start = jnp.where(fits, node, jnp.asarray(ROOT, jnp.int32))
    if config.variant == "twisted":
        tree = _expand_twisted(target, twist, tree, start, expand_key, config, active=fits & expand)
        bottom = start  # the new nodes have their values; back up from the expanded node
    else:
        tree, bottom = _expand_and_rollout(target, twist, tree, start, expand_key, config, active=fits & expand)
    tree = _backup(tree, jnp.where(fits, bottom, NO_NODE), num_before, leaf_level)
    return tree._replace(iteration=tree.iteration + fits.astype(jnp.int32), full=tree.full | ~fits)


def _run(key, tree, target, num_iterations, config, twist):
    return jax.lax.fori_loop(0, num_iterations, lambda _, tr: step(key, tr, target, config, twist), tree)


run = filter_jit(_run)
run.__doc__ = "``num_iterations`` (an int32 array, so one compile serves every count) compiled iterations."


# --------------------------------------------------------------------------------------------------
# reading a tree
# --------------------------------------------------------------------------------------------------


def _descend_sample(tree: Tree, key, leaf_level: int, greedy: bool):
    def cond(c):
        return tree.level[c[0]] < leaf_level

    def body(c):
        node, depth = c
        child = tree_lib.gumbel_over_children(tree, node, jax.random.fold_in(key, depth), lambda n: tree.log_value[n], noise=not greedy)
        # A node with no children cannot occur below a finished rollout; guard anyway (stay put → loop ends
        # only at leaves, so map NO_NODE to a leaf-level sentinel by returning the node and breaking).
        return jnp.where(child == NO_NODE, node, child), depth + 1

    def guarded_cond(c):
        return cond(c) & (tree.first_child[c[0]] != NO_NODE)

    node, _ = jax.lax.while_loop(guarded_cond, body, (jnp.asarray(ROOT, jnp.int32), jnp.asarray(0)))
    return node


def _sample_leaves(key, tree, num_steps: int, num_samples: int, greedy: bool):
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: _descend_sample(tree, k, num_steps + 1, greedy))(keys)


_sample_leaves_jit = jax.jit(_sample_leaves, static_argnums=(2, 3, 4))


def sample_tree(key: jax.Array, tree: Tree, num_steps: int, num_samples: int) -> jax.Array:
    """Indices of ``num_samples`` leaves drawn from the tree's tilted leaf measure (no model evaluation):
    descend from the root choosing child c with probability exp(log Ŵ_c) / Σ_{c'} exp(log Ŵ_{c'})."""
    return _sample_leaves_jit(key, tree, int(num_steps), int(num_samples), False)


def greedy_leaf(tree: Tree, num_steps: int) -> jax.Array:
    """DTS*'s output: descend from the root by argmax_c log Ŵ_c."""
    return _sample_leaves_jit(jax.random.PRNGKey(0), tree, int(num_steps), 1, True)[0]


def leaf_outputs(target: Tilted, tree: Tree, leaves: jax.Array):
    """``base.output`` of the given leaves' states."""
    states = jax.tree_util.tree_map(lambda buf: buf[leaves], tree.states)
    return jax.vmap(target.base.output)(states)


# --------------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------------


def _check_stochastic_impl(key, target, num_draws: int):
    base = target.base
    state = base.init(key)

    def body(state, t):
        d = check_distribution(base.transition(state, t), "transition")
        draws = jax.vmap(lambda k: d.sample(k))(jax.random.split(jax.random.fold_in(key, t), num_draws))
        flat = jnp.reshape(jnp.asarray(draws, jnp.float32), (num_draws, -1))
        varies = jnp.any(flat != flat[0])
        return base.update(state, jax.tree_util.tree_map(lambda a: a[0], draws), t), varies

    _, varies = jax.lax.scan(body, state, jnp.arange(target.num_steps))
    return varies


_check_stochastic = filter_jit(_check_stochastic_impl)


def check_stochastic(target: Tilted, key: Optional[jax.Array] = None, num_draws: int = 8) -> None:
    """Raise ``ValueError`` if every step of the base program is deterministic (a DDIM sampler with η = 0,
    a ``Delta`` transition): DTS branches by drawing several children of a node, which needs noise.
    Costs one ancestral path with ``num_draws`` draws per step (not counted in the tree's NFE)."""
    key = jax.random.PRNGKey(0) if key is None else key
    varies = np.asarray(_check_stochastic(key, target, num_draws))
    if not varies.any():
        raise ValueError(
            "DTS needs a stochastic sampler: every transition of the base program returned the same draw for "
            f"{num_draws} different keys (a deterministic sampler such as DDIM with eta=0 cannot branch); "
            "use a stochastic reverse step (DDPM, DDIM with eta > 0)."
        )


def init(target: Tilted, capacity: int) -> Tree:
    """An empty tree (the virtual root only) sized for ``capacity`` nodes."""
    template = jax.eval_shape(target.base.init, jax.random.PRNGKey(0))
    template = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    return tree_lib.empty(int(capacity), template)


def _check_target(target) -> None:
    if not isinstance(target, Tilted) or not is_sequential(target.base):
        raise ValueError(
            f"target must come from pplalign.tilt(base, reward, beta) with a Sequential base; got {type(target).__name__}"
        )
    validate_beta(target.beta)


def dts(
    key: jax.Array,
    target: Tilted,
    num_iterations: int,
    *,
    capacity: Optional[int] = None,
    greedy: bool = False,
    num_samples: int = 1000,
    variant: str = "published",
    twist=None,
    widening_c: float = 1.0,
    widening_alpha: float = 0.5,
    uct_c: float = 1.0,
    tree: Optional[Tree] = None,
    on_full: str = "error",
    chunk_size: Optional[int] = None,
    progress: bool = False,
) -> tuple[Particles, Tree]:
    """Diffusion Tree Sampling (Jain et al. 2025): grow a search tree for ``num_iterations`` iterations and
    draw samples from it. DTS* with ``greedy=True``.

    Args:
      key: PRNG key. Iteration k uses ``fold_in(key, k)``: pass the same key with ``tree=`` to resume.
      target: ``pplalign.tilt(base, reward, beta)`` with a stochastic Sequential base (e.g. a DDPM sampler).
      num_iterations: iterations to add (each: select, expand, roll out to x₀, back up).
      capacity: node capacity of a new tree; default :func:`nodes_needed` (T + 1 nodes per iteration).
      greedy: DTS* — UCT selection and one greedy output (argmax of the soft values at each level).
      num_samples: samples drawn from the tree for the returned ``Particles`` (no model evaluations).
      variant: ``"published"`` (Boltzmann selection on the tree's values), ``"consistent"`` (growth that
        never reads the values: Boltzmann on ``twist`` or uniform; unbiased values, consistent samples) or
        ``"twisted"`` (as consistent, plus roulette and splitting on ``twist`` in branching rollouts; unbiased).
      twist: ``twist(state, t) -> log ψ̃`` guiding the consistent and twisted variants' growth (e.g. the reward
        of the denoised mean over β); ignored by the others. The twisted variant also scores the initial state,
        with t = −1 (without a twist it is uniform selection without roulette, i.e. ``"consistent"``).
      widening_c, widening_alpha: progressive widening m_n < C·(N_n + 1)^α.
      uct_c: DTS*'s exploration constant.
      tree: a tree from an earlier call (or :func:`pplalign.search.load_tree`) to continue. It must have been
        grown under this setup — β, variant and config, program, reward and twist (``Tree.setup``, see
        :mod:`pplalign.search.fingerprint`); another is refused with a ``ValueError`` naming what differs.
      on_full: ``"error"`` refuses, before running, a capacity that could run out (and raises after the run if
        the twisted variant's splits filled it); ``"stop"`` runs anyway and skips the iterations whose rollout
        would not fit (``tree.full`` tells).
      chunk_size: iterations per compiled call (a progress-bar tick); the result does not depend on it.

    Returns:
      (Particles, Tree). ``Particles.samples`` are ``num_samples`` draws (equal weights) from the tree; for
      DTS* one greedy sample. ``log_Z`` is the root's log Ŵ (β·log_Z estimates the optimal KL-regularised
      value); ``nfe`` is the tree's total transition count. Raises ``ValueError`` if a reward was NaN/+inf.
      ``dts`` itself runs Python-side checks between compiled chunks and cannot be traced (``jit``/``vmap``
      raise a ``ValueError``); compose :func:`run_loop` and :func:`sample_leaves` under your own jit instead.
    """
    refuse_traced(
        "pplalign.dts", "grow trees under your own jit with pplalign.search.run_loop and read them with "
        "search.sample_leaves / particles_from_tree", key=key, target=target, twist=twist, tree=tree,
    )
    check_key(key)
    _check_target(target)
    config = DTSConfig(variant, bool(greedy), float(widening_c), float(widening_alpha), float(uct_c))
    config.validate()
    # a new tree needs an iteration to hold any sample; a resumed one may just be sampled again
    num_iterations = check_count(num_iterations, "num_iterations", 1 if tree is None else 0)
    num_samples = check_count(num_samples, "num_samples")
    if on_full not in ("error", "stop"):
        raise ValueError(f"on_full must be 'error' or 'stop'; got {on_full!r}")
    num_steps = target.num_steps
    components = setup_components(config, target, twist)
    if tree is None:
        check_stochastic(target, key)
        cap = nodes_needed(num_steps, num_iterations) if capacity is None else capacity
        try:
            cap = check_count(cap, "capacity", num_steps + 2)
        except ValueError:
            raise ValueError(f"capacity must be an int >= T + 2 = {num_steps + 2} (the root and one rollout); got {cap!r}") from None
        tree = init(target, cap)._replace(setup=jnp.asarray(setup_stamp(components)))
    else:
        _check_resumable(tree, target)
        check_setup(tree, components)
        tree = tree._replace(setup=jnp.asarray(setup_stamp(components)))
    need = int(tree.num_nodes) + int(num_iterations) * (num_steps + 1)
    if on_full == "error" and need > tree.capacity:
        raise ValueError(
            f"tree capacity {tree.capacity} is too small for {num_iterations} more iterations: the worst case "
            f"needs {need} nodes ({int(tree.num_nodes)} used + {num_iterations}·(T + 1) with T = {num_steps}); "
            "raise capacity, or pass on_full='stop' to stop growing when full"
        )
    tree = grow(key, tree, target, int(num_iterations), config, twist, chunk_size, progress)
    if on_full == "error" and bool(tree.full):  # only the twisted variant's splits can outgrow the worst case above
        raise ValueError(
            f"the tree filled its capacity {tree.capacity} before {num_iterations} iterations: the 'twisted' variant "
            "splits nodes (up to 64·(T + 1) new nodes per iteration); raise capacity, or pass on_full='stop'"
        )
    if bool(tree.nonfinite):
        name = lambda obj: getattr(obj, "__qualname__", None) or type(obj).__name__
        culprit = f"reward {name(target.reward)!r}" + ("" if twist is None else f" or twist {name(twist)!r}")
        raise ValueError(f"{culprit} returned NaN or +inf during the tree search; rewards and twists must be finite or -inf")
    particles = particles_from_tree(jax.random.split(key)[1], tree, target, num_samples, config.greedy)
    return particles, tree


def grow(key, tree, target, num_iterations: int, config: DTSConfig, twist=None, chunk_size=None, progress=False) -> Tree:
    """Run iterations in compiled chunks (a progress bar per chunk when ``progress``)."""
    chunk = num_iterations if not chunk_size else int(chunk_size)
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_iterations, desc="DTS", leave=False)
    while done < num_iterations:
        n = min(chunk, num_iterations - done)
        tree = run(key, tree, target, jnp.asarray(n, jnp.int32), config, twist)
        done += n
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return tree


def particles_from_tree(key, tree: Tree, target: Tilted, num_samples: int, greedy: bool = False) -> Particles:
    """Pack draws from a built tree (or DTS*'s greedy leaf) as :class:`~pplalign.Particles` (no NFE)."""
    num_steps = target.num_steps
    if greedy:
        leaves = greedy_leaf(tree, num_steps)[None]
    else:
        leaves = sample_tree(key, tree, num_steps, num_samples)
    n = leaves.shape[0]
    samples = leaf_outputs(target, tree, leaves)
    log_z = tree.log_value[ROOT]
    particles = Particles(
        samples=samples,
        log_weights=jnp.zeros((n,), jnp.float32),
        log_Z=log_z,
        ess=jnp.full((num_steps,), float(n), jnp.float32),
        ancestors=jnp.zeros((num_steps, n), jnp.int32),
        nfe=tree.nfe,
        nonfinite_reward=tree.nonfinite,
        all_zero=~jnp.isfinite(log_z),
    )
    return mark_invalid_beta(particles, target.beta)


def _check_resumable(tree: Tree, target: Tilted) -> None:
    template = jax.eval_shape(target.base.init, jax.random.PRNGKey(0))
    want = jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), template)
    have = jax.tree_util.tree_map(lambda buf: (buf.shape[1:], buf.dtype), tree.states)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(have) or want != have:
        raise ValueError("the tree's node states do not match the target's program state (a tree of another program?)")
    levels = np.asarray(tree.level[: int(tree.num_nodes)])
    if levels.size and levels.max() > target.num_steps + 1:
        raise ValueError(f"the tree has nodes deeper than T + 1 = {target.num_steps + 1}: it was built for another num_steps")


# Raw (un-jitted) forms for callers that compose them under their own jit/vmap (many prompts, many seeds).
run_loop = _run
sample_leaves = _sample_leaves
