"""A flax.nnx decoder for every supported Hugging Face architecture, with the contract of
:class:`models.lm.transformer.Transformer` (so ``LMProgram``, twist heads, rewards and constraints run on it).

Each block is pre-norm: x ← x + Attn(norm₁(x)), x ← x + MLP(norm₂(x)). Attention of query position i over key
position j ≤ i (and i − j < window on GPT-Neo's local layers):

    a_ij = softmax_j( s · q_i·k_j ),   s = 1/√d_head (GPT-Neo: s = 1),

with grouped-query attention (query head h reads key/value head ⌊h / G⌋, G = heads / kv_heads), rotary
embeddings (RoPE, the "rotate half" layout of the Hugging Face checkpoints) applied to q and k at their
absolute positions, and optional RMSNorm of q and k per head (Qwen3). Scores and softmax are computed in
float32 whatever the weights' dtype.

Two entry points, as in the in-house transformer:

* ``model(tokens)`` → (logits [B,S,V], hidden [B,S,D]) and, on request, kv [B, L, 2, S, kv_dim] (keys after
  RoPE and q/k-norm, so a cache never needs re-rotating);
* ``model.decode_step(token, position, prompt_kv, prompt_mask, gen_kv, slot, gen_mask)`` → one token of one
  sequence attending to a shared prompt cache [L, 2, P, kv_dim] and to its own cache [L, 2, T, kv_dim], into
  whose slot ``slot`` it writes. Prompt key j sits at position j; generated slot j at ``position − slot + j``.

"hidden" is the final norm's output, the input of the unembedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import DecoderConfig

__all__ = ["Decoder"]

_NEG = -1e30


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale), computed in float32 and cast back."""

    def __init__(self, dim: int, kind: str, eps: float, param_dtype):
        self.kind, self.eps = kind, float(eps)
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        if kind == "layernorm":
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        h = x.astype(jnp.float32)
        if self.kind == "layernorm":
            h = h - h.mean(-1, keepdims=True)
            h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
            h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        else:
            h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + self.eps)
            h = h * self.scale[...].astype(jnp.float32)
        return h.astype(x.dtype)


def _activation(kind: str, x):
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.kind, self.gated = cfg.activation, cfg.gated_mlp
        if cfg.gated_mlp:
            self.gate, self.up = lin(cfg.d_model, cfg.d_ff), lin(cfg.d_model, cfg.d_ff)
        else:
            self.up = lin(cfg.d_model, cfg.d_ff)
        self.down = lin(cfg.d_ff, cfg.d_model)

    def __call__(self, x):
        if self.gated:
            return self.down(_activation(self.kind, self.gate(x)) * self.up(x))
        return self.down(_activation(self.kind, self.up(x)))


def rotate(x, positions, inv_freq):
    """RoPE in the rotate-half layout: x·cos + rot(x)·sin, rot(x) = (−x₂, x₁); x [..., S, H, Dh], positions [S]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [S, Dh/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, local: bool, dtype, rngs: nnx.Rngs):
        lin = lambda i, o, b: nnx.Linear(i, o, use_bias=b, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q = lin(cfg.d_model, cfg.q_dim, cfg.qkv_bias)
        self.k = lin(cfg.d_model, cfg.kv_dim, cfg.qkv_bias)
        self.v = lin(cfg.d_model, cfg.kv_dim, cfg.qkv_bias)
        self.o = lin(cfg.q_dim, cfg.d_model, cfg.out_bias)
        if cfg.qk_norm:
            self.q_norm = Norm(cfg.head_dim, "rmsnorm", cfg.norm_eps, dtype)
            self.k_norm = Norm(cfg.head_dim, "rmsnorm", cfg.norm_eps, dtype)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qk_norm, self.rope = cfg.qk_norm, cfg.positions == "rope"
        self.scale = 1.0 / float(np.sqrt(cfg.head_dim)) if cfg.scale_attention else 1.0
        self.window = cfg.window if local else 0

    def project(self, x, positions, inv_freq):
        """q [..., S, H, Dh] and the cache entries k, v [..., S, kv_dim] of positions ``positions`` [S]."""
        q = self.q(x).reshape(*x.shape[:-1], self.heads, self.head_dim)
        k = self.k(x).reshape(*x.shape[:-1], self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = rotate(q, positions, inv_freq), rotate(k, positions, inv_freq)
        return q, k.reshape(*x.shape[:-1], -1), self.v(x)

    def allowed(self, q_pos, k_pos):
        """Causal mask [Sq, Sk], and GPT-Neo's local window."""
        ok = k_pos[None, :] <= q_pos[:, None]
        if self.window:
            ok &= (q_pos[:, None] - k_pos[None, :]) < self.window
        return ok

    def scores(self, q, k):
        """q [Sq, H, Dh], k [Sk, kv_dim] → float32 scores [Hkv, G, Sq, Sk] (query head h = kv·G + g)."""
        qg = q.reshape(q.shape[0], self.kv_heads, -1, self.head_dim).astype(jnp.float32)
        kh = k.reshape(k.shape[0], self.kv_heads, self.head_dim).astype(jnp.float32)
        return jnp.einsum("qkgd,skd->kgqs", qg, kh) * self.scale

    def mix(self, weights, v):
        """weights [Hkv, G, Sq, Sk], v [Sk, kv_dim] → [Sq, H·Dh] float32."""
        vh = v.reshape(v.shape[0], self.kv_heads, self.head_dim).astype(jnp.float32)
        out = jnp.einsum("kgqs,skd->qkgd", weights, vh)
        return out.reshape(out.shape[0], -1)

    def __call__(self, q, k, v, mask):
        """One sequence: q [S, H, Dh], k/v [S, kv_dim], mask [S, S] → [S, D]."""
        s = jnp.where(mask, self.scores(q, k), _NEG)
        return self.o(self.mix(jax.nn.softmax(s, axis=-1), v).astype(q.dtype))

    def decode(self, q, key_parts):
        """One query q [1, H, Dh] over several caches [(k [Sk, kv_dim], v, mask [1, Sk])], one softmax."""
        scores = [jnp.where(m, self.scores(q, k), _NEG) for k, _, m in key_parts]
        top = jnp.max(jnp.stack([s.max(-1, keepdims=True) for s in scores]), axis=0)
        expd = [jnp.exp(s - top) for s in scores]
        denom = sum(e.sum(-1, keepdims=True) for e in expd)
        out = sum(self.mix(e / denom, v) for e, (_, v, _) in zip(expd, key_parts))
        return self.o(out.astype(q.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, dtype, rngs: nnx.Rngs):
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, dtype)
        self.attn = Attention(cfg, cfg.layer_kinds[layer] == "local", dtype, rngs)
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)


