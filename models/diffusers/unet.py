"""``UNet2DModel``: diffusers' ``UNet2DModel`` (the DDPM UNet of Ho et al. 2020, as diffusers builds it) in
flax.nnx, with the same numerics, so that a diffusers checkpoint gives the same ε (or v, or x₀) prediction.

Layout: the public call takes and returns **NCHW** arrays, as diffusers and its checkpoints do
(``sample[B, C, H, W]``, or one particle ``[C, H, W]``); inside, activations are NHWC, the layout XLA's
convolutions and ``nnx.Conv`` use. Attribute names mirror diffusers' module names (``down_blocks[i].resnets[j]
.norm1`` …) so that :mod:`models.diffusers.weights` maps tensors by name.

The network, for timestep t and optional class c (diffusers' ``forward``):

* time embedding e = W₂ silu(W₁ φ(t)) (+ E[c]), with φ the sinusoidal embedding of width C₀ (first block
  width): frequencies ω_k = exp(−k ln 10⁴ / (C₀/2 − freq_shift)), k < C₀/2, φ = [sin ωt, cos ωt] (or
  [cos, sin] when ``flip_sin_to_cos``) (Vaswani et al. 2017; Ho et al. 2020);
* ResnetBlock2D: h = conv₁ silu(GN₁ x); h += W_t silu(e) (or GN₂ h·(1+s)+b for ``scale_shift``);
  out = (shortcut(x) + conv₂ silu(GN₂ h)) / output_scale_factor;
* attention block: x + softmax(q kᵀ/√d) v over the H·W positions of GN(x), per head, then / rescale factor;
* down path (resnets, attention, strided 3×3 conv), a middle block (resnet, attention, resnet), an up path
  whose resnets take the skip activations concatenated on channels (nearest ×2 upsampling then 3×3 conv),
  and GN → silu → 3×3 conv out.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .config import UNetConfig

__all__ = ["UNet2DModel", "timestep_embedding"]


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10_000.0) -> jax.Array:
    """φ(t) [..., dim], diffusers' ``get_timestep_embedding`` (sin half first unless ``flip_sin_to_cos``)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    arg = jnp.asarray(t, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(arg), jnp.sin(arg)] if flip_sin_to_cos else [jnp.sin(arg), jnp.cos(arg)], -1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class _GroupNorm(nnx.Module):
    """torch's GroupNorm on NHWC, computed in float32 (two-pass variance, as torch)."""

    def __init__(self, channels: int, groups: int, eps: float, dtype, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
                                  dtype=jnp.float32, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(x.astype(jnp.float32)).astype(x.dtype)


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, dtype, rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), dtype=dtype,
                    param_dtype=dtype, rngs=rngs)


def _linear(cin: int, cout: int, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig, scale: float, dtype, rngs: nnx.Rngs):
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        self.output_scale_factor = float(scale)
        self.norm1 = _GroupNorm(cin, g, eps, dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, 1, 1, dtype, rngs)
        self.time_emb_proj = _linear(cfg.time_embed_dim, cout * (2 if self.scale_shift else 1), dtype, rngs)
        self.norm2 = _GroupNorm(cout, g, eps, dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, 1, 1, dtype, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, 1, 0, dtype, rngs) if cin != cout else None

    def __call__(self, x, temb):
        h = self.conv1(nnx.silu(self.norm1(x)))
        t = self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        if self.scale_shift:
            s, b = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + s) + b
        else:
            h = self.norm2(h + t)
        h = self.conv2(nnx.silu(h))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Attention(nnx.Module):
    """diffusers' ``Attention`` as built for UNet2D blocks (residual, optional group norm, biased q/k/v)."""

    def __init__(self, channels: int, head_dim: int, groups: Optional[int], cfg: UNetConfig, scale: float,
                 dtype, rngs: nnx.Rngs):
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.rescale = float(scale)
        self.group_norm = _GroupNorm(channels, groups, cfg.norm_eps, dtype, rngs) if groups else None
        self.to_q = _linear(channels, channels, dtype, rngs)
        self.to_k = _linear(channels, channels, dtype, rngs)
        self.to_v = _linear(channels, channels, dtype, rngs)
        self.to_out = nnx.List([_linear(channels, channels, dtype, rngs)])

    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = h.reshape(b, hh * ww, c)
        split = lambda y: y.reshape(b, hh * ww, self.heads, self.head_dim)
        q, k, v = split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(self.head_dim)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # softmax in float32 (diffusers' upcast_softmax)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, hh * ww, c)
        out = self.to_out[0](out).reshape(b, hh, ww, c)
        return (out + x) / self.rescale


