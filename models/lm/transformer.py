"""A decoder-only transformer (flax.nnx) with a key/value cache for incremental decoding.

Pre-LayerNorm blocks, learned absolute positions, GELU MLP, untied unembedding (Vaswani et al. 2017;
Radford et al. 2019). Two entry points:

* ``model(tokens)`` — the whole sequence at once (training, prompt prefill): logits, final hidden states and,
  on request, every layer's keys and values ``kv[B, L, 2, S, D]``.
* ``model.decode_step(...)`` — one new token of *one* sequence, attending to a prompt cache (which may be
  shared by every sequence: pass it unbatched under ``vmap``) and to the sequence's own cache of generated
  tokens, into which it writes the new key/value. This is what a ``Sequential`` program's ``update`` runs.

The "hidden" output is the final LayerNorm's output, the input of the unembedding; a twist head reads it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LMConfig", "Transformer"]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    max_len: int = 48

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int; got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of one layer's cached keys (every head has its own keys here)."""
        return self.d_model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LMConfig":
        return cls(**json.loads(text))


class Block(nnx.Module):
    def __init__(self, cfg: LMConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.ff1 = nnx.Linear(d, cfg.d_ff, rngs=rngs)
        self.ff2 = nnx.Linear(cfg.d_ff, d, rngs=rngs)

    def _split(self, x):  # [..., D] -> [..., H, Dh]
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def mlp(self, x):
        return x + self.ff2(jax.nn.gelu(self.ff1(self.ln2(x))))

    def __call__(self, x, mask):
        """x [B, S, D], mask [B or 1, S, S] (True = may attend); returns (x, k [B,S,D], v [B,S,D])."""
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        qh, kh, vh = self._split(q), self._split(k), self._split(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / jnp.sqrt(qh.shape[-1]).astype(x.dtype)
        scores = jnp.where(mask[:, None], scores, -1e30)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), vh)
        x = x + self.out(att.reshape(x.shape))
        return self.mlp(x), k, v

    def decode(self, x, k_prompt, v_prompt, prompt_mask, k_gen, v_gen, gen_mask):
        """One position. x [D]; k/v_prompt [P, D]; k/v_gen [T, D] (already holding this position's k/v at its
        slot, via ``project_kv``); masks [P], [T]."""
        q = self._split(self.qkv(self.ln1(x))[: x.shape[-1]])  # [H, Dh]
        scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
        kp, vp = self._split(k_prompt.astype(q.dtype)), self._split(v_prompt.astype(q.dtype))
        kg, vg = self._split(k_gen.astype(q.dtype)), self._split(v_gen.astype(q.dtype))
        sp = jnp.where(prompt_mask[None], jnp.einsum("hd,phd->hp", q, kp) * scale, -1e30)
        sg = jnp.where(gen_mask[None], jnp.einsum("hd,thd->ht", q, kg) * scale, -1e30)
        m = jnp.maximum(sp.max(-1, keepdims=True), sg.max(-1, keepdims=True))
        ep, eg = jnp.exp(sp - m), jnp.exp(sg - m)
        denom = ep.sum(-1, keepdims=True) + eg.sum(-1, keepdims=True)
        att = (jnp.einsum("hp,phd->hd", ep, vp) + jnp.einsum("ht,thd->hd", eg, vg)) / denom
        x = x + self.out(att.reshape(x.shape))
        return self.mlp(x)

    def project_kv(self, x):
        """This position's key and value, [D] each."""
        _, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        return k, v


class Transformer(nnx.Module):
    """Decoder-only LM. Construct with ``Transformer(cfg, rngs=nnx.Rngs(seed))``."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, num_outputs: Optional[int] = None):
        """``num_outputs`` replaces the vocabulary-sized unembedding by a head of that size (a classifier
        over every prefix: the reward models and the process reward model)."""
        self.cfg = cfg
        self.num_outputs = int(num_outputs or cfg.vocab_size)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, self.num_outputs, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, return_kv: bool = False):
        """tokens [B, S] → (logits [B,S,V], hidden [B,S,D]) and kv [B, L, 2, S, D] when ``return_kv``.

        Causal attention only: right padding never changes the outputs at earlier positions."""
        b, s = tokens.shape
        if s > self.cfg.max_len:
            raise ValueError(f"sequence of {s} tokens is longer than the model's max_len {self.cfg.max_len}")
        x = self.embed(tokens) + self.pos(jnp.arange(s))[None]
        mask = jnp.tril(jnp.ones((s, s), bool))[None]
        kvs = []
        for block in self.blocks:
            x, k, v = block(x, mask)
            kvs.append(jnp.stack([k, v], axis=1))  # [B, 2, S, D]
        hidden = self.ln_f(x)
        logits = self.head(hidden)
        if return_kv:
            return logits, hidden, jnp.stack(kvs, axis=1)
        return logits, hidden

    def decode_step(self, token, position, prompt_kv, prompt_mask, gen_kv, slot, gen_mask):
        """Feed one token of one sequence.

        Args:
          token: [] int, position: [] int (absolute, < max_len), prompt_kv: [L, 2, P, D] (shared),
          prompt_mask: [P] bool, gen_kv: [L, 2, T, D] this sequence's cache, slot: [] int where to write,
          gen_mask: [T] bool, the generated slots to attend to (must include ``slot``).
        Returns:
          (logits [V], hidden [D], gen_kv with slot ``slot`` written in every layer).
        """
        x = self.embed(jnp.asarray(token, jnp.int32)) + self.pos(jnp.asarray(position, jnp.int32))
        for layer, block in enumerate(self.blocks):
            k, v = block.project_kv(x)
            new = jnp.stack([k, v])[:, None, :].astype(gen_kv.dtype)  # [2, 1, D]
            gen_kv = jax.lax.dynamic_update_slice(gen_kv, new[None], (layer, 0, slot, 0))
            x = block.decode(x, prompt_kv[layer, 0], prompt_kv[layer, 1], prompt_mask,
                             gen_kv[layer, 0], gen_kv[layer, 1], gen_mask)
        hidden = self.ln_f(x)
        return self.head(hidden), hidden, gen_kv


def num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
