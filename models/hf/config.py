"""One configuration for every supported Hugging Face causal-LM architecture, read from ``config.json``.

Each supported ``model_type`` is a pre-norm decoder that differs from the others only in a few switches:

| model_type | norm      | positions          | attention                          | MLP            | embeddings |
|------------|-----------|--------------------|------------------------------------|----------------|------------|
| gpt2       | LayerNorm | learned            | MHA, biases, 1/√d                  | GELU (tanh)    | tied       |
| gpt_neo    | LayerNorm | learned            | MHA, no qkv bias, *no* 1/√d, local | GELU (tanh)    | tied       |
|            |           |                    | layers see the last ``window`` keys|                |            |
| llama      | RMSNorm   | RoPE (+ ``llama3``)| GQA, optional biases               | SiLU-gated     | either     |
| qwen2      | RMSNorm   | RoPE               | GQA, qkv bias                      | SiLU-gated     | either     |
| qwen3      | RMSNorm   | RoPE               | GQA, RMSNorm on q and k per head   | SiLU-gated     | either     |

A field that changes the numerics and that this code does not implement (another RoPE scaling, sliding
windows, soft-capping, mixture of experts, ...) raises a ``ValueError`` naming it: a model is loaded exactly
or not at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

__all__ = ["DecoderConfig", "SUPPORTED_MODEL_TYPES", "config_from_hf"]

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neo", "llama", "qwen2", "qwen3")

# Fields of other architectures (or options of these) that change the computation and are not implemented.
# Each is refused unless it holds its "off" value.
_UNSUPPORTED_UNLESS_OFF = {
    "use_sliding_window": (False, None),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "partial_rotary_factor": (None, 1.0),
    "use_parallel_residual": (None, False),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "quantization_config": (None,),
    "use_mrope": (None, False),
    "scale_attn_by_inverse_layer_idx": (None, False),
    "reorder_and_upcast_attn": (None, False),
    "add_cross_attention": (None, False),
    "pretraining_tp": (None, 1),
    "qk_layernorm": (None, False),
    "embedding_multiplier": (None, 1.0),
    "logits_scaling": (None, 1.0),
    "residual_multiplier": (None, 1.0),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The decoder's static configuration (hashable: it is part of the compile key).

    ``d_model`` is the residual width, ``kv_dim = num_kv_heads · head_dim`` the width of one layer's cached
    keys (and values); the per-particle cache of :class:`models.lm.program.LMProgram` is [L, 2, T, kv_dim]."""

    model_type: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_len: int
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    activation: str  # "gelu_tanh" | "gelu" | "silu" | "relu"
    gated_mlp: bool
    positions: str  # "learned" | "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) items of a llama3 scaling, or None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    scale_attention: bool = True
    layer_kinds: tuple = ()  # "global" | "local" per layer
    window: int = 0  # local attention: a query sees keys at most window-1 positions back
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int; got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        if len(self.layer_kinds) != self.num_layers:
            raise ValueError(f"{len(self.layer_kinds)} attention layer kinds for {self.num_layers} layers")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def rope_inverse_frequencies(self):
        """θ_i = rope_theta^(−2i/head_dim), i < head_dim/2, rescaled by ``llama3`` scaling when configured:
        wavelengths longer than L/low_freq_factor are divided by ``factor``, shorter than L/high_freq_factor
        kept, and those between interpolated linearly in L/wavelength (L = original context; Llama 3.1).
        Computed in float32 as transformers does, so that the angles agree to the last bit at long contexts."""
        import numpy as np

        f32 = np.float32
        exponent = np.arange(0, self.head_dim, 2).astype(f32) / f32(self.head_dim)
        inv = (f32(1.0) / np.power(f32(self.rope_theta), exponent)).astype(f32)
        if self.rope_scaling is None:
            return inv
        s = dict(self.rope_scaling)
        factor, low, high = f32(s["factor"]), f32(s["low_freq_factor"]), f32(s["high_freq_factor"])
        old = f32(s["original_max_position_embeddings"])
        wavelen = f32(2 * math.pi) / inv
        smooth = (old / wavelen - low) / (high - low)
        mid = (f32(1) - smooth) * inv / factor + smooth * inv
        return np.where(wavelen > old / low, inv / factor, np.where(wavelen < old / high, inv, mid)).astype(f32)


