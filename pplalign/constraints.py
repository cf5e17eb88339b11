"""Hard constraints as potentials: a token automaton as a dense table, and the twist it gives.

A constraint is a language L of token sequences, given by a deterministic automaton over the vocabulary
(built by a maintained library, e.g. outlines-core's regex ``Index``; see ``models.hf.constraints``). The
constrained target is

    σ(x) = p₀(x) · exp(r(x)/β) · 1[x ∈ L] / Z,      Z = E_{p₀}[exp(r(x)/β) · 1[x ∈ L]]

(Z = P_{p₀}(x ∈ L) without a reward). The automaton is a pytree: a next-state table ``[S, V]`` int32, the final
(accepting) states and, for each state, the number of tokens it still needs to reach a final state (a BFS
over the table). With T steps, after step t there are T−1−t steps left, so the twist

    ψ_t(x_{≤t}) = 1[ a final state is reached from q_{t+1} after exactly T−1−t more tokens ],  q_{t+1} = δ(q_t, x_t)

is "the prefix can still complete to a match within the steps left"; ψ_{T−1} = 1[q_T final] is exactly the
indicator. When final states persist (an LM's ENDED state loops on the pad token) this is
distance(q_{t+1}) ≤ T−1−t; otherwise (a fixed-length program) a [T+1, S] table of exact-length reachability
is used (:meth:`TokenAutomaton.with_horizon`). ``candidates(state, t)`` gives log ψ_t ∈ {0, −∞} for every next token in one gather, so
:func:`pplalign.smc` proposes from q_t ∝ p₀(x_t | ·)·ψ_t and weights step t by Σ_x p₀(x | ·) ψ_t(x) / ψ_{t−1}:
every particle ends in L, and Ẑ is unbiased for Z. The indicator is also part of the target's reward
(:class:`ConstrainedReward`), so any sampler (bootstrap SMC, importance sampling) targets the same σ.

End tokens. A program with end tokens (an LM whose ``<eos>`` is absorbing and is followed by ``pad_id``)
finishes a sequence when an end token is drawn. The table gets one extra state, ENDED: an end token moves a
final state to ENDED (and any other state to DEAD), and ENDED moves to itself on the pad token only, so the
pads after the end are neutral (ψ = 1) and an end token is allowed only where the text so far is in L. With
``must_end`` only ENDED counts as final at step T−1 (the text is complete); otherwise a final state reached
without an end token counts too (a truncated prefix in L). A program without end tokens (fixed length T, the
Markov testbed) is checked at the last step: x ∈ L iff q_T is final.

Composition is a product of potentials: a soft reward is the target's tilt (``constrain(tilt(p, r, β), A)``);
a learned twist ``inner`` on the base program's state multiplies the constraint's ψ (log ψ and candidates add).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .programs import Tilted, is_sequential, tilt

__all__ = ["TokenAutomaton", "ConstrainedState", "Constrained", "ConstrainedReward", "ConstraintTwist",
           "constrain", "table_bytes", "DEAD", "UNREACHABLE"]

DEAD = 0  # row 0 of every table: the absorbing rejecting state
UNREACHABLE = np.iinfo(np.int32).max // 2  # distance of a state from which no final state can be reached


def table_bytes(num_states: int, vocab_size: int) -> int:
    """Memory of a dense int32 next-state table with ``num_states`` states × ``vocab_size`` tokens."""
    return 4 * int(num_states) * int(vocab_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenAutomaton:
    """A deterministic automaton over token ids, as dense arrays.

    ``next_state[q, v]`` is the state after token v in state q (``DEAD`` = 0 when v is not allowed);
    ``final[q]`` says that a sequence ending in q is in L; ``distance[q]`` is the least number of tokens from q
    to a final state (``UNREACHABLE`` when none). ``vocab_hash`` names the vocabulary the table was built for.
    Build with :meth:`from_transitions` (a sparse map, e.g. outlines-core's) or :meth:`from_mask`.
    """

    next_state: jax.Array  # [S, V] int32
    final: jax.Array  # [S] bool
    distance: jax.Array  # [S] int32
    initial: int = dataclasses.field(metadata=dict(static=True))
    vocab_hash: str = dataclasses.field(default="", metadata=dict(static=True))
    description: str = dataclasses.field(default="", metadata=dict(static=True))
    horizon: Optional[jax.Array] = None  # [T+1, S] bool, set by with_horizon when final states do not persist

    @property
    def num_states(self) -> int:
        return int(self.next_state.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.next_state.shape[1])

    @property
    def table_bytes(self) -> int:
        """Bytes of the next-state table (states × V × 4); the two [S] vectors are negligible beside it."""
        return table_bytes(self.num_states, self.vocab_size)

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_transitions(cls, transitions: Mapping[int, Mapping[int, int]], initial: int, accepting: Sequence[int],
                         vocab_size: int, *, end_ids: Sequence[int] = (), pad_id: Optional[int] = None,
                         must_end: bool = True, vocab_hash: str = "", description: str = "",
                         max_table_bytes: Optional[int] = None) -> "TokenAutomaton":
        """A dense automaton from ``transitions[state][token] = next_state`` (any hashable state labels).

        Tokens absent from a state's map lead to DEAD. ``end_ids`` (with ``pad_id``) add the ENDED state of the
        module docstring; any transition the map gives on an end or pad token is replaced by that rule.
        Raises ``ValueError`` when S × V × 4 bytes exceeds ``max_table_bytes`` (before allocating), or when a
        token id lies outside [0, vocab_size)."""
        end_ids = sorted({int(e) for e in end_ids})
        if end_ids and pad_id is None:
            raise ValueError("end_ids need the pad_id drawn after an end token")
        labels = list(dict.fromkeys([initial, *transitions, *(n for m in transitions.values() for n in m.values()),
                                     *accepting]))
        index = {label: i + 1 for i, label in enumerate(labels)}  # row 0 is DEAD
        ended = len(labels) + 1 if end_ids else None
        num_states = len(labels) + 1 + bool(end_ids)
        _check_memory(num_states, vocab_size, max_table_bytes, description)
        table = np.zeros((num_states, vocab_size), np.int32)
        specials = np.asarray(sorted(set(end_ids) | ({int(pad_id)} if end_ids else set())), np.int64)
        for label, moves in transitions.items():
            tokens = np.fromiter(moves.keys(), np.int64, len(moves))
            targets = np.fromiter((index[n] for n in moves.values()), np.int32, len(moves))
            if tokens.size and not (0 <= tokens.min() and tokens.max() < vocab_size):
                raise ValueError(f"token ids {tokens.min()}..{tokens.max()} lie outside the vocabulary of {vocab_size}")
            keep = ~np.isin(tokens, specials)  # end and pad moves follow the ENDED rule below
            table[index[label], tokens[keep]] = targets[keep]
        final = np.zeros(num_states, bool)
        final[[index[a] for a in accepting]] = True
        if end_ids:
            table[np.ix_(np.flatnonzero(final), end_ids)] = ended  # an end token only where the text is in L
            table[ended, int(pad_id)] = ended  # pads after the end are neutral
            final = final if not must_end else np.zeros(num_states, bool)
            final[ended] = True
        return cls.from_table(table, final, index[initial], vocab_hash=vocab_hash, description=description)

    @classmethod
    def from_mask(cls, allowed: Any, *, end_ids: Sequence[int] = (), pad_id: Optional[int] = None,
                  must_end: bool = False, vocab_hash: str = "", description: str = "") -> "TokenAutomaton":
        """The one-state automaton of a token mask: L = sequences of allowed tokens (then an end token and pads,
        when ``end_ids``). Character rules ("no letter e") are such masks."""
        allowed = np.asarray(allowed, bool)
        ids = np.flatnonzero(allowed)
        transitions = {"any": {int(v): "any" for v in ids}}
        return cls.from_transitions(transitions, "any", ["any"], allowed.shape[0], end_ids=end_ids, pad_id=pad_id,
                                    must_end=must_end, vocab_hash=vocab_hash, description=description)

    @classmethod
    def from_table(cls, table: Any, final: Any, initial: int, *, vocab_hash: str = "",
                   description: str = "") -> "TokenAutomaton":
        """Wrap a dense table whose row 0 is DEAD; computes the distances."""
        table = np.asarray(table, np.int32)
        final = np.asarray(final, bool)
        if table.ndim != 2 or final.shape != (table.shape[0],):
            raise ValueError(f"a [S, V] table and an [S] final mask; got {table.shape} and {final.shape}")
        if np.any(table[DEAD] != DEAD) or final[DEAD]:
            raise ValueError("row 0 of the table must be the absorbing, non-final DEAD state")
        dist = distances_to_final(table, final)
        return cls(jnp.asarray(table), jnp.asarray(final), jnp.asarray(dist), int(initial), vocab_hash, description)

    # --- using ---------------------------------------------------------------------------------------------
    def step(self, q: jax.Array, x: jax.Array) -> jax.Array:
        """δ(q, x): one gather."""
        return self.next_state[q, x]

    def run(self, tokens: jax.Array) -> jax.Array:
        """The state after reading ``tokens`` [T] from the initial state."""
        q, _ = jax.lax.scan(lambda q, x: (self.step(q, x), None), jnp.asarray(self.initial, jnp.int32),
                            jnp.asarray(tokens, jnp.int32))
        return q

    def log_indicator(self, tokens: jax.Array) -> jax.Array:
        """log 1[tokens ∈ L]: 0 or −inf."""
        return jnp.where(self.final[self.run(tokens)], 0.0, -jnp.inf).astype(jnp.float32)

    @property
    def finals_persist(self) -> bool:
        """Whether every final state has a token to a final state (ENDED's pad loop, a mask's self-loop). Then
        "a final state within k tokens" is "after exactly k tokens", and ``distance`` alone decides ψ."""
        table, final = np.asarray(self.next_state), np.asarray(self.final)
        return bool(np.all(final[table[final]].any(axis=1)))

    def with_horizon(self, num_steps: int) -> "TokenAutomaton":
        """This automaton with ``horizon[k, q]`` = "a final state after exactly k more tokens from q", k = 0..T,
        needed for fixed-length programs whose final states do not persist (e.g. the regex ``ab`` with T = 3:
        after ``ab`` the third token kills it, though ``distance`` is 0). None when :attr:`finals_persist`."""
        if self.finals_persist:
            return dataclasses.replace(self, horizon=None)
        table = np.asarray(self.next_state)
        rows = [np.asarray(self.final)]
        for _ in range(num_steps):
            rows.append(rows[-1][table].any(axis=1))
        return dataclasses.replace(self, horizon=jnp.asarray(np.stack(rows)))

    def can_finish(self, q: jax.Array, steps_left: Any) -> jax.Array:
        """1[a final state is reached from q after exactly ``steps_left`` more tokens] (q may be an array)."""
        if self.horizon is None:
            return self.distance[q] <= steps_left
        return self.horizon[steps_left, q]

    def log_psi_next(self, q: jax.Array, steps_left: Any) -> jax.Array:
        """[V] log 1[δ(q, v) can finish in ``steps_left`` tokens] for every token v (the twist's candidates)."""
        return jnp.where(self.can_finish(self.next_state[q], steps_left), 0.0, -jnp.inf).astype(jnp.float32)

    def matchable_within(self, num_steps: int) -> bool:
        """Whether some sequence of exactly ``num_steps`` tokens is in L (Z > 0 for a p₀ of full support)."""
        if self.finals_persist:
            return int(self.distance[self.initial]) <= num_steps
        return bool(self.with_horizon(num_steps).horizon[num_steps, self.initial])

    def padded(self, num_states: int) -> "TokenAutomaton":
        """The same automaton with unreachable DEAD-like rows up to ``num_states`` (so automata of several
        constraints share one shape, and one compiled sampler)."""
        extra = int(num_states) - self.num_states
        if extra < 0:
            raise ValueError(f"cannot pad {self.num_states} states down to {num_states}")
        rows = lambda a, fill: jnp.concatenate([a, jnp.full((extra, *a.shape[1:]), fill, a.dtype)])
        horizon = None if self.horizon is None else jnp.concatenate(
            [self.horizon, jnp.zeros((self.horizon.shape[0], extra), bool)], axis=1)
        return dataclasses.replace(self, next_state=rows(self.next_state, DEAD), final=rows(self.final, False),
                                   distance=rows(self.distance, UNREACHABLE), horizon=horizon)

    def check_vocab(self, vocab_size: int, vocab_hash: Optional[str] = None) -> None:
        """Raise ``ValueError`` unless the automaton was built for this vocabulary (size, and hash if given)."""
        if int(vocab_size) != self.vocab_size:
            raise ValueError(f"the constraint {self.description!r} was built for a vocabulary of {self.vocab_size} "
                             f"tokens, but the program has {vocab_size}: build it with this model's tokenizer")
        if vocab_hash is not None and self.vocab_hash and vocab_hash != self.vocab_hash:
            raise ValueError(f"the constraint {self.description!r} was built for another tokenizer (vocabulary hash "
                             f"{self.vocab_hash[:12]} ≠ {vocab_hash[:12]}): build it with this model's tokenizer")


def _check_memory(num_states: int, vocab_size: int, max_table_bytes: Optional[int], what: str) -> None:
    need = table_bytes(num_states, vocab_size)
    if max_table_bytes is not None and need > max_table_bytes:
        raise ValueError(f"the constraint {what!r} needs a table of {num_states} states × {vocab_size} tokens = "
                         f"{need / 2**20:.2f} MiB, over max_table_bytes = {max_table_bytes / 2**20:.2f} MiB: "
                         "simplify the pattern or schema, or raise the limit")


def distances_to_final(table: np.ndarray, final: np.ndarray) -> np.ndarray:
    """[S] least number of tokens from each state to a final state (``UNREACHABLE`` if none): a backward BFS,
    as synchronous relaxations d(q) ← min(d(q), 1 + min_v d(δ(q, v))) until nothing changes."""
    dist = np.where(final, 0, UNREACHABLE).astype(np.int64)
    while True:
        step = np.minimum(dist, dist[table].min(axis=1) + 1)
        step = np.where(step >= UNREACHABLE, UNREACHABLE, step)
        if np.array_equal(step, dist):
            return dist.astype(np.int32)
        dist = step


# --- the constrained program -------------------------------------------------------------------------------
class ConstrainedState(NamedTuple):
    """One particle: the base program's state and the automaton's state after the tokens drawn so far."""

    base: Any
    q: jax.Array  # [] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Constrained:
    """The base program p₀ unchanged, with the automaton state carried beside its state.

    ``transition`` and ``output`` are the base's; ``update`` also advances q by one gather. Resampling goes
    through the base's own ``reorder`` (a language model's cheap KV-cache gather) when it has one."""

    base: Any
    automaton: TokenAutomaton

    @property
    def num_steps(self) -> int:
        return int(self.base.num_steps)

    @property
    def vocab_size(self) -> int:
        return self.automaton.vocab_size

    def init(self, key: jax.Array) -> ConstrainedState:
        return ConstrainedState(self.base.init(key), jnp.asarray(self.automaton.initial, jnp.int32))

    def transition(self, state: ConstrainedState, t) -> Any:
        return self.base.transition(state.base, t)

    def update(self, state: ConstrainedState, x_t, t) -> ConstrainedState:
        x_t = jnp.asarray(x_t, jnp.int32)
        return ConstrainedState(self.base.update(state.base, x_t, t), self.automaton.step(state.q, x_t))

    def output(self, state: ConstrainedState) -> Any:
        return self.base.output(state.base)

    def reorder(self, states: ConstrainedState, ancestors: jax.Array, t) -> ConstrainedState:
        if hasattr(self.base, "reorder"):
            base = self.base.reorder(states.base, ancestors, t)
        else:
            base = jax.tree_util.tree_map(lambda leaf: jnp.take(leaf, ancestors, axis=0), states.base)
        return ConstrainedState(base, jnp.take(states.q, ancestors, axis=0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConstrainedReward:
    """r(x) + log 1[x ∈ L] (so the tilt is exp(r/β)·1[L]); x is the output, a token array [T]."""

    automaton: TokenAutomaton
    reward: Optional[Callable] = None

    def __call__(self, tokens: jax.Array) -> jax.Array:
        base = jnp.zeros((), jnp.float32) if self.reward is None else jnp.asarray(self.reward(tokens), jnp.float32)
        return base + self.automaton.log_indicator(tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConstraintTwist:
    """log ψ_t = log 1[q_{t+1} can finish in T−1−t tokens] (+ log ψ_inner_t of the base state, when ``inner``).

    ``__call__(state, t)`` scores the state after step t; ``candidates(state, t)`` every next token at once
    from the state before step t (one gather; the inner twist's own ``candidates`` are added, else it is
    scored on the V candidate base states)."""

    program: Constrained
    inner: Any = None

    def _steps_left(self, t) -> jax.Array:
        return self.program.num_steps - 1 - jnp.asarray(t, jnp.int32)

    def __call__(self, state: ConstrainedState, t) -> jax.Array:
        a = self.program.automaton
        log_psi = jnp.where(a.can_finish(state.q, self._steps_left(t)), 0.0, -jnp.inf).astype(jnp.float32)
        if self.inner is not None:
            log_psi = log_psi + jnp.asarray(self.inner(state.base, t), jnp.float32)
        return log_psi

    def candidates(self, state: ConstrainedState, t) -> jax.Array:
        scores = self.program.automaton.log_psi_next(state.q, self._steps_left(t))
        if self.inner is not None:
            scores = scores + self._inner_candidates(state, t, scores.shape[0])
        return self._doomed_last_step(state, t, scores)

    def _inner_candidates(self, state: ConstrainedState, t, k: int) -> jax.Array:
        if hasattr(self.inner, "candidates"):
            return jnp.asarray(self.inner.candidates(state.base, t), jnp.float32)
        base = self.program.base
        cand = jax.vmap(lambda v: base.update(state.base, v, t))(jnp.arange(k))
        return jax.vmap(lambda s: jnp.asarray(self.inner(s, t), jnp.float32))(cand)

    def _doomed_last_step(self, state: ConstrainedState, t, scores: jax.Array) -> jax.Array:
        """At the last step, a particle none of whose allowed tokens has p₀ > 0 gets ψ ≡ 1 instead of ≡ 0.

        Its weight is zero either way (the drawn token is outside L and the final potential, the indicator,
        is −inf); this only keeps smc's last-step weight log Σp₀ψ − log ψ_{T−2} + r − log ψ(x) from being
        −inf + ∞ = NaN, which it would report as a bad twist instead of a zero weight."""
        logits = getattr(self.program.base.transition(state.base, t), "logits", None)
        if logits is None:
            return scores
        doomed = ~jnp.any(jnp.isfinite(scores) & jnp.isfinite(logits)) & (jnp.asarray(t) == self.program.num_steps - 1)
        return jnp.where(doomed, 0.0, scores)


def _program_vocab_size(program: Any) -> Optional[int]:
    size = getattr(program, "vocab_size", None)
    return None if size is None else int(size)


def constrain(target: Any, automaton: TokenAutomaton, *, twist: Any = None,
              vocab_hash: Optional[str] = None) -> tuple[Tilted, ConstraintTwist]:
    """(constrained target, its twist) for ``pplalign.smc(key, target, N, twist=twist)``.

    ``target`` is a Sequential program p₀ (then σ ∝ p₀·1[L]) or ``tilt(p₀, r, β)`` (then σ ∝ p₀·e^{r/β}·1[L]).
    ``twist`` is an optional learned twist on p₀'s state, multiplied in. Raises ``ValueError`` before any
    sampling when the automaton was built for another vocabulary (size, or ``vocab_hash``), or when no
    sequence of T tokens is in L (Z = 0)."""
    if isinstance(target, Tilted):
        base, reward, beta = target.base, target.reward, target.beta
    elif is_sequential(target):
        base, reward, beta = target, None, 1.0
    else:
        raise ValueError(f"constrain takes a Sequential program or a tilted one; got {type(target).__name__}")
    if not isinstance(automaton, TokenAutomaton):
        raise ValueError(f"constrain takes a TokenAutomaton; got {type(automaton).__name__}")
    size = _program_vocab_size(base)
    if size is not None:
        automaton.check_vocab(size, vocab_hash)
    elif vocab_hash is not None:
        automaton.check_vocab(automaton.vocab_size, vocab_hash)
    if not automaton.matchable_within(int(base.num_steps)):
        raise ValueError(f"no sequence of {base.num_steps} tokens satisfies the constraint {automaton.description!r} "
                         "over this vocabulary (Z = 0): check the pattern, or allow more steps")
    # the checked names leave the compiled program (static fields: each new name would recompile the sampler)
    stripped = dataclasses.replace(automaton, vocab_hash="", description="")
    program = Constrained(base, stripped.with_horizon(int(base.num_steps)))
    return tilt(program, ConstrainedReward(program.automaton, reward), beta), ConstraintTwist(program, twist)