class Downsample2D(nnx.Module):
    def __init__(self, channels: int, padding: int, dtype, rngs):
        self.padding = padding
        self.conv = _conv(channels, channels, 3, 2, padding, dtype, rngs)

    def __call__(self, x):
        if self.padding == 0:  # diffusers pads one row/column on the bottom/right, then a valid conv
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, dtype, rngs):
        self.conv = _conv(channels, channels, 3, 1, 1, dtype, rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest ×2


def _head_dim(cfg: UNetConfig, channels: int) -> int:
    return cfg.attention_head_dim if cfg.attention_head_dim is not None else channels


class DownBlock(nnx.Module):
    """``DownBlock2D`` (``attention=False``) or ``AttnDownBlock2D``; returns (h, skip activations)."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, attention: bool, downsample: bool, dtype, rngs):
        n = cfg.layers_per_block
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, cfg, 1.0, dtype, rngs) for i in range(n)])
        self.attentions = nnx.List([Attention(cout, _head_dim(cfg, cout), cfg.norm_num_groups, cfg, 1.0, dtype, rngs)
                                    for _ in range(n)] if attention else [])
        self.downsamplers = nnx.List([Downsample2D(cout, cfg.downsample_padding, dtype, rngs)] if downsample else [])

    def __call__(self, h, temb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):
                h = self.attentions[i](h)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class UpBlock(nnx.Module):
    """``UpBlock2D`` or ``AttnUpBlock2D``: ``layers_per_block + 1`` resnets, each fed one skip activation."""

    def __init__(self, cin: int, cout: int, prev: int, cfg: UNetConfig, attention: bool, upsample: bool, dtype, rngs):
        n = cfg.layers_per_block + 1
        self.resnets = nnx.List([ResnetBlock2D((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, cfg,
                                               1.0, dtype, rngs) for i in range(n)])
        self.attentions = nnx.List([Attention(cout, _head_dim(cfg, cout), cfg.norm_num_groups, cfg, 1.0, dtype, rngs)
                                    for _ in range(n)] if attention else [])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype, rngs)] if upsample else [])

    def __call__(self, h, skips, temb):
        for i, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb)
            if len(self.attentions):
                h = self.attentions[i](h)
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(nnx.Module):
    """``UNetMidBlock2D`` with one layer: resnet, attention (if ``add_attention``), resnet."""

    def __init__(self, channels: int, cfg: UNetConfig, dtype, rngs):
        s = cfg.mid_block_scale_factor
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, cfg, s, dtype, rngs) for _ in range(2)])
        groups = cfg.attn_norm_num_groups
        if groups is None and cfg.resnet_time_scale_shift == "default":
            groups = cfg.norm_num_groups
        self.attentions = nnx.List([Attention(channels, _head_dim(cfg, channels), groups, cfg, s, dtype, rngs)]
                                   if cfg.add_attention else [])

    def __call__(self, h, temb):
        h = self.resnets[0](h, temb)
        for attn in self.attentions:
            h = attn(h)
        return self.resnets[1](h, temb)


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin: int, cout: int, dtype, rngs):
        self.linear_1 = _linear(cin, cout, dtype, rngs)
        self.linear_2 = _linear(cout, cout, dtype, rngs)

    def __call__(self, x):
        return self.linear_2(nnx.silu(self.linear_1(x)))


class UNet2DModel(nnx.Module):
    """diffusers' ``UNet2DModel`` in flax.nnx. ``model(sample, timestep, class_labels=None)`` → the network
    output (ε, v or x₀ as the checkpoint was trained; the scheduler config says which), same shape as sample.

    Args of the call:
      sample: ``[B, C, H, W]`` (NCHW, as diffusers), or ``[C, H, W]`` for one particle (returns ``[C, H, W]``);
        H and W must be divisible by 2^(number of downsamples), C must be ``in_channels``.
      timestep: the scheduler's timestep t ∈ [0, num_train_timesteps) (diffusers' indexing), scalar or ``[B]``;
        float values are allowed (the embedding is continuous in t).
      class_labels: int ``[B]`` (or scalar) for a UNet with ``num_class_embeds``; must be None otherwise.
    """

    def __init__(self, cfg: UNetConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype).name
        ch = cfg.block_out_channels
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, 1, 1, dtype, rngs)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, dtype, rngs)
        self.class_embedding = (nnx.Embed(int(cfg.num_class_embeds), cfg.time_embed_dim, dtype=dtype, param_dtype=dtype,
                                          rngs=rngs) if cfg.num_class_embeds is not None else None)
        last = len(ch) - 1
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, t == "AttnDownBlock2D", i < last, dtype, rngs)
            for i, t in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], cfg, dtype, rngs) if cfg.mid_block_type is not None else None
        rev = ch[::-1]
        self.up_blocks = nnx.List([
            UpBlock(rev[min(i + 1, last)], rev[i], rev[max(i - 1, 0)], cfg, t == "AttnUpBlock2D", i < last, dtype, rngs)
            for i, t in enumerate(cfg.up_block_types)])
        self.conv_norm_out = _GroupNorm(ch[0], cfg.norm_num_groups, cfg.norm_eps, dtype, rngs)
        self.conv_out = _conv(ch[0], cfg.out_channels, 3, 1, 1, dtype, rngs)

    def check_sample_shape(self, shape: tuple) -> None:
        """Raise ``ValueError`` unless ``shape`` is ``[B, C, H, W]`` or ``[C, H, W]`` this UNet can take."""
        cfg, div = self.config, 2 ** self.config.num_downsamples
        if len(shape) not in (3, 4):
            raise ValueError(f"sample has shape {tuple(shape)}; the UNet takes [B, C, H, W] or [C, H, W] (NCHW)")
        c, h, w = shape[-3:]
        if c != cfg.in_channels:
            raise ValueError(f"sample has {c} channels (shape {tuple(shape)}, NCHW) but the UNet takes "
                             f"in_channels={cfg.in_channels}")
        if h % div or w % div or h == 0 or w == 0:
            raise ValueError(f"sample height×width {h}×{w} is not divisible by 2^{cfg.num_downsamples} = {div} "
                             f"(the UNet downsamples {cfg.num_downsamples} times)")

    def __call__(self, sample: jax.Array, timestep: jax.Array, class_labels: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        sample = jnp.asarray(sample)
        self.check_sample_shape(sample.shape)
        single = sample.ndim == 3
        x = (sample[None] if single else sample).transpose(0, 2, 3, 1).astype(self.dtype)
        b = x.shape[0]
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                      cfg.freq_shift).astype(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional (num_class_embeds="
                                 f"{cfg.num_class_embeds}); pass class_labels")
            temb = temb + self.class_embedding(jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (b,)))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (its config has no num_class_embeds)")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb)
            skips.extend(s)
        if self.mid_block is not None:
            h = self.mid_block(h, temb)
        for block in self.up_blocks:
            h = block(h, skips, temb)
        out = self.conv_out(nnx.silu(self.conv_norm_out(h))).transpose(0, 3, 1, 2)
        return out[0] if single else out
