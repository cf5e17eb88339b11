"""A*-decoding: best-first search over partial solutions guided by a process reward (Chatziveroglou 2025,
"A*-decoding: Token-efficient inference scaling"), compiled over fixed-capacity arrays.

A node n is a partial solution ending at a step boundary (:mod:`.steps`): the program state after x_{<t_n}.
The verifier gives its process reward u(n) = prm(state, t_n − 1), read as a *cumulative log-score*: for the
arithmetic PRM u(n) = log P(every step of x_{<t_n} is right), which never increases along a path. The search
is A* on the path cost

    g(n) = −u(n)   (the sum of the step costs −(u(child) − u(parent)) ≥ 0, telescoped; u(root) = 0),
    f(n) = g(n) + h(n),

with a heuristic h(n) ≥ 0 of the cost still to come (``heuristic(state, t)``, default 0). The open set is a
priority queue held as arrays over ``capacity`` node slots: every iteration of one ``lax.while_loop`` pops the
open node of least f (ties to the lowest slot) and

* if it is *finished* (end token or horizon), records it as a solution — the A* goal test on pop;
* else expands it: k = ``num_children`` next steps drawn from p₀ (one batched draw); a step that repeats an
  earlier sibling's is dropped (the same partial solution twice would only be popped twice: on a weak policy
  most draws repeat the likeliest step, and without this the queue spends its budget on copies); each
  distinct child is scored once by the verifier and pushed, with h = 0 when finished.

Why the first solution is optimal. Step costs are ≥ 0 when u is non-increasing along paths; if h is
consistent (h(n) ≤ c(n, m) + h(m) for every child m, and h = 0 on finished nodes; h = 0 is), f never
decreases along a path, so pops come in non-decreasing f and the first finished node popped has the least
cost among *every* finished node the search could still create below its open set. (The children are draws
of p₀, so the optimum is over the sampled tree; with an exact h the search walks straight down it.)

Budget and accounting (:mod:`.budget`): before an expansion the search checks that its worst case — k steps
of at most min(``max_step_tokens``, T − t) tokens and k verifier calls — still fits ``token_budget`` and
``verifier_budget``; if not, it stops (``stopped``), so neither cap is ever exceeded. ``policy_tokens`` = the
tokens drawn on live lanes, duplicates included (= ``nfe``); ``verifier_calls`` = the distinct children
scored (the batched implementation evaluates the verifier on all k lanes; a duplicate's value is its twin's). The search also stops after
``num_solutions`` solutions or when the queue is empty.

    astar(key, base, prm, config, heuristic=None) -> AStarResult

``base``: a Sequential with a Categorical (token) transition; ``prm(state, t) -> []`` within ``value_range``;
checked after the run when not traced (:meth:`AStarResult.check`). It jits and vmaps (one queue per prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .._filter_jit import filter_jit
from .._validation import check_count, check_key
from .budget import SearchBudget, check_value_range, check_values
from .steps import StepSpec, extend_step

__all__ = ["AStarConfig", "AStarQueue", "AStarResult", "astar"]


@dataclasses.dataclass(frozen=True)
class AStarConfig:
    """Static settings (hashable: part of the compile key).

    delimiter, end_token, max_step_tokens: the steps (:class:`~pplalign.search.steps.StepSpec`).
    num_children:    k, steps drawn per expansion.
    token_budget:    cap on policy_tokens;  verifier_budget: cap on verifier calls (at least one of them).
    num_solutions:   stop after this many solutions are popped.
    value_range:     (low, high) the verifier is declared to return (default (−inf, 0]: a log-probability).
    """

    delimiter: Any
    end_token: Optional[int] = None
    max_step_tokens: Optional[int] = None
    num_children: int = 4
    token_budget: Optional[int] = None
    verifier_budget: Optional[int] = None
    num_solutions: int = 1
    value_range: Optional[tuple] = (-float("inf"), 0.0)

    @property
    def steps(self) -> StepSpec:
        return StepSpec(self.delimiter, self.end_token, self.max_step_tokens)

    @property
    def budget(self) -> SearchBudget:
        return SearchBudget(self.token_budget, self.verifier_budget)

    def validate(self, base) -> None:
        self.steps.validate(base)
        k = check_count(self.num_children, "num_children")
        check_count(self.num_solutions, "num_solutions")
        self.budget.validate(k * self.steps.step_cap(base.num_steps), k, f"{k} children of the root")
        check_value_range(self.value_range)

    def capacity(self) -> int:
        """1 + k·(the most expansions the budget pays for: each spends ≥ k tokens and k calls)."""
        k = self.num_children
        return 1 + k * self.budget.max_expansions(k, k)


class AStarQueue(NamedTuple):
    """Every node the search created; per-node fields have the capacity axis first.

    states:    program states.           parent: int32 (−1 at the root and in unused slots).
    position:  tokens drawn (t_n).       value: u(n) from the verifier (0 at the root).
    g, h:      path cost −u and heuristic (f = g + h).
    open_:     still in the queue.       finished: its step ended the solution.
    duplicate: its step repeats an earlier sibling's (never queued, never scored).
    popped_at: the pop index at which it left the queue (−1: never).
    pop_f:     [capacity] f of the i-th pop (+inf after the last).
    num_nodes, num_pops: [] int32.
    """

    states: Any
    parent: jax.Array
    position: jax.Array
    value: jax.Array
    g: jax.Array
    h: jax.Array
    open_: jax.Array
    duplicate: jax.Array
    finished: jax.Array
    popped_at: jax.Array
    pop_f: jax.Array
    num_nodes: jax.Array
    num_pops: jax.Array


class AStarResult(NamedTuple):
    """solutions: [S, ...] ``base.output`` of the solutions in pop order (slots past num_found hold the root's);
    solution_node [S] their queue slots; solution_value [S] u of each; found [S] bool; num_found [];
    queue: the :class:`AStarQueue`; policy_tokens, verifier_calls, nfe: [] int32; stopped: [] bool, the budget
    (or the capacity) ended the search before num_solutions were found; value_range: the declared range."""

    solutions: Any
    solution_node: jax.Array
    solution_value: jax.Array
    found: jax.Array
    num_found: jax.Array
    queue: AStarQueue
    policy_tokens: jax.Array
    verifier_calls: jax.Array
    nfe: jax.Array
    stopped: jax.Array

    def check(self, value_range) -> "AStarResult":
        """``ValueError`` if a verifier value of a created node is NaN or outside ``value_range``."""
        q = self.queue
        slots = jnp.arange(q.parent.shape[-1])
        valid = (slots >= 1) & (slots < jnp.asarray(q.num_nodes)[..., None]) & ~jnp.asarray(q.duplicate)
        check_values(q.value, valid, value_range, "the verifier (prm)")
        return self


def _duplicates(outputs, position) -> jax.Array:
    """[k] bool: child j repeats an earlier sibling's step (same position and same output)."""
    k = position.shape[0]
    same = position[:, None] == position[None, :]
    for leaf in jax.tree_util.tree_leaves(outputs):
        flat = leaf.reshape(k, -1)
        same &= jnp.all(flat[:, None] == flat[None, :], axis=-1)
    return jnp.any(same & (jnp.arange(k)[None, :] < jnp.arange(k)[:, None]), axis=1)


def _set_block(buf, start, new):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, 0)


