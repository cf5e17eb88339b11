"""Rewards for the LM program: a classifier reward model, word presence, infilling, a process reward model.

Every reward takes the generated tokens x [T] (``<pad>`` after ``<eos>``) and returns a scalar r(x); the
target is σ(x) ∝ p₀(x | prompt) exp(r(x)/β).

* :class:`ClassifierReward` — r(x) = log p_θ(c | prompt, x), a transformer classifier's log-probability of a
  class at the last token. With β = 1, σ(x) ∝ p₀(x) p_θ(c | x) is the class-conditional posterior
  (Zhao et al. 2024, toxicity / sentiment tasks).
* :class:`WordPresence` — r(x) = w·1[x contains a listed word] (soft), or 0 / −∞ (hard constraint).
* :class:`Infilling` — r(x) = log p₀(c | prompt, x) for a fixed continuation c: σ(x) ∝ p₀(x) p₀(c | x) is the
  posterior of the middle given the end (Zhao et al. 2024, infilling).
* :class:`ProcessRewardModel` — for the arithmetic chains: v_t = log P(no wrong step in x_{≤t} | prompt, x_{≤t})
  at every position; its value at a step boundary scores a partial solution, after the last token it is an
  outcome reward. The shipped network is a per-token verifier: its output at generated position s is
  c_s = P(x_s is right | prompt, x_{≤s}, all of x_{<s} right), and by the chain rule
  v_t = Σ_{s≤t} log c_s, non-increasing in t (a wrong step can never be repaired); a 2-output prefix
  classifier giving v_t directly works too. :class:`WithProcessReward`
  carries the value of the last completed step in the program state (computed only at step boundaries), so
  particle filtering can use the ratio ψ_t/ψ_{t−1} of PRM values as its incremental weight (Puri et al. 2025,
  "A probabilistic inference approach to inference-time scaling of LLMs using particle-based Monte Carlo
  methods"), never the raw step score.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from .program import LMProgram, LMState
from .tokenizer import PAD
from .transformer import Transformer

__all__ = ["ClassifierReward", "WordPresence", "Infilling", "ProcessRewardModel", "WithProcessReward", "PRMState",
           "PRMTwist", "place_after_prompt", "verifier_log_probs",
           "prefix_values"]


def place_after_prompt(prompt_tokens: jax.Array, prompt_len: jax.Array, tokens: jax.Array, total: int) -> jax.Array:
    """[total] ids: the prompt's real tokens, then ``tokens``, then <pad> (the prompt may be right-padded)."""
    seq = jnp.full((total,), PAD, jnp.int32)
    seq = jax.lax.dynamic_update_slice(seq, jnp.where(jnp.arange(prompt_tokens.shape[0]) < prompt_len, prompt_tokens, PAD).astype(jnp.int32), (0,))
    return jax.lax.dynamic_update_slice(seq, jnp.asarray(tokens, jnp.int32), (prompt_len,))


def _check_in_house_vocabulary(program: LMProgram, what: str) -> None:
    """The in-house reward models read prompt + x with the in-house <pad>; refuse programs padded otherwise."""
    if program.pad_id != PAD:
        raise ValueError(f"{what} is trained on the in-house vocabulary (pad id {PAD}); this program pads with "
                         f"{program.pad_id}: use a reward built for that model's tokenizer")