class Decoder(nnx.Module):
    """A decoder-only LM of any supported architecture. Build from a checkpoint with
    :func:`models.hf.load_pretrained`, or randomly with ``Decoder(cfg, rngs=nnx.Rngs(0))``."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.num_outputs = cfg.vocab_size
        self.dtype = jnp.dtype(dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs)
        if cfg.positions == "learned":
            self.pos = nnx.Embed(cfg.max_len, cfg.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, dtype, rngs) for i in range(cfg.num_layers)])
        self.norm_f = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, dtype)
        if not cfg.tie_embeddings:
            self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def _freqs(self):
        # a constant of the static config, not a parameter: checkpoints do not carry it
        return jnp.asarray(self.cfg.rope_inverse_frequencies(), jnp.float32) if self.cfg.positions == "rope" else None

    def _embed(self, tokens, positions):
        x = self.embed(tokens)
        if self.cfg.positions == "learned":
            x = x + self.pos(positions)
        return x

    def _unembed(self, hidden):
        """float32 logits whatever the weights' dtype: bfloat16 spacing at |logit| ≈ 20 is 0.125."""
        if self.cfg.tie_embeddings:
            return jnp.einsum("...d,vd->...v", hidden, self.embed.embedding[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, self.head.kernel[...], preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, *, return_kv: bool = False):
        """tokens [B, S] → (logits [B,S,V] float32, hidden [B,S,D]) and kv [B, L, 2, S, kv_dim] when
        ``return_kv``. Causal: right padding never changes the outputs at earlier positions."""
        b, s = tokens.shape
        if s > self.cfg.max_len:
            raise ValueError(f"sequence of {s} tokens is longer than the model's max_position_embeddings {self.cfg.max_len}")
        positions = jnp.arange(s)
        x = self._embed(tokens, positions)
        kvs = []
        for block in self.blocks:
            q, k, v = block.attn.project(block.norm1(x), positions, self._freqs())
            mask = block.attn.allowed(positions, positions)
            x = x + jax.vmap(lambda q, k, v: block.attn(q, k, v, mask))(q, k, v)
            x = x + block.mlp(block.norm2(x))
            kvs.append(jnp.stack([k, v], axis=1))  # [B, 2, S, kv_dim]
        hidden = self.norm_f(x)
        logits = self._unembed(hidden)
        if return_kv:
            return logits, hidden, jnp.stack(kvs, axis=1)
        return logits, hidden

    def decode_step(self, token, position, prompt_kv, prompt_mask, gen_kv, slot, gen_mask):
        """Feed one token of one sequence; the arguments and results of ``Transformer.decode_step``, with
        caches of width ``kv_dim`` ([L, 2, P, kv_dim] shared, [L, 2, T, kv_dim] per sequence) and float32 logits."""
        position = jnp.asarray(position, jnp.int32)
        pos1 = position[None]
        x = self._embed(jnp.asarray(token, jnp.int32)[None], pos1)  # [1, D]
        p, t = prompt_kv.shape[2], gen_kv.shape[2]
        prompt_pos = jnp.arange(p)
        gen_pos = position - slot + jnp.arange(t)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.project(block.norm1(x), pos1, self._freqs())
            new = jnp.stack([k, v]).astype(gen_kv.dtype)  # [2, 1, kv_dim]
            gen_kv = jax.lax.dynamic_update_slice(gen_kv, new[None], (layer, 0, slot, 0))
            parts = [
                (prompt_kv[layer, 0], prompt_kv[layer, 1], prompt_mask[None] & block.attn.allowed(pos1, prompt_pos)),
                (gen_kv[layer, 0], gen_kv[layer, 1], gen_mask[None] & block.attn.allowed(pos1, gen_pos)),
            ]
            x = x + block.attn.decode(q, [(kk.astype(x.dtype), vv.astype(x.dtype), m) for kk, vv, m in parts])
            x = x + block.mlp(block.norm2(x))
        hidden = self.norm_f(x)
        return self._unembed(hidden)[0], hidden[0], gen_kv