def _search(key, base, prm, heuristic, config: AStarConfig) -> AStarResult:
    T = base.num_steps
    k, S, C = config.num_children, config.num_solutions, config.capacity()
    spec = config.steps
    cap = spec.step_cap(T)
    budget = config.budget
    max_tokens, max_calls = budget.cap("tokens"), budget.cap("verifier_calls")
    h_of = (lambda s, t: jnp.zeros((), jnp.float32)) if heuristic is None else (
        lambda s, t: jnp.asarray(heuristic(s, t), jnp.float32))

    init_key, key = jax.random.split(key)
    root = base.init(init_key)
    states = jax.tree_util.tree_map(lambda x: jnp.zeros((C,) + jnp.shape(x), jnp.asarray(x).dtype).at[0].set(x), root)
    h0 = h_of(root, jnp.asarray(0, jnp.int32))
    f32 = lambda fill: jnp.full((C,), fill, jnp.float32)
    q = AStarQueue(states, jnp.full((C,), -1, jnp.int32), jnp.zeros((C,), jnp.int32), f32(0.0),
                   f32(0.0), f32(0.0).at[0].set(h0), jnp.zeros((C,), bool).at[0].set(True), jnp.zeros((C,), bool), jnp.zeros((C,), bool),
                   jnp.full((C,), -1, jnp.int32), f32(jnp.inf), jnp.asarray(1, jnp.int32), jnp.asarray(0, jnp.int32))
    zero = jnp.asarray(0, jnp.int32)
    carry = (q, zero, zero, jnp.zeros((S,), jnp.int32), zero, jnp.asarray(False), jnp.asarray(False))

    def expand(q: AStarQueue, i):
        parent = jax.tree_util.tree_map(lambda buf: buf[i], q.states)
        keys = jax.random.split(jax.random.fold_in(key, q.num_pops), k)
        out = jax.vmap(lambda kk: extend_step(kk, base, spec, parent, q.position[i]))(keys)
        u = jax.vmap(prm)(out.state, out.position - 1).astype(jnp.float32)
        h = jnp.where(out.finished, 0.0, jax.vmap(h_of)(out.state, out.position))
        dup = _duplicates(jax.vmap(base.output)(out.state), out.position)
        n = q.num_nodes
        q = q._replace(
            states=jax.tree_util.tree_map(lambda buf, new: _set_block(buf, n, new), q.states, out.state),
            parent=_set_block(q.parent, n, jnp.full((k,), i, jnp.int32)),
            position=_set_block(q.position, n, out.position),
            value=_set_block(q.value, n, u),
            g=_set_block(q.g, n, -u),
            h=_set_block(q.h, n, h),
            open_=_set_block(q.open_, n, ~dup),
            duplicate=_set_block(q.duplicate, n, dup),
            finished=_set_block(q.finished, n, out.finished),
            num_nodes=n + k,
        )
        return q, jnp.sum(out.drawn), k - jnp.sum(dup)

    def cond(c):
        return ~c[-2]

    def body(c):
        q, tokens, calls, sols, found, _, stopped = c
        f = jnp.where(q.open_, q.g + q.h, jnp.inf)
        i = jnp.argmin(f).astype(jnp.int32)
        any_open = jnp.any(q.open_)
        i = jnp.where(q.open_[i], i, jnp.argmax(q.open_).astype(jnp.int32))  # all open f = +inf: first open
        goal = q.finished[i]
        worst = k * jnp.minimum(cap, T - q.position[i])
        fits = (tokens + worst <= max_tokens) & (calls + k <= max_calls) & (q.num_nodes + k <= C)
        pop = any_open & (goal | fits)
        q, drawn, scored = jax.lax.cond(pop & ~goal, expand, lambda q, i: (q, zero, zero), q, i)
        q = q._replace(open_=q.open_.at[i].set(q.open_[i] & ~pop),
                       popped_at=q.popped_at.at[i].set(jnp.where(pop, q.num_pops, q.popped_at[i])),
                       pop_f=q.pop_f.at[q.num_pops].set(jnp.where(pop, q.g[i] + q.h[i], q.pop_f[q.num_pops])),
                       num_pops=q.num_pops + pop)
        record = pop & goal
        sols = sols.at[jnp.minimum(found, S - 1)].set(jnp.where(record, i, sols[jnp.minimum(found, S - 1)]))
        found = found + record
        calls = calls + scored
        out_of_budget = any_open & ~goal & ~fits
        done = ~any_open | out_of_budget | (found >= S)
        return q, tokens + drawn, calls, sols, found, done, stopped | out_of_budget

    q, tokens, calls, sols, found, _, stopped = jax.lax.while_loop(cond, body, carry)
    solution_states = jax.tree_util.tree_map(lambda buf: buf[sols], q.states)
    return AStarResult(jax.vmap(base.output)(solution_states), sols, q.value[sols], jnp.arange(S) < found, found,
                       q, tokens, calls, tokens, stopped)


_compiled = filter_jit(_search)


def astar(key: jax.Array, base, prm: Callable, config: AStarConfig, heuristic: Optional[Callable] = None) -> AStarResult:
    """A*-decoding on ``base`` guided by ``prm`` (see the module docstring). Outside a trace the verifier's
    values are checked against ``config.value_range`` (``ValueError``); a vmapped caller calls
    ``result.check(config.value_range)`` itself."""
    if not isinstance(config, AStarConfig):
        raise ValueError(f"config must be an AStarConfig; got {type(config).__name__}")
    check_key(key)
    config.validate(base)
    result = _compiled(key, base, prm, heuristic, config)
    if not isinstance(result.num_found, jax.core.Tracer):
        result.check(check_value_range(config.value_range))
    return result
