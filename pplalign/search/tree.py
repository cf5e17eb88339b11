"""A search tree as fixed-capacity arrays (after mctx's ``Tree``), so that tree operations jit and vmap.

Node 0 is a *virtual root* above the program's ``init``: its children are independent draws of the initial
state (``base.init``), so the tree targets σ itself rather than σ given one initial state. A node at level ℓ
holds the program state after ℓ − 1 steps (level 1: the state after ``init``, before step 0; level T + 1: a
finished object, a *leaf*). Level ℓ ≥ 1 is extended by step t = ℓ − 1.

Children are a linked list (``first_child``, ``next_sibling``): progressive widening gives the root and
busy nodes many children and most nodes one, so a dense [capacity, max_children] table would waste memory.
Every per-node field has the capacity axis first; the tree is a pytree (NamedTuple) and can be vmapped
(one tree per prompt/class) and checkpointed.

Values are stored on the log scale of the tilt: ``log_value[n]`` estimates log ψ(x_n) = log E_{p₀}[exp(r(x)/β)
| x_n], the soft value in units of 1/β (β·log_value is the soft value in reward units; at the root it
estimates β·log Z). Leaves hold r(x)/β exactly; an internal node holds the log-mean-exp of its children's
values (the soft Bellman backup of Jain et al. 2025, eq. 6, with λ = 1/β).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .fingerprint import COMPONENTS

__all__ = ["Tree", "empty", "add_child", "children_logsumexp", "select_child", "gumbel_over_children", "NO_NODE", "ROOT"]

NO_NODE = -1
ROOT = 0


class Tree(NamedTuple):
    """Fixed-capacity search tree. All arrays have leading axis ``capacity`` unless noted.

    states:       program states (pytree), valid for nodes < num_nodes; the root's entry is a placeholder.
    parent:       int32, NO_NODE for the root and unused slots.
    first_child:  int32 head of the children list (NO_NODE if none).
    next_sibling: int32 next entry in the parent's children list.
    num_children: int32.
    level:        int32, 0 for the root, T + 1 for leaves.
    visits:       int32, iterations that passed through the node (its creating one included).
    log_value:    float32 log Ŵ_n, see the module docstring (−inf before the first backup).
    heuristic:    float32 log ψ̃(x_n) from a user twist (0 without one); read only by value-blind growth.
    log_survival: float32 log p_n, the Russian-roulette survival probability of the node (variant "twisted";
                  0 otherwise); −inf marks a node killed by the roulette (its value is 0 and it has no children).
    log_ref:      float32 the roulette's window level for the node's children (variant "twisted"; 0 otherwise).
    num_nodes:    [] int32 nodes in use.
    iteration:    [] int32 completed iterations (the PRNG stream of iteration k is fold_in(key, k)).
    nfe:          [] int32 transition evaluations spent building the tree.
    nonfinite:    [] bool, some reward (or twist) was NaN or +inf (its leaf was given value −inf).
    full:         [] bool, an iteration was skipped because the next rollout would not fit.
    setup:        [6, 2] uint32 digests of what defines the target and the algorithm (β, config, program,
                  reward, twist, state layout; :mod:`.fingerprint`), set by ``dts``; zeros: not stamped.
    """

    states: Any
    parent: jax.Array
    first_child: jax.Array
    next_sibling: jax.Array
    num_children: jax.Array
    level: jax.Array
    visits: jax.Array
    log_value: jax.Array
    heuristic: jax.Array
    log_survival: jax.Array
    log_ref: jax.Array
    num_nodes: jax.Array
    iteration: jax.Array
    nfe: jax.Array
    nonfinite: jax.Array
    full: jax.Array
    setup: jax.Array

    @property
    def capacity(self) -> int:
        return self.parent.shape[-1]

    def root_value(self, beta) -> jax.Array:
        """β·log Ŵ_root, the tree's estimate of β·log Z (the optimum of E_q[r] − β·KL(q‖p₀))."""
        return beta * self.log_value[..., ROOT]


