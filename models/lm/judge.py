"""An LM-as-judge reward: r(x) = log p_judge(yes | template(prompt, x)), from any loaded causal LM.

The template is text with one ``{x}`` (where the generated continuation goes) and optionally ``{prompt}``,
e.g. ``"Story: {prompt}{x}\\nIs this story happy? Answer:"`` with ``yes=" Yes"``. It splits at ``{x}`` into a
prefix a and a suffix c, each encoded once with the judge's tokenizer, and the judge reads the ids

    a ++ x_{<L} ++ c,      r(x) = log softmax(f_judge(a ++ x_{<L} ++ c))_{last}[yes],

where L is the position of x's first end token (T when it has none): the ids are concatenated, not the texts
re-encoded (so a BPE merge across the boundary of x does not happen; this is what the policy generated).
With β = 1 the target σ ∝ p₀(x) p_judge(yes | x) is the posterior of x given the judge's verdict.

Work is done once where it can be (DESIGN §3): the prefix a, shared by every particle, is prefilled once
into a :class:`models.lm.program.PromptCache` held unbatched in the reward; each call feeds only x and c
through the judge's ``decode_step`` (the decoder contract of ``Transformer`` and ``models.hf.Decoder``), one
slot a token, so under the samplers' particle ``vmap`` it is one batched decode of |x| + |c| steps.

The ids of x go into the judge directly only when judge and policy share a tokenizer. Another tokenizer is
refused with a ``ValueError`` unless ``retokenize`` is given: a jax-traceable function tokens [T] → (judge
ids [M], length []) that maps the policy's ids to the judge's (e.g. a per-token lookup table).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .program import LMProgram, PromptCache, prompt_caches

__all__ = ["JudgeReward", "same_vocabulary"]


def _is_hf(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "backend")


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token to the same id (a Hugging Face one's full vocabulary with its
    added tokens, or the in-house word list)."""
    if a is b:
        return True
    if _is_hf(a) and _is_hf(b):
        return a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(with_added_tokens=True)
    if not _is_hf(a) and not _is_hf(b):
        return a == b
    return False


def _encode(tokenizer: Any, text: str, *, specials: bool) -> list[int]:
    """Ids of ``text``; with ``specials`` the tokenizer's own start (HF post-processor, in-house <bos>)."""
    try:
        if _is_hf(tokenizer):
            return tokenizer.encode(text, add_special_tokens=specials)
        return tokenizer.encode(text, bos=specials)
    except Exception as e:  # the tokenizers library raises a bare Exception for e.g. a word-level unknown word
        raise ValueError(f"the judge's tokenizer cannot encode {text!r}: {e}") from None