def _check_classifier(model: Transformer, start: int, size: int, what: str, num_tokens: int) -> None:
    if not isinstance(model, Transformer):
        raise ValueError(f"{what} needs a models.lm Transformer classifier; got {type(model).__name__}")
    if start < 0 or size < 1 or start + size > model.num_outputs:
        raise ValueError(f"{what}: the classifier has {model.num_outputs} outputs, which do not contain the head "
                         f"[{start}, {start + size}); the reward model has the wrong shape")
    if num_tokens > model.cfg.max_len:
        raise ValueError(f"{what}: prompt + generation ({num_tokens} tokens) exceed the classifier's max_len {model.cfg.max_len}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassifierReward:
    """r(x) = log softmax(head logits)[label] at the last non-pad token of prompt + x.

    ``head_start``/``head_size`` select one softmax group of the classifier's outputs (the story classifier
    has sentiment at [0, 3) and toxicity at [3, 5))."""

    model: Transformer
    prompt_tokens: jax.Array  # [P]
    prompt_len: jax.Array  # []
    num_steps: int = dataclasses.field(metadata=dict(static=True))
    head_start: int = dataclasses.field(metadata=dict(static=True))
    head_size: int = dataclasses.field(metadata=dict(static=True))
    label: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def for_program(cls, model: Transformer, program: LMProgram, *, head: tuple[int, int], label: int) -> "ClassifierReward":
        start, size = head
        _check_in_house_vocabulary(program, "ClassifierReward")
        _check_classifier(model, start, size, "ClassifierReward", program.prompt.tokens.shape[0] + program.num_steps)
        if model.cfg.vocab_size != program.vocab_size:
            raise ValueError(f"classifier vocabulary ({model.cfg.vocab_size}) differs from the LM's ({program.vocab_size})")
        if not 0 <= label < size:
            raise ValueError(f"label {label} outside the head's {size} classes")
        return cls(model, program.prompt.tokens, program.prompt.length, program.num_steps, start, size, label)

    def log_probs(self, tokens: jax.Array) -> jax.Array:
        """[head_size] class log-probabilities given prompt + tokens."""
        tokens = jnp.asarray(tokens)
        if tokens.shape != (self.num_steps,):
            raise ValueError(f"ClassifierReward expects tokens of shape ({self.num_steps},); got {tokens.shape}")
        total = self.prompt_tokens.shape[0] + self.num_steps
        seq = place_after_prompt(self.prompt_tokens, self.prompt_len, tokens, total)
        logits, _ = self.model(seq[None])
        last = self.prompt_len + jnp.sum(tokens != PAD) - 1
        head = logits[0, last, self.head_start:self.head_start + self.head_size]
        return jax.nn.log_softmax(head)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.log_probs(tokens)[self.label]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WordPresence:
    """r(x) = weight·1[some x_t ∈ words] (``hard=False``), or 0 if present and −∞ otherwise (``hard=True``)."""

    words: jax.Array  # [K] token ids
    weight: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    hard: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def of(cls, tokenizer, words: Sequence[str], **kw) -> "WordPresence":
        return cls(jnp.asarray(tokenizer.ids(words), jnp.int32), **kw)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        present = jnp.any(jnp.asarray(tokens)[:, None] == self.words[None, :])
        if self.hard:
            return jnp.where(present, 0.0, -jnp.inf)
        return self.weight * present.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Infilling:
    """r(x) = log p₀(c | prompt, x): the base LM's log-likelihood of a fixed continuation c [C] after x.

    Use with a program that bans ``<eos>`` (``LMProgram.from_prompt(..., banned=[EOS])``) so x has length T."""

    model: Transformer
    prompt_tokens: jax.Array
    prompt_len: jax.Array
    continuation: jax.Array  # [C]
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def for_program(cls, program: LMProgram, continuation: Sequence[int]) -> "Infilling":
        c = jnp.asarray(continuation, jnp.int32)
        total = program.prompt.tokens.shape[0] + program.num_steps + c.shape[0]
        if c.ndim != 1 or c.shape[0] < 1:
            raise ValueError("the continuation must be a non-empty 1-d list of token ids")
        if total > program.model.cfg.max_len:
            raise ValueError(f"prompt + {program.num_steps} steps + continuation ({total} tokens) exceed max_len {program.model.cfg.max_len}")
        return cls(program.model, program.prompt.tokens, program.prompt.length, c, program.num_steps)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        body = jnp.concatenate([tokens, self.continuation])
        total = self.prompt_tokens.shape[0] + body.shape[0]
        seq = place_after_prompt(self.prompt_tokens, self.prompt_len, body, total)
        logits, _ = self.model(seq[None])
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        start = self.prompt_len + self.num_steps  # position of c_0
        pos = start + jnp.arange(self.continuation.shape[0])
        return jnp.sum(logp[pos - 1, self.continuation])


def verifier_log_probs(model: Transformer, seqs: jax.Array) -> jax.Array:
    """[B, S] the verifier's log-probability at every position of ``seqs`` [B, S]. Two kinds of PRM network:

    * a 2-output prefix classifier (wrong, right), as ``python -m models.lm.train --task prm`` trains:
      log P(no wrong token in seq_{≤j}) directly;
    * a per-token next-token verifier (one output per vocabulary entry, ``models.lm.reasoning``):
      log c_j = log softmax(f(seq_{<j}))[seq_j], the probability that the right token at j is the one written
      (after a right prefix the right token is unique, so "x_j is right" is the event "the right token = x_j",
      and a softmax over the vocabulary is a classifier for it); position 0 gets log c = 0."""
    logits, _ = model(seqs)
    if model.num_outputs == 2:
        return jax.nn.log_softmax(logits, axis=-1)[..., 1]
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(lp, seqs[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)


def prefix_values(model: Transformer, per_position: jax.Array, tokens: jax.Array) -> jax.Array:
    """[..., T] v_t = log P(no wrong step in x_{≤t}) from :func:`verifier_log_probs` read at the generated
    positions: the prefix classifier's value itself, or Σ_{s≤t} log c_s for the per-token verifier (chain
    rule). ``<pad>`` positions (after ``<eos>``) keep the value of the last real token."""
    real = tokens != PAD
    if model.num_outputs == 2:
        last = jnp.maximum(real.sum(-1, keepdims=True) - 1, 0)
        idx = jnp.minimum(jnp.arange(tokens.shape[-1]), last)
        return jnp.take_along_axis(per_position, jnp.broadcast_to(idx, per_position.shape), axis=-1)
    return jnp.cumsum(jnp.where(real, per_position, 0.0), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProcessRewardModel:
    """v_t = log P(no wrong step in x_{≤t} | prompt, x_{≤t}) = Σ_{s≤t} log c_s from a per-token verifier.

    With the per-token verifier of :mod:`models.lm.reasoning` (trained on exactly labelled prefixes) c_s is the
    probability that x_s is the right token given that the prefix before it is right; a 2-output prefix
    classifier gives v_t directly (:func:`verifier_log_probs`, :func:`prefix_values`)."""

    model: Transformer
    prompt_tokens: jax.Array
    prompt_len: jax.Array
    num_steps: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def for_program(cls, model: Transformer, program: LMProgram) -> "ProcessRewardModel":
        _check_in_house_vocabulary(program, "ProcessRewardModel")
        if not isinstance(model, Transformer):
            raise ValueError(f"ProcessRewardModel needs a models.lm Transformer; got {type(model).__name__}")
        if model.num_outputs not in (2, program.vocab_size) or model.cfg.vocab_size != program.vocab_size:
            raise ValueError(f"a process reward model has 2 outputs (wrong, right) or one per vocabulary entry "
                             f"({program.vocab_size}) over the LM's vocabulary; got {model.num_outputs} outputs over "
                             f"{model.cfg.vocab_size} tokens: wrong shape")
        total = program.prompt.tokens.shape[0] + program.num_steps
        if total > model.cfg.max_len:
            raise ValueError(f"ProcessRewardModel: prompt + generation ({total} tokens) exceed its max_len {model.cfg.max_len}")
        return cls(model, program.prompt.tokens, program.prompt.length, program.num_steps)

    def prefix_log_probs(self, tokens: jax.Array) -> jax.Array:
        """[T] v_t = log P(right so far) after each generated token (position t sees x_{≤t})."""
        tokens = jnp.asarray(tokens, jnp.int32)
        total = self.prompt_tokens.shape[0] + self.num_steps
        seq = place_after_prompt(self.prompt_tokens, self.prompt_len, tokens, total)
        lc = jax.lax.dynamic_slice(verifier_log_probs(self.model, seq[None])[0], (self.prompt_len,), (self.num_steps,))
        return prefix_values(self.model, lc, tokens)

    def at(self, tokens: jax.Array, t) -> jax.Array:
        return self.prefix_log_probs(tokens)[t]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Outcome reward: v after the last generated token, log P(the whole solution is right)."""
        return self.prefix_log_probs(tokens)[-1]


class PRMState(NamedTuple):
    lm: LMState
    last: jax.Array  # [] log PRM value of the prefix up to the last completed step boundary (0 before any)
    total: jax.Array  # [] Σ of the PRM values at the completed boundaries (for beam search)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WithProcessReward:
    """An LM program whose state also carries the PRM value of the last completed step.

    ``boundaries`` [T] bool marks the steps after which a reasoning step is complete. The PRM runs in
    ``update`` only at those steps (a ``lax.cond`` on the step index, which is the same for every particle,
    so it stays a real branch under ``vmap``)."""

    program: LMProgram
    prm: ProcessRewardModel
    boundaries: jax.Array  # [T] bool

    @property
    def num_steps(self) -> int:
        return self.program.num_steps

    def init(self, key):
        z = jnp.zeros((), jnp.float32)
        return PRMState(self.program.init(key), z, z)

    def transition(self, state: PRMState, t):
        return self.program.transition(state.lm, t)

    def update(self, state: PRMState, x_t, t) -> PRMState:
        lm = self.program.update(state.lm, x_t, t)
        score = lambda: self.prm.at(lm.tokens, t).astype(jnp.float32)
        value = jax.lax.cond(self.boundaries[t], score, lambda: state.last)
        total = state.total + jnp.where(self.boundaries[t], value, 0.0)
        return PRMState(lm, value, total)

    def output(self, state: PRMState):
        return self.program.output(state.lm)

    def reorder(self, states: PRMState, ancestors, t) -> PRMState:
        return PRMState(self.program.reorder(states.lm, ancestors, t), states.last[ancestors], states.total[ancestors])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PRMTwist:
    """log ψ_t = (PRM value of the last completed step)/β, so ψ_t/ψ_{t−1} is the ratio of successive PRM values
    (1 inside a step); ``cumulative=True`` gives log ψ_t = Σ of completed steps' values (a beam-search score)."""

    beta: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    cumulative: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __call__(self, state: PRMState, t) -> jax.Array:
        return (state.total if self.cumulative else state.last) / self.beta