def empty(capacity: int, state_template: Any) -> Tree:
    """A tree holding only the virtual root. ``state_template`` is one program state (its values are unused)."""
    i32 = lambda fill: jnp.full((capacity,), fill, jnp.int32)
    states = jax.tree_util.tree_map(lambda leaf: jnp.zeros((capacity,) + jnp.shape(leaf), jnp.asarray(leaf).dtype), state_template)
    return Tree(
        states=states,
        parent=i32(NO_NODE),
        first_child=i32(NO_NODE),
        next_sibling=i32(NO_NODE),
        num_children=i32(0),
        level=i32(0),
        visits=i32(0),
        log_value=jnp.full((capacity,), -jnp.inf, jnp.float32),
        heuristic=jnp.zeros((capacity,), jnp.float32),
        log_survival=jnp.zeros((capacity,), jnp.float32),
        log_ref=jnp.zeros((capacity,), jnp.float32),
        num_nodes=jnp.asarray(1, jnp.int32),
        iteration=jnp.asarray(0, jnp.int32),
        nfe=jnp.asarray(0, jnp.int32),
        nonfinite=jnp.asarray(False),
        full=jnp.asarray(False),
        setup=jnp.zeros((len(COMPONENTS), 2), jnp.uint32),
    )


def add_child(tree: Tree, parent: jax.Array, state: Any, heuristic: jax.Array, parent_level=None) -> tuple[Tree, jax.Array]:
    """Append a node under ``parent`` (pushed at the head of its children list); returns (tree, new index).

    The caller guarantees capacity (checked before each iteration). Passing ``parent_level`` (known to the
    caller) spares a read of ``level`` next to its write, which makes XLA copy the whole array."""
    idx = tree.num_nodes
    if parent_level is None:
        parent_level = tree.level[parent]
    head = tree.first_child[parent]
    states = jax.tree_util.tree_map(lambda buf, leaf: buf.at[idx].set(leaf), tree.states, state)
    tree = tree._replace(
        states=states,
        parent=tree.parent.at[idx].set(parent),
        next_sibling=tree.next_sibling.at[idx].set(head),
        first_child=tree.first_child.at[parent].set(idx),
        num_children=tree.num_children.at[parent].add(1),
        level=tree.level.at[idx].set(parent_level + 1),
        visits=tree.visits.at[idx].set(1),
        heuristic=tree.heuristic.at[idx].set(heuristic),
        num_nodes=idx + 1,
    )
    return tree, idx


def _fold_children(tree: Tree, node: jax.Array, fn, init):
    """lax.while_loop over the children list of ``node``: carry = fn(carry, child)."""

    def cond(c):
        return c[0] != NO_NODE

    def body(c):
        child, carry = c
        return tree.next_sibling[child], fn(carry, child)

    return jax.lax.while_loop(cond, body, (tree.first_child[node], init))[1]


def children_logsumexp(tree: Tree, node: jax.Array, exclude=NO_NODE, value_of=None) -> jax.Array:
    """log Σ_c exp(v_c) over the children of ``node`` other than ``exclude`` (streaming, stable; −inf if none),
    with v_c = ``value_of(c)`` (default: the stored ``log_value[c]``)."""
    if value_of is None:
        value_of = lambda child: tree.log_value[child]

    def step(carry, child):
        m, s = carry
        v = jnp.where(child == exclude, -jnp.inf, value_of(child))
        new_m = jnp.maximum(m, v)
        safe = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
        return new_m, s * jnp.exp(m - safe) + jnp.exp(v - safe)

    m, s = _fold_children(tree, node, step, (jnp.asarray(-jnp.inf, jnp.float32), jnp.asarray(0.0, jnp.float32)))
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1.0)) + safe, -jnp.inf)


def gumbel_over_children(tree: Tree, node: jax.Array, key: jax.Array, score_fn, noise: bool = True) -> jax.Array:
    """argmax_c score_fn(c) + G_c over the children of ``node``, G_c i.i.d. Gumbel(0, 1) keyed by the child's
    index: a draw from softmax(score) (the Gumbel-max trick), or the greedy argmax with ``noise=False``.
    Ties and all −inf scores fall to the first child in list order. Returns NO_NODE if there are no children."""

    def step(carry, child):
        best, best_score = carry
        s = score_fn(child)
        if noise:
            s = s + jax.random.gumbel(jax.random.fold_in(key, child), dtype=jnp.float32)
        take = (s > best_score) | (best == NO_NODE)
        return jnp.where(take, child, best), jnp.where(take, s, best_score)

    best, _ = _fold_children(tree, node, step, (jnp.asarray(NO_NODE, jnp.int32), jnp.asarray(-jnp.inf, jnp.float32)))
    return best


def select_child(tree: Tree, node: jax.Array, key: jax.Array) -> jax.Array:
    """Boltzmann draw of a child ∝ exp(log_value): with exact values this is the tilted conditional
    p₀(x_c | x_n) ψ(x_c) / ψ(x_n) on the tree's empirical children (the sampling rule of DTS)."""
    return gumbel_over_children(tree, node, key, lambda c: tree.log_value[c])
