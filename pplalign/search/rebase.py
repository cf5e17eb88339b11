"""REBASE: reward-balanced tree search (Wu et al. 2024, "Inference scaling laws: an empirical analysis of
compute-optimal inference for problem-solving with language models", §3.2), compiled over N fixed slots.

The search grows a tree of reasoning steps (:mod:`.steps`) level by level under a fixed *width* N: at every
round the live (unfinished) leaves n_1..n_L, scored by the process reward u(n_j) = prm(state, t_j − 1), get

    W_j = B · softmax(u / τ)_j        children,   B = N − (solutions already finished),

rounded so that Σ_j W_j = B exactly (:func:`rebase_allocation`: cumulative rounding, |W_j − B·p_j| < 1, a
leaf with p_j = 0 gets none). Each child is one step drawn from p₀ below its leaf and scored once by the
verifier. Finished children (end token or horizon) keep their slot; the search stops when all N slots hold
finished solutions, when no leaf is live, or when the next round's worst case would break the budget
(``stopped``). τ → 0 is a beam of the best leaf, τ → ∞ spreads the width evenly (ancestral sampling of N
chains). The N solutions are returned with their values, to be aggregated (the paper: weighted majority).

Accounting (:mod:`.budget`): ``policy_tokens`` (= ``nfe``) counts the tokens drawn on live lanes,
``verifier_calls`` one call per child, B per round; ``round_tokens`` / ``round_calls`` record each round.

    rebase(key, base, prm, config) -> RebaseResult
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

__all__ = ["RebaseConfig", "RebaseResult", "rebase", "rebase_allocation"]


@dataclasses.dataclass(frozen=True)
class RebaseConfig:
    """Static settings (hashable).

    delimiter, end_token, max_step_tokens: the steps.       width: N, the solutions sought.
    temperature: τ of the softmax over the leaves' process rewards (> 0).
    token_budget, verifier_budget: caps (None: uncapped; the width alone bounds the search by N·T tokens).
    value_range: (low, high) the verifier is declared to return (default (−inf, 0]).
    """

    delimiter: Any
    end_token: Optional[int] = None
    max_step_tokens: Optional[int] = None
    width: int = 16
    temperature: float = 0.1
    token_budget: Optional[int] = None
    verifier_budget: Optional[int] = None
    value_range: Optional[tuple] = (-float("inf"), 0.0)

    @property
    def steps(self) -> StepSpec:
        return StepSpec(self.delimiter, self.end_token, self.max_step_tokens)

    def validate(self, base) -> None:
        self.steps.validate(base)
        n = check_count(self.width, "width")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0; got {self.temperature!r}")
        first = n * self.steps.step_cap(base.num_steps)
        budget = SearchBudget(first if self.token_budget is None else self.token_budget,
                              n if self.verifier_budget is None else self.verifier_budget)
        budget.validate(first, n, f"the first round, {n} children of the root")
        check_value_range(self.value_range)


class RebaseResult(NamedTuple):
    """solutions [N, ...] ``base.output`` of every slot; value [N] u of each; finished [N] bool (a solution);
    position [N]; policy_tokens, verifier_calls, nfe, rounds: [] int32; round_tokens, round_calls: [T] per
    round; stopped: [] bool, the budget ended the search with live leaves left."""

    solutions: Any
    value: jax.Array
    finished: jax.Array
    position: jax.Array
    policy_tokens: jax.Array
    verifier_calls: jax.Array
    nfe: jax.Array
    rounds: jax.Array
    round_tokens: jax.Array
    round_calls: jax.Array
    stopped: jax.Array

    def check(self, value_range) -> "RebaseResult":
        """``ValueError`` if a scored slot's verifier value is NaN or outside ``value_range``."""
        check_values(self.value, jnp.asarray(self.position) > 0, value_range, "the verifier (prm)")
        return self


def rebase_allocation(scores: jax.Array, live: jax.Array, total, temperature: float) -> jax.Array:
    """[L] int32 children per leaf: ``total``·softmax(scores/τ) over the ``live`` leaves, rounded on the
    cumulative sum (W_j = round(B·c_j) − round(B·c_{j−1}), c the cumulative probabilities, c_L := 1), so that
    Σ W = ``total`` exactly and |W_j − B·p_j| < 1. All live scores −inf: uniform over the live leaves."""
    s = jnp.where(live, jnp.asarray(scores, jnp.float32) / temperature, -jnp.inf)
    s = jnp.where(jnp.isfinite(jnp.max(s)), s, jnp.where(live, 0.0, -jnp.inf))
    p = jax.nn.softmax(jnp.where(jnp.any(live), s, 0.0))
    cum = jnp.cumsum(p)
    cum = cum / cum[-1]
    edges = jnp.floor(jnp.asarray(total, jnp.float32) * cum + 0.5).astype(jnp.int32)
    counts = jnp.diff(edges, prepend=0)
    return jnp.where(live & jnp.any(live), counts, 0)