def _need(cfg: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    raise ValueError(f"config.json lacks {' / '.join(names)}")


def _check_off(cfg: Mapping[str, Any], model_type: str) -> None:
    for name, off in _UNSUPPORTED_UNLESS_OFF.items():
        if name in cfg and cfg[name] not in off:
            raise ValueError(f"config.json of a {model_type!r} model sets {name}={cfg[name]!r}, which pplalign does not "
                             f"implement (supported: {name} in {list(off)})")
    kinds = cfg.get("layer_types")
    if kinds is not None and any(k != "full_attention" for k in kinds):
        raise ValueError(f"config.json sets layer_types={sorted(set(kinds))}: only 'full_attention' layers are supported")


def _rope(cfg: Mapping[str, Any]) -> tuple[float, Optional[tuple]]:
    """rope_theta and the scaling, from ``rope_scaling`` (transformers 4; when present it replaces the
    scaling of ``rope_parameters``, as in transformers) or ``rope_parameters`` (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    if not isinstance(params, Mapping) or (scaling is not None and not isinstance(scaling, Mapping)):
        raise ValueError("config.json's rope_parameters / rope_scaling must be JSON objects")
    source = dict(scaling) if scaling else dict(params)
    theta = float(params.get("rope_theta", source.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    kind = source.get("rope_type", source.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"config.json asks for RoPE scaling {kind!r}; supported: 'default' (none) and 'llama3'")
    # the original context: a top-level field first, then the scaling's own, then max_position_embeddings
    source["original_max_position_embeddings"] = (cfg.get("original_max_position_embeddings")
                                                  or source.get("original_max_position_embeddings")
                                                  or cfg.get("max_position_embeddings"))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if source.get(k) is None]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks {missing}")
    return theta, tuple(sorted((k, float(source[k])) for k in keys))


_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
                "swish": "silu", "relu": "relu"}


ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}  # ours → HF


def _activation(name: str) -> str:
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _gpt2(cfg) -> dict:
    d = int(_need(cfg, "n_embd", "hidden_size"))
    heads = int(_need(cfg, "n_head", "num_attention_heads"))
    layers = int(_need(cfg, "n_layer", "num_hidden_layers"))
    if d % heads:
        raise ValueError(f"n_embd ({d}) is not divisible by n_head ({heads})")
    if cfg.get("scale_attn_weights", True) is not True:
        raise ValueError("config.json sets scale_attn_weights=False, which pplalign does not implement for gpt2")
    return dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                d_ff=int(cfg.get("n_inner") or 4 * d), max_len=int(_need(cfg, "n_positions", "max_position_embeddings")),
                norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                activation=_activation(cfg.get("activation_function", "gelu_new")), gated_mlp=False,
                positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                layer_kinds=("global",) * layers, tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _gpt_neo(cfg) -> dict:
    d = int(_need(cfg, "hidden_size"))
    heads = int(_need(cfg, "num_heads", "num_attention_heads"))
    layers = int(_need(cfg, "num_layers", "num_hidden_layers"))
    kinds = []
    try:
        for pattern, repeat in _need(cfg, "attention_types"):
            kinds += list(pattern) * int(repeat)
    except (TypeError, ValueError):
        raise ValueError(f"gpt_neo attention_types must be [[[kinds...], repeat], ...]; got {cfg.get('attention_types')!r}") from None
    if len(kinds) != layers or any(k not in ("global", "local") for k in kinds):
        raise ValueError(f"gpt_neo attention_types give {kinds} for {layers} layers (each 'global' or 'local')")
    if d % heads:
        raise ValueError(f"hidden_size ({d}) is not divisible by num_heads ({heads})")
    return dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                d_ff=int(cfg.get("intermediate_size") or 4 * d), max_len=int(_need(cfg, "max_position_embeddings")),
                norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                activation=_activation(cfg.get("activation_function", "gelu_new")), gated_mlp=False,
                positions="learned", qkv_bias=False, out_bias=True, mlp_bias=True, scale_attention=False,
                layer_kinds=tuple(kinds), window=int(cfg.get("window_size", 256)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _llama_like(cfg, *, qkv_bias: bool, qk_norm: bool) -> dict:
    d = int(_need(cfg, "hidden_size"))
    heads = int(_need(cfg, "num_attention_heads"))
    layers = int(_need(cfg, "num_hidden_layers"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or d // heads)
    theta, scaling = _rope(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    return dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                d_ff=int(_need(cfg, "intermediate_size")), max_len=int(_need(cfg, "max_position_embeddings")),
                norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                activation=_activation(cfg.get("hidden_act", "silu")), gated_mlp=True, positions="rope",
                rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias or attention_bias, out_bias=attention_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=qk_norm, layer_kinds=("global",) * layers,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


_BUILDERS = {
    "gpt2": _gpt2,
    "gpt_neo": _gpt_neo,
    "llama": lambda c: _llama_like(c, qkv_bias=False, qk_norm=False),
    "qwen2": lambda c: _llama_like(c, qkv_bias=True, qk_norm=False),
    "qwen3": lambda c: _llama_like(c, qkv_bias=False, qk_norm=True),
}


def config_from_hf(cfg: Mapping[str, Any]) -> DecoderConfig:
    """A :class:`DecoderConfig` from the parsed ``config.json`` of a supported architecture."""
    if not isinstance(cfg, Mapping):
        raise ValueError("config.json must hold a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in _BUILDERS:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    _check_off(cfg, model_type)
    if cfg.get("is_encoder_decoder"):
        raise ValueError("encoder-decoder models are not supported: pplalign loads decoder-only causal LMs")
    fields = _BUILDERS[model_type](cfg)
    return DecoderConfig(model_type=model_type, vocab_size=int(_need(cfg, "vocab_size")), **fields)
