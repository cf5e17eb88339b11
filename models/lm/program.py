"""The transformer LM as a pplalign ``Sequential`` program, with a KV cache that resampling reorders cheaply.

p₀(x_0..x_{T-1} | prompt) = ∏_t softmax(f(prompt, x_{<t}))[x_t], with ``<eos>`` absorbing: after it every
step draws ``<pad>`` with probability 1 (so finished sequences keep static shapes and contribute factor 1).

Where the work happens (DESIGN §3): ``update(state, x_t, t)`` feeds x_t through the network at absolute
position ``prompt_length + t``, writes its keys/values into slot t of the particle's own cache, and stores the
next-token logits and the final hidden state; ``transition`` only reads the logits. The prompt's cache is
computed once (``LMProgram.from_prompt``) and lives, unbatched, in the program object: every particle attends
to the same prompt keys/values, so the per-particle cache holds only the T generated positions.

Resampling (``reorder``) gathers the small per-particle leaves and only the *filled* part of the cache — slots
0..t after step t — rounded up to a multiple of ``bucket`` slots so that a handful of gather shapes compile
(a ``lax.switch`` over buckets). The cache may be stored in a smaller dtype (``cache_dtype="bfloat16"``),
halving both the attention's reads and the resampling gather.

Many prompts: ``prompt_caches`` prefills a batch of prompts; :func:`vmap_prompts` runs any sampler once per
prompt with ``vmap`` (each prompt has its own particle system, as resampling must not mix prompts);
:func:`smc_many_prompts` is the one-call version that returns one :class:`pplalign.Particles` per prompt.

Length cut-off (``cutoff=``). T steps may end before ``<eos>``; two targets are on offer.

* ``"truncate"`` (semantics A, the default): the program's law is the law of the first T tokens,

      p₀^{(T)}(x_{0:T}) = ∏_{t<T} p₀(x_t | prompt, x_{<t})      (<pad> with probability 1 after an end token),

  a truncated prefix: unfinished sequences are allowed. σ_A ∝ p₀^{(T)}(x) e^{r(x)/β}, and
  Z_A = E_{p₀}[e^{r(x_{0:T})/β}] (every prefix counts, finished or not).

* ``"force_eos"`` (semantics B, what genlm-control settled on, its issue #145): the target is p₀ over
  *complete* sequences that end by step T,

      σ_B(x) ∝ p₀(x) · 1[x ends with an end token by step T] · e^{r(x)/β},
      Z_B = E_{p₀}[1[complete by T] · e^{r(x)/β}] = P_{p₀}(complete by T) · E_{p₀}[e^{r/β} | complete by T],

  where p₀(x) of a complete x is its probability as a whole sequence (its end token included). The indicator
  is part of the target: :meth:`LMProgram.target` multiplies it into the reward (r = −∞ for an unfinished
  sequence), so every sampler (IS from p₀, best-of-N, DTS, twisted SMC) targets σ_B. Forcing the end is a
  proposal: :meth:`LMProgram.proposal` q_F equals p₀ at steps t < T−1 and, at t = T−1 for an unfinished
  prefix h = x_{<T−1}, draws an end token e ∈ E with q_F(e | h) = p₀(e | h)/p₀(E | h), p₀(E | h) = Σ_{e∈E} p₀(e | h)
  (finished prefixes draw <pad> under both). Its importance weight at the last step is

      p₀(e | h) / q_F(e | h) = p₀(E | h)      (1 for a prefix that ended earlier),

  the probability p₀ gave to ending there, so q_F(x)·w(x) = p₀(x)·1[complete] for every x and
  E_{q_F}[w · e^{r/β}] = Z_B: pass ``proposal=program.proposal`` to ``pplalign.smc`` and it computes this weight
  itself (log p₀ − log q). q_F is the locally optimal proposal for the indicator at the last step, so no
  particle is wasted on an unfinished sequence. Forcing the end *without* the factor p₀(E | h) samples
  q_F(x)·e^{r/β} instead, a different law (each forced sequence up-weighted by 1/p₀(E | h)): the pitfall of
  DESIGN §8. When p₀(E | h) = 0 (end tokens banned) q_F falls back to p₀ and the indicator gives weight 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import pplalign
from pplalign._filter_jit import filter_jit
from pplalign.particles import raise_on_nonfinite
from pplalign.programs import validate_beta

from .tokenizer import BOS, EOS, PAD, Tokenizer
from .transformer import Transformer

__all__ = ["PromptCache", "LMState", "LMProgram", "prompt_caches", "special_ids", "vmap_prompts", "ancestral_sample",
           "stay_in_place", "in_place_ancestors", "CompleteOnly", "smc_many_prompts", "CUTOFFS"]

CUTOFFS = ("truncate", "force_eos")


class PromptCache(NamedTuple):
    """The prefilled prompt: shared by every particle (a leading batch axis when many prompts)."""

    kv: jax.Array  # [L, 2, P, D]
    mask: jax.Array  # [P] bool, real (non-pad) prompt positions
    length: jax.Array  # [] int32 number of real prompt tokens
    logits: jax.Array  # [V] next-token logits after the prompt
    hidden: jax.Array  # [D] final hidden state at the prompt's last token
    tokens: jax.Array  # [P] int32 prompt ids (right-padded), for rewards that need the prompt


class LMState(NamedTuple):
    """One particle."""

    kv: jax.Array  # [L, 2, T, D] keys/values of the generated tokens (slot t = step t)
    tokens: jax.Array  # [T] int32 drawn tokens, <pad> after <eos> and for future steps
    logits: jax.Array  # [V] next-token logits (masked: only <pad> once finished)
    hidden: jax.Array  # [D] final hidden state that predicts the next token (frozen once finished)
    prev_hidden: jax.Array  # [D] the hidden state that predicted the last token (for a twist head's ψ_t)
    last: jax.Array  # [] int32 last drawn token (−1 before step 0; frozen at <eos> once finished)
    done: jax.Array  # [] bool, <eos> drawn
    length: jax.Array  # [] int32 number of tokens drawn before finishing (incl. <eos>)


def prompt_caches(model: Transformer, prompts: Sequence[Sequence[int]] | np.ndarray, *, pad_to: Optional[int] = None,
                  cache_dtype: Any = jnp.float32, pad_id: int = PAD) -> PromptCache:
    """Prefill a batch of prompts (lists of token ids, ``<bos>`` first); a PromptCache with leading axis B.
    ``model`` is any decoder with the ``Transformer`` contract (e.g. a :class:`models.hf.Decoder`).

    Raises ``ValueError`` for an empty prompt or one longer than ``pad_to`` / the model's ``max_len``."""
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prompts must be non-empty token lists (start them with <bos>)")
    longest = max(len(r) for r in rows)
    pad_to = pad_to or longest
    if longest > pad_to:
        raise ValueError(f"a prompt has {longest} tokens, longer than the prompt cache of {pad_to}")
    if pad_to > model.cfg.max_len:
        raise ValueError(f"prompt cache of {pad_to} tokens is longer than the model's max_len {model.cfg.max_len}")
    vocab = model.cfg.vocab_size
    if any(not 0 <= i < vocab for r in rows for i in r):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    tokens = np.full((len(rows), pad_to), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = jnp.asarray([len(r) for r in rows], jnp.int32)
    logits, hidden, kv = _prefill(model, jnp.asarray(tokens))
    last = lengths - 1
    take = lambda a: jnp.take_along_axis(a, last[:, None, None], axis=1)[:, 0]
    # the mask comes from the lengths, not from the pad id: a real model's pad id may occur inside a prompt
    real = jnp.arange(pad_to)[None, :] < lengths[:, None]
    return PromptCache(kv.astype(cache_dtype), real, lengths, take(logits), take(hidden), jnp.asarray(tokens))


@jax.jit
def _prefill(model, tokens):
    return model(tokens, return_kv=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMProgram:
    """Sequential program p₀(x_0..x_{T-1} | prompt) of a :class:`Transformer` (see the module docstring).

    Build with :meth:`from_prompt` (one prompt) or :meth:`build` (a prefilled prompt cache).
    ``logit_mask`` [V] (0 or −inf) bans tokens (the pad token, and ``<bos>`` when it is not an end token).
    ``eos_ids`` are the end tokens (several for e.g. Llama-3: ``<|end_of_text|>``, ``<|eot_id|>``); after one
    of them every step draws ``pad_id`` with probability 1. The in-house vocabulary's are the defaults; a
    Hugging Face tokenizer gives its own (:func:`special_ids`).
    """

    model: Transformer
    prompt: PromptCache
    logit_mask: jax.Array
    eos_ids: jax.Array
    num_steps: int = dataclasses.field(metadata=dict(static=True))
    bucket: int = dataclasses.field(default=8, metadata=dict(static=True))
    reorder_mode: str = dataclasses.field(default="inplace", metadata=dict(static=True))
    pad_id: int = dataclasses.field(default=PAD, metadata=dict(static=True))
    cutoff: str = dataclasses.field(default="truncate", metadata=dict(static=True))

    @classmethod
    def from_prompt(cls, model: Transformer, prompt: str | Sequence[int], num_steps: int, *,
                    tokenizer: Optional[Tokenizer] = None, prompt_cache_len: Optional[int] = None,
                    cache_dtype: Any = None, bucket: int = 8, reorder_mode: str = "inplace",
                    banned: Sequence[int] = (), cutoff: str = "truncate") -> "LMProgram":
        """A program continuing ``prompt`` (text, encoded with ``tokenizer``; or ids).

        The end, pad and ``<bos>`` ids come from ``tokenizer`` when given (a Hugging Face tokenizer carries
        those of its ``generation_config.json``), else from the in-house vocabulary. ``cache_dtype`` defaults
        to the model's ``cache_dtype`` attribute (set by ``models.hf.load_pretrained``), else float32."""
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            prompt = tokenizer.encode(prompt)
        if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                             f"{model.cfg.vocab_size}: they do not belong together")
        if cache_dtype is None:
            cache_dtype = getattr(model, "cache_dtype", None) or jnp.float32
        eos_ids, pad_id, bos_id = special_ids(tokenizer, model)
        # embedding rows beyond the tokenizer (Qwen pads its embedding to a multiple of 128) are never drawn
        unused = list(range(tokenizer.vocab_size, model.cfg.vocab_size)) if tokenizer is not None else []
        cache = jax.tree_util.tree_map(lambda a: a[0], prompt_caches(model, [prompt], pad_to=prompt_cache_len,
                                                                     cache_dtype=cache_dtype, pad_id=pad_id))
        return cls.build(model, cache, num_steps, bucket=bucket, reorder_mode=reorder_mode, banned=[*banned, *unused],
                         eos_ids=eos_ids, pad_id=pad_id, bos_id=bos_id, cutoff=cutoff)

    @classmethod
    def build(cls, model: Transformer, prompt: PromptCache, num_steps: int, *, bucket: int = 8,
              reorder_mode: str = "inplace", banned: Sequence[int] = (), eos_ids: Sequence[int] = (EOS,),
              pad_id: int = PAD, bos_id: Optional[int] = BOS, cutoff: str = "truncate") -> "LMProgram":
        """A program on a prefilled prompt cache. ``cutoff`` is ``"truncate"`` or ``"force_eos"`` (module
        docstring)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
        if reorder_mode not in ("bucketed", "full", "inplace"):
            raise ValueError(f"reorder_mode must be 'inplace', 'bucketed' or 'full'; got {reorder_mode!r}")
        if not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket must be a positive int; got {bucket!r}")
        p = prompt.kv.shape[-2]
        if p + num_steps > model.cfg.max_len:
            raise ValueError(
                f"prompt cache ({p} tokens) + {num_steps} generated tokens exceed the model's max_len "
                f"(max_position_embeddings) {model.cfg.max_len}: the prompt is longer than the cache allows")
        vocab = model.cfg.vocab_size
        eos = sorted({int(e) for e in eos_ids})
        if not eos or any(not 0 <= e < vocab for e in eos) or not 0 <= int(pad_id) < vocab:
            raise ValueError(f"eos_ids {eos} and pad_id {pad_id} must be ids of the model's {vocab} tokens")
        # the pad and <bos> tokens are never drawn, unless they double as an end token (GPT-2's <|endoftext|>)
        never = [i for i in (pad_id, bos_id) if i is not None and i not in eos]
        mask = np.zeros(vocab, np.float32)
        mask[[*never, *banned]] = -np.inf
        if cutoff not in CUTOFFS:
            raise ValueError(f"cutoff must be one of {CUTOFFS}; got {cutoff!r}")
        if cutoff == "force_eos" and all(e in set(map(int, banned)) for e in eos):
            raise ValueError("cutoff='force_eos' needs an end token, but every end id is banned: no sequence can "
                             "complete (Z = 0)")
        return cls(model, prompt, jnp.asarray(mask), jnp.asarray(eos, jnp.int32), num_steps, bucket, reorder_mode,
                   int(pad_id), cutoff)

    # --- the Sequential protocol ---------------------------------------------------------------------------
    @property
    def _pad_logits(self) -> jax.Array:
        return jnp.where(jnp.arange(self.model.cfg.vocab_size) == self.pad_id, 0.0, -jnp.inf)

    def init(self, key: jax.Array) -> LMState:
        del key
        cfg = self.model.cfg
        d = cfg.d_model
        kv = jnp.zeros((cfg.num_layers, 2, self.num_steps, cfg.kv_dim), self.prompt.kv.dtype)
        return LMState(kv, jnp.full((self.num_steps,), self.pad_id, jnp.int32),
                       (self.prompt.logits + self.logit_mask).astype(jnp.float32), self.prompt.hidden.astype(jnp.float32),
                       jnp.zeros((d,), jnp.float32), jnp.asarray(-1, jnp.int32), jnp.asarray(False),
                       jnp.asarray(0, jnp.int32))

    def transition(self, state: LMState, t) -> dist.CategoricalLogits:
        return dist.CategoricalLogits(state.logits)

    def update(self, state: LMState, x_t, t) -> LMState:
        t = jnp.asarray(t, jnp.int32)
        x = jnp.where(state.done, self.pad_id, jnp.asarray(x_t, jnp.int32))
        gen_mask = jnp.arange(self.num_steps) <= t
        logits, hidden, kv = self.model.decode_step(x, self.prompt.length + t, self.prompt.kv, self.prompt.mask,
                                                    state.kv, t, gen_mask)
        now_done = state.done | jnp.any(x == self.eos_ids)
        logits = jnp.where(now_done, self._pad_logits, logits + self.logit_mask)
        return LMState(
            kv,
            state.tokens.at[t].set(x),
            logits,
            jnp.where(now_done, state.hidden, hidden),
            jnp.where(state.done, state.prev_hidden, state.hidden),
            jnp.where(state.done, state.last, x),
            now_done,
            state.length + (~state.done).astype(jnp.int32),
        )

    def output(self, state: LMState) -> jax.Array:
        return state.tokens

    # --- the length cut-off ----------------------------------------------------------------------------------
    def proposal(self, state: LMState, t) -> dist.CategoricalLogits:
        """q_t for ``pplalign.smc(..., proposal=program.proposal)``: p₀ itself, except with ``cutoff="force_eos"``
        at the last step, where an unfinished particle draws an end token e with q(e) = p₀(e)/p₀(E) (module
        docstring); smc's weight log p₀ − log q is then log p₀(E | x_{<T−1}), the cut-off's correction."""
        if self.cutoff == "truncate":
            return self.transition(state, t)
        ends_only = jnp.where(self._is_end, state.logits, -jnp.inf)
        # done particles keep their <pad>-only logits (q = p₀ there); p₀(E) = 0 falls back to p₀ (weight 0 by
        # the indicator of :meth:`target`) instead of an all −inf row, which would be NaN
        force = (jnp.asarray(t) == self.num_steps - 1) & ~state.done & jnp.any(jnp.isfinite(ends_only))
        return dist.CategoricalLogits(jnp.where(force, ends_only, state.logits))

    @property
    def _is_end(self) -> jax.Array:
        return jnp.any(jnp.arange(self.model.cfg.vocab_size)[:, None] == self.eos_ids[None, :], axis=1)

    def completes(self, tokens: jax.Array) -> jax.Array:
        """[] bool: the tokens [T] contain an end token (the sequence finished within the T steps)."""
        return jnp.any(jnp.asarray(tokens)[:, None] == self.eos_ids[None, :])

    def target(self, reward: Callable, beta: Any = 1.0):
        """The tilted target of this program's cut-off: ``pplalign.tilt(self, reward, beta)`` (σ_A) for
        ``"truncate"``; for ``"force_eos"`` the reward gets the indicator of a complete sequence
        (:class:`CompleteOnly`), σ_B ∝ p₀·1[complete by T]·e^{r/β}, whatever sampler runs on it."""
        if self.cutoff == "force_eos":
            reward = CompleteOnly(reward, self.eos_ids)
        return pplalign.tilt(self, reward, beta)

    # --- resampling -----------------------------------------------------------------------------------------
    def reorder(self, states: LMState, ancestors: jax.Array, t) -> LMState:
        """Gather particles by ancestor index after step t: every small leaf, and the cache's filled slots.

        Slots > t hold nothing yet (they are written before they are read), so only ⌈(t+1)/bucket⌉·bucket
        slots are copied. ``"bucketed"``: a gather of those slots for every particle. ``"inplace"``: when every
        source particle keeps its own slot (ancestors from :func:`stay_in_place`), only the rows of particles
        that *moved* are copied, one row at a time in a loop, in place — with ESS-triggered resampling that is
        the dead particles only; other ancestor vectors fall back to the bucketed gather. ``"full"``: the naive
        gather of the whole cache."""
        small = jax.tree_util.tree_map(lambda a: jnp.take(a, ancestors, axis=0), states._replace(kv=None))
        kv = states.kv
        if self.reorder_mode == "full":
            return small._replace(kv=jnp.take(kv, ancestors, axis=0))
        steps = self.num_steps
        sizes = sorted({min(steps, b) for b in range(self.bucket, steps + self.bucket, self.bucket)})
        which = jnp.minimum(jnp.asarray(t, jnp.int32) // self.bucket, len(sizes) - 1)

        def gather(size):
            def f(kv):
                if size == steps:
                    return jnp.take(kv, ancestors, axis=0)
                return jax.lax.dynamic_update_slice_in_dim(kv, jnp.take(kv[..., :size, :], ancestors, axis=0), 0, axis=3)
            return f

        bucketed = lambda kv: jax.lax.switch(which, [gather(s) for s in sizes], kv)
        if self.reorder_mode == "bucketed":
            return small._replace(kv=bucketed(kv))

        n = ancestors.shape[0]
        moved = ancestors != jnp.arange(n)
        num_moved = jnp.sum(moved)
        dst = jnp.nonzero(moved, size=n, fill_value=0)[0]
        src = ancestors[dst]
        sources_stay = jnp.all(jnp.where(moved, ~moved[ancestors], True))  # no source row is overwritten

        def copy_rows(size):
            def f(kv):
                shape = (1,) + kv.shape[1:3] + (size, kv.shape[4])

                def body(i, kv):
                    row = jax.lax.dynamic_slice(kv, (src[i], 0, 0, 0, 0), shape)
                    return jax.lax.dynamic_update_slice(kv, row, (dst[i], 0, 0, 0, 0))

                return jax.lax.fori_loop(0, num_moved, body, kv)
            return f

        in_place = lambda kv: jax.lax.switch(which, [copy_rows(s) for s in sizes], kv)
        return small._replace(kv=jax.lax.cond(sources_stay, in_place, bucketed, kv))

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompleteOnly:
    """r(x) where x contains an end token, −∞ otherwise: the log of the indicator of semantics B, added to a
    reward (the reward itself is a pytree child, so its arrays stay traced)."""

    reward: Callable
    eos_ids: jax.Array

    def __call__(self, tokens: jax.Array) -> jax.Array:
        r = jnp.asarray(self.reward(tokens), jnp.float32)
        done = jnp.any(jnp.asarray(tokens)[:, None] == self.eos_ids[None, :])
        return jnp.where(done, r, -jnp.inf)


def special_ids(tokenizer: Any = None, model: Any = None) -> tuple[list[int], int, Optional[int]]:
    """(end ids, pad id, ``<bos>`` id): a Hugging Face tokenizer's ``eos_ids``/``pad_id``/``bos_id``; without a
    tokenizer, those ``models.hf.load_pretrained`` recorded on the model (``model.special_token_ids``, from its
    generation config); else the in-house vocabulary's ``<eos>``, ``<pad>``, ``<bos>``."""
    if tokenizer is not None and hasattr(tokenizer, "eos_ids"):
        return list(tokenizer.eos_ids), int(tokenizer.pad_id), tokenizer.bos_id
    recorded = getattr(model, "special_token_ids", None) if tokenizer is None else None
    if recorded is not None:
        eos, pad, bos = recorded
        return list(eos), int(pad), bos
    return [EOS], PAD, BOS


def vmap_prompts(fn: Callable[[jax.Array, LMProgram], Any], program: LMProgram, prompts: PromptCache, key: jax.Array):
    """Run ``fn(key, program_for_prompt_b)`` for every prompt of a batched :class:`PromptCache`, in one
    compiled ``vmap`` (the network weights are shared, not copied). ``fn`` may call ``pplalign.smc`` etc.

    The compiled call is keyed on ``fn`` itself: pass the same function object again (not a new lambda) and
    new keys, prompts or weights reuse it."""
    keys = jax.random.split(key, prompts.length.shape[0])
    return _vmap_prompts_jit(fn, keys, prompts, program)


def _vmap_prompts_impl(fn, keys, prompts, program):
    return jax.vmap(lambda k, pc: fn(k, dataclasses.replace(program, prompt=pc)))(keys, prompts)


_vmap_prompts_jit = jax.jit(_vmap_prompts_impl, static_argnums=0)


def ancestral_sample(key: jax.Array, program: Any, num: int, *, greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """Plain batched sampling from p₀ (or greedy decoding): (tokens [num, T], log p₀ [num]).

    Works for any program whose states carry next-token ``logits`` (an ``LMProgram`` or a wrapper whose
    state has an ``lm`` field)."""
    return _ancestral_jit(key, program, num, greedy)


def _logits(states):
    return states.lm.logits if hasattr(states, "lm") else states.logits


def _ancestral_impl(key, program, num, greedy=False):
    states = jax.vmap(program.init)(jax.random.split(key, num))

    def body(carry, t):
        states, logp = carry
        logits = _logits(states)
        if greedy:
            x = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            x = jax.random.categorical(jax.random.fold_in(key, t), logits).astype(jnp.int32)
        logp = logp + jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, None], axis=1)[:, 0]
        states = jax.vmap(program.update, in_axes=(0, 0, None))(states, x, t)
        return (states, logp), None

    (states, logp), _ = jax.lax.scan(body, (states, jnp.zeros((num,), jnp.float32)), jnp.arange(program.num_steps))
    return jax.vmap(program.output)(states), logp