def _search(key, base, prm, config: RebaseConfig) -> RebaseResult:
    T, N = base.num_steps, config.width
    spec = config.steps
    cap = spec.step_cap(T)
    budget = SearchBudget(config.token_budget, config.verifier_budget)
    max_tokens, max_calls = budget.cap("tokens"), budget.cap("verifier_calls")
    init_key, key = jax.random.split(key)
    root = base.init(init_key)
    slots = jnp.arange(N)
    states = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (N,) + jnp.shape(x)), root)
    zi = jnp.zeros((N,), jnp.int32)
    zero = jnp.asarray(0, jnp.int32)
    carry = dict(states=states, position=zi, value=jnp.zeros((N,), jnp.float32), finished=jnp.zeros((N,), bool),
                 live=slots == 0, tokens=zero, calls=zero, rounds=zero, round_tokens=jnp.zeros((T,), jnp.int32),
                 round_calls=jnp.zeros((T,), jnp.int32), stopped=jnp.asarray(False), done=jnp.asarray(False))

    def body(c):
        F = jnp.sum(c["finished"]).astype(jnp.int32)
        B = N - F
        counts = rebase_allocation(c["value"], c["live"], B, config.temperature)
        parents = jnp.repeat(slots, counts, total_repeat_length=N)
        order = jnp.argsort(~c["finished"], stable=True)  # finished slots first, kept as they are
        active = slots >= F
        src = jnp.where(active, parents[jnp.clip(slots - F, 0, N - 1)], order[slots])
        states = jax.tree_util.tree_map(lambda buf: buf[src], c["states"])
        position, value = c["position"][src], c["value"][src]
        worst = jnp.sum(jnp.where(active, jnp.minimum(cap, T - position), 0))
        fits = (c["tokens"] + worst <= max_tokens) & (c["calls"] + B <= max_calls)

        def grow(_):
            keys = jax.random.split(jax.random.fold_in(key, c["rounds"]), N)
            out = jax.vmap(lambda kk, s, t, a: extend_step(kk, base, spec, s, t, a))(keys, states, position, active)
            u = jnp.where(active, jax.vmap(prm)(out.state, jnp.maximum(out.position - 1, 0)).astype(jnp.float32), value)
            finished = jnp.where(active, out.finished, True)
            drawn = jnp.sum(out.drawn)
            r = c["rounds"]
            return dict(states=out.state, position=out.position, value=u, finished=finished,
                        live=active & ~out.finished, tokens=c["tokens"] + drawn, calls=c["calls"] + B, rounds=r + 1,
                        round_tokens=c["round_tokens"].at[r].set(drawn), round_calls=c["round_calls"].at[r].set(B),
                        stopped=c["stopped"], done=~jnp.any(active & ~out.finished))

        def halt(_):
            return {**c, "stopped": jnp.asarray(True), "done": jnp.asarray(True)}

        return jax.lax.cond(fits, grow, halt, None)

    c = jax.lax.while_loop(lambda c: ~c["done"], body, carry)
    return RebaseResult(jax.vmap(base.output)(c["states"]), c["value"], c["finished"], c["position"], c["tokens"],
                        c["calls"], c["tokens"], c["rounds"], c["round_tokens"], c["round_calls"], c["stopped"])


_compiled = filter_jit(_search)


def rebase(key: jax.Array, base, prm: Callable, config: RebaseConfig) -> RebaseResult:
    """REBASE on ``base`` guided by ``prm`` (module docstring); the verifier's values are checked against
    ``config.value_range`` outside a trace (``ValueError``), else call ``result.check``."""
    if not isinstance(config, RebaseConfig):
        raise ValueError(f"config must be a RebaseConfig; got {type(config).__name__}")
    check_key(key)
    config.validate(base)
    result = _compiled(key, base, prm, config)
    if not isinstance(result.rounds, jax.core.Tracer):
        result.check(check_value_range(config.value_range))
    return result