def _prompt_text(program: LMProgram, tokenizer: Any) -> str:
    ids = np.asarray(program.prompt.tokens)[: int(program.prompt.length)]
    if _is_hf(tokenizer):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JudgeReward:
    """r(x) = log p_judge(yes | prefix ++ x ++ suffix) (module docstring). Build with :meth:`build`."""

    model: Any  # the judge: a Transformer or models.hf.Decoder
    prefix: PromptCache  # the template up to {x}, prefilled once (unbatched)
    suffix: jax.Array  # [S] int32 judge ids after {x}
    eos_ids: jax.Array  # the policy's end ids: x is cut before the first
    yes_id: int = dataclasses.field(metadata=dict(static=True))
    num_steps: int = dataclasses.field(metadata=dict(static=True))
    x_slots: int = dataclasses.field(metadata=dict(static=True))  # M: judge ids of x (T without retokenize)
    filler: int = dataclasses.field(metadata=dict(static=True))  # an id fed after the answer position
    retokenize: Optional[Callable] = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def build(cls, judge_model: Any, judge_tokenizer: Any, program: LMProgram, *,
              template: str = "{prompt}{x}\nIs this a good continuation? Answer:", yes: str = " Yes",
              prompt: Optional[str] = None, policy_tokenizer: Any = None,
              retokenize: Optional[Callable] = None) -> "JudgeReward":
        """A judge reward for ``program``'s generations.

        Args:
          judge_model, judge_tokenizer: any loaded causal LM and its tokenizer (``models.hf.load_pretrained``,
            ``models.lm.checkpoint.load_model``).
          program: the policy's :class:`LMProgram` (its T, end ids and prompt).
          template: text with one ``{x}`` and optionally ``{prompt}``.
          yes: the answer whose log-probability is the reward; one token of the judge's vocabulary.
          prompt: the text put at ``{prompt}``; default the program's prompt decoded with the policy's tokenizer.
          policy_tokenizer: the policy's tokenizer, compared with the judge's (default: assumed to be the
            judge's, which is then checked by vocabulary size only).
          retokenize: tokens [T] → (judge ids [M], length []), jax-traceable; required when the tokenizers differ.

        Raises ``ValueError`` for another tokenizer without ``retokenize``, a template without exactly one
        ``{x}``, a ``yes`` that is not one token, or prefix + x + suffix longer than the judge's max_len.
        """
        if template.count("{x}") != 1:
            raise ValueError(f"the template must contain '{{x}}' exactly once; got {template!r}")
        judge_vocab = judge_model.cfg.vocab_size
        if retokenize is None:
            if policy_tokenizer is not None and not same_vocabulary(policy_tokenizer, judge_tokenizer):
                raise ValueError("the judge's tokenizer is not the policy's (their vocabularies differ): the policy's "
                                 "ids would be read as other tokens; pass retokenize= (policy ids -> judge ids)")
            if program.vocab_size != judge_vocab:
                raise ValueError(f"the judge has {judge_vocab} tokens and the policy {program.vocab_size}: another "
                                 "tokenizer; pass retokenize= (policy ids -> judge ids) to re-tokenise x explicitly")
        if prompt is None:
            prompt = _prompt_text(program, policy_tokenizer or judge_tokenizer)
        before, after = (part.replace("{prompt}", prompt) for part in template.split("{x}"))
        prefix_ids = _encode(judge_tokenizer, before, specials=True)
        suffix_ids = _encode(judge_tokenizer, after, specials=False)
        yes_ids = _encode(judge_tokenizer, yes, specials=False)
        if len(yes_ids) != 1:
            raise ValueError(f"yes={yes!r} must be one token of the judge's vocabulary; it encodes to {yes_ids}")
        if not prefix_ids:
            raise ValueError("the template's text before {x} encodes to no tokens (and the tokenizer adds no start "
                             "token): the judge needs a non-empty prefix")
        steps = program.num_steps
        if retokenize is None:
            x_slots = steps
        else:
            shape = jax.eval_shape(retokenize, jax.ShapeDtypeStruct((steps,), jnp.int32))
            if not (isinstance(shape, tuple) and len(shape) == 2 and len(shape[0].shape) == 1 and shape[1].shape == ()):
                raise ValueError(f"retokenize must map tokens [{steps}] to (ids [M], length []); got {shape}")
            x_slots = int(shape[0].shape[0])
        total = len(prefix_ids) + x_slots + len(suffix_ids)
        if total > judge_model.cfg.max_len:
            raise ValueError(f"template prefix ({len(prefix_ids)}) + x ({x_slots}) + suffix ({len(suffix_ids)}) = "
                             f"{total} tokens exceed the judge's max_len {judge_model.cfg.max_len}")
        cache_dtype = getattr(judge_model, "cache_dtype", None) or jnp.float32
        prefix = jax.tree_util.tree_map(lambda a: a[0], prompt_caches(judge_model, [prefix_ids],
                                                                      cache_dtype=jnp.dtype(cache_dtype)))
        return cls(judge_model, prefix, jnp.asarray(suffix_ids, jnp.int32).reshape(-1), program.eos_ids,
                   int(yes_ids[0]), steps, x_slots, int(prefix_ids[-1]), retokenize)

    def judge_ids(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(ids [M], L): x in the judge's vocabulary and its length before the first end token."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.shape != (self.num_steps,):
            raise ValueError(f"JudgeReward expects tokens of shape ({self.num_steps},); got {tokens.shape}")
        if self.retokenize is not None:
            ids, length = self.retokenize(tokens)
            return jnp.asarray(ids, jnp.int32), jnp.asarray(length, jnp.int32)
        is_end = jnp.any(tokens[:, None] == self.eos_ids[None, :], axis=1)
        length = jnp.where(jnp.any(is_end), jnp.argmax(is_end), self.num_steps).astype(jnp.int32)
        return tokens, length

    def sequence(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(ids [M + S], answer slot): x_{<L} ++ suffix ++ filler, and the slot whose logits give the verdict
        (−1: the prefix's own last logits, when x and the suffix are both empty)."""
        ids, length = self.judge_ids(tokens)
        s = self.suffix.shape[0]
        j = jnp.arange(self.x_slots + s)
        from_suffix = jnp.take(self.suffix, jnp.clip(j - length, 0, max(s - 1, 0)), mode="clip") if s else self.filler
        seq = jnp.where(j < length, jnp.take(ids, jnp.clip(j, 0, self.x_slots - 1)),
                        jnp.where(j < length + s, from_suffix, self.filler))
        return seq.astype(jnp.int32), length + s - 1

    def log_probs(self, tokens: jax.Array) -> jax.Array:
        """[V_judge] the judge's next-token log-probabilities at the end of template(prompt, x)."""
        seq, answer = self.sequence(tokens)
        cfg = self.model.cfg
        slots = seq.shape[0]
        gen_kv = jnp.zeros((cfg.num_layers, 2, slots, cfg.kv_dim), self.prefix.kv.dtype)

        def body(carry, j):
            kv, picked = carry
            logits, _, kv = self.model.decode_step(seq[j], self.prefix.length + j, self.prefix.kv, self.prefix.mask,
                                                   kv, j, jnp.arange(slots) <= j)
            # keep the logits of the answer slot; the slots after it are fed but never read (causal)
            return (kv, jnp.where(j == answer, logits.astype(jnp.float32), picked)), None

        start = self.prefix.logits.astype(jnp.float32)  # answer == −1: x and suffix empty
        (_, logits), _ = jax.lax.scan(body, (gen_kv, start), jnp.arange(slots))
        return jax.nn.log_softmax(logits)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.log_probs(tokens)[self.yes_id]