_ancestral_jit = jax.jit(_ancestral_impl, static_argnums=(2, 3))


def in_place_ancestors(ancestors: jax.Array) -> jax.Array:
    """The same multiset of ancestors, assigned to slots so that every parent with offspring keeps its own slot
    (its first offspring stays) and the extra offspring fill the slots of parents without offspring.

    After resampling the particles are exchangeable (equal weights), so this is still an unbiased resampling;
    only the dead particles' slots change, which is what ``LMProgram.reorder(mode="inplace")`` copies."""
    n = ancestors.shape[0]
    counts = jnp.zeros((n,), jnp.int32).at[ancestors].add(1)
    extras = jnp.repeat(jnp.arange(n, dtype=jnp.int32), jnp.maximum(counts - 1, 0), total_repeat_length=n)
    free = jnp.nonzero(counts == 0, size=n, fill_value=n)[0]
    return jnp.arange(n, dtype=jnp.int32).at[free].set(extras, mode="drop")


def stay_in_place(resampler: Callable) -> Callable:
    """Wrap a resampler ``(key, log_weights, num) -> ancestors`` with :func:`in_place_ancestors`."""

    def resample(key, log_weights, num):
        return in_place_ancestors(resampler(key, log_weights, num).astype(jnp.int32))

    resample.__name__ = f"stay_in_place({getattr(resampler, '__name__', 'resampler')})"
    return resample


def smc_many_prompts(key: jax.Array, model: Transformer, prompts: Sequence[str | Sequence[int]], num_steps: int,
                     reward: Callable, num_particles: int, *, beta: Any = 1.0, tokenizer: Any = None,
                     pad_to: Optional[int] = None, per_prompt_reward: bool = False, cutoff: str = "truncate",
                     banned: Sequence[int] = (), **smc_kwargs: Any) -> list:
    """``pplalign.smc`` on every prompt of a batch, prompts of different lengths in one compiled call.

    Each prompt b has its own particle system σ_b ∝ p₀(x | prompt_b)·e^{r_b(x)/β} (resampling never mixes
    prompts: the particle axis sits inside a ``vmap`` over prompts, and the only state they share, the model's
    weights, is read-only). Prompts are right-padded to one cache length (``pad_to``, default the longest);
    the padding is masked, so it does not change any prompt's p₀.

    Args:
      key: PRNG key; prompt b runs ``pplalign.smc`` with ``jax.random.split(key, B)[b]``, so its result is the
        one of running that prompt alone with that key and ``prompt_cache_len=pad_to``.
      prompts: texts (encoded with ``tokenizer``) or token-id lists.
      reward: r(tokens [T]) shared by every prompt, or, with ``per_prompt_reward=True``, a function
        ``reward(program_b) -> r_b`` called on each prompt's program (e.g. ``lambda p: ClassifierReward.for_program(
        clf, p, ...)``); pass the same function object again to reuse the compiled call.
      cutoff: ``"truncate"`` or ``"force_eos"`` (see the module docstring); with ``"force_eos"`` and neither a
        twist nor a proposal the forcing proposal is used.
      smc_kwargs: passed to ``pplalign.smc`` (``twist``, ``proposal``, ``resampling``, ``ess_threshold``).

    Returns:
      a list of B :class:`pplalign.Particles`, one per prompt, each with its own ``log_Z`` and ``nfe``.
      ``ValueError`` (naming the prompt) when a prompt's reward or twist returned NaN/+inf.
    """
    validate_beta(beta)
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive int; got {num_particles!r}")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of texts or token-id lists")
    if any(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    eos_ids, pad_id, bos_id = special_ids(tokenizer, model)
    if tokenizer is not None:  # as from_prompt: embedding rows beyond the tokenizer are never drawn
        banned = [*banned, *range(tokenizer.vocab_size, model.cfg.vocab_size)]
    if cache_dtype := getattr(model, "cache_dtype", None):
        cache_dtype = jnp.dtype(cache_dtype)
    caches = prompt_caches(model, prompts, pad_to=pad_to, cache_dtype=cache_dtype or jnp.float32, pad_id=pad_id)
    program = LMProgram.build(model, jax.tree_util.tree_map(lambda a: a[0], caches), num_steps, banned=banned,
                              eos_ids=eos_ids, pad_id=pad_id, bos_id=bos_id, cutoff=cutoff)
    keys = jax.random.split(key, len(prompts))
    batched = _many_prompts_jit(keys, caches, program, reward, jnp.asarray(beta, jnp.float32), num_particles,
                                bool(per_prompt_reward), smc_kwargs)
    return _split_prompts(batched, reward, smc_kwargs.get("twist"))


def _many_prompts_impl(keys, caches, program, reward, beta, num_particles, per_prompt_reward, smc_kwargs):
    def one(k, cache):
        prog = dataclasses.replace(program, prompt=cache)
        r = reward(prog) if per_prompt_reward else reward
        kw = dict(smc_kwargs)
        if prog.cutoff == "force_eos" and kw.get("twist") is None and kw.get("proposal") is None:
            kw["proposal"] = prog.proposal
        return pplalign.smc(k, prog.target(r, beta), num_particles, **kw)

    return jax.vmap(one)(keys, caches)


def _split_prompts(batched, reward, twist) -> list:
    out = []
    for b in range(batched.log_Z.shape[0]):
        one = jax.tree_util.tree_map(lambda a: a[b], batched)
        try:
            raise_on_nonfinite(one, reward, twist)
        except ValueError as e:
            raise ValueError(f"prompt {b}: {e}") from None
        out.append(one)
    return out


# arrays are traced, functions, ints and strings are the compile key: one compile per configuration
_many_prompts_jit = filter_jit(_many_prompts_impl)
