"""``save_pretrained``: write a model as a Hugging Face GPT-2 checkpoint that transformers itself loads.

The in-house :class:`models.lm.transformer.Transformer` is a GPT-2 in all but two details, both mapped exactly:

* its LayerNorm ε is flax's 1e-6 (GPT-2's config field ``layer_norm_epsilon`` takes it);
* its unembedding has a bias b, which GPT-2's ``lm_head`` lacks. The final LayerNorm's output is
  h = s ⊙ x̂ + c with Σ_d x̂_d = 0, so adding a_j / s_d to column j of the unembedding W changes the logit by
  a_j·(Σ_d x̂_d + Σ_d c_d / s_d) = a_j·S. With a_j = b_j / S the bias is absorbed and the hidden state, which
  twist heads read, is unchanged. The residual error (float32 rounding of Σ x̂ ≈ 0 amplified by |b/S|) is
  measured on random hidden states and must stay below ``tolerance``, else the export refuses.

Its word-level vocabulary becomes a ``tokenizers`` WordLevel model with whitespace splitting and a
post-processor that puts ``<bos>`` first, so ``encode`` gives the in-house ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from .config import ACTIVATION_NAMES, DecoderConfig
from .decoder import Decoder
from .tokenizer import HFTokenizer
from .weights import to_hf_tensors, write_checkpoint

__all__ = ["save_pretrained", "gpt2_config_of", "hf_tokenizer_of"]


def gpt2_config_of(cfg: Any) -> DecoderConfig:
    """The GPT-2 decoder configuration equal to an in-house ``LMConfig``."""
    return DecoderConfig(model_type="gpt2", vocab_size=cfg.vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                         max_len=cfg.max_len, norm="layernorm", norm_eps=1e-6, activation="gelu_tanh",
                         gated_mlp=False, positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                         layer_kinds=("global",) * cfg.num_layers, tie_embeddings=False)


def _absorb_head_bias(scale: np.ndarray, shift: np.ndarray, kernel: np.ndarray, bias: np.ndarray, tolerance: float):
    """The bias-free unembedding equal to (kernel, bias) after a LayerNorm of (scale, shift): see the module
    docstring. float64 arithmetic; the error is checked on random normalised inputs."""
    s, c, w, b = (np.asarray(a, np.float64) for a in (scale, shift, kernel, bias))
    if np.any(s == 0):
        raise ValueError("the final LayerNorm has a zero scale: the head bias cannot be absorbed exactly")
    total = float(np.sum(c / s))
    if abs(total) < 1e-3:
        raise ValueError("the final LayerNorm's Σ shift/scale is ≈ 0: the head bias cannot be absorbed exactly")
    new = w + np.outer(1.0 / s, b / total)
    x = np.random.default_rng(0).normal(size=(64, s.size))
    xh = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    h = (xh * s + c).astype(np.float32)
    err = np.max(np.abs(h @ new.astype(np.float32) - (h @ w.astype(np.float32) + b.astype(np.float32))))
    if err > tolerance:
        raise ValueError(f"absorbing the head bias changes the logits by {err:.2e} > {tolerance:.0e}")
    return new.astype(np.float32)


def _gpt2_params_of(model: Any, tolerance: float) -> dict[tuple, np.ndarray]:
    """Our Decoder parameter paths → arrays, from an in-house Transformer."""
    a = lambda x: np.asarray(x[...], np.float32)
    d = model.cfg.d_model
    out = {("embed", "embedding"): a(model.embed.embedding), ("pos", "embedding"): a(model.pos.embedding),
           ("norm_f", "scale"): a(model.ln_f.scale), ("norm_f", "bias"): a(model.ln_f.bias)}
    for i, blk in enumerate(model.blocks):
        b = ("blocks", i)
        kernel, bias = a(blk.qkv.kernel), a(blk.qkv.bias)
        for j, name in enumerate("qkv"):
            out[b + ("attn", name, "kernel")] = kernel[:, j * d:(j + 1) * d]
            out[b + ("attn", name, "bias")] = bias[j * d:(j + 1) * d]
        for ours, theirs in ((("attn", "o"), blk.out), (("mlp", "up"), blk.ff1), (("mlp", "down"), blk.ff2)):
            out[b + ours + ("kernel",)], out[b + ours + ("bias",)] = a(theirs.kernel), a(theirs.bias)
        for ours, theirs in (("norm1", blk.ln1), ("norm2", blk.ln2)):
            out[b + (ours, "scale")], out[b + (ours, "bias")] = a(theirs.scale), a(theirs.bias)
    out[("head", "kernel")] = _absorb_head_bias(a(model.ln_f.scale), a(model.ln_f.bias), a(model.head.kernel),
                                                a(model.head.bias), tolerance)
    return out


def hf_tokenizer_of(tokenizer: Any) -> HFTokenizer:
    """The in-house word-level tokenizer as a ``tokenizers`` WordLevel tokenizer with the same ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(tokenizer.id_to_word)}
    pad, bos, eos = (tokenizer.id_to_word[i] for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (pad, bos, eos)])
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tokenizer.bos_id)])
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "model_max_length": 10 ** 6,
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return HFTokenizer(backend, config, generation)


def _gpt2_json(cfg: DecoderConfig, tok: HFTokenizer) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_len, "n_ctx": cfg.max_len, "activation_function": ACTIVATION_NAMES[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids[0], "pad_token_id": tok.pad_id}


def save_pretrained(model: Any, tokenizer: Any, directory: str | Path, *, tolerance: float = 1e-4) -> Path:
    """Write ``model`` (an in-house ``Transformer``, or a GPT-2 :class:`Decoder`) and its tokenizer to
    ``directory`` as a GPT-2 checkpoint: config.json, model.safetensors, generation_config.json,
    tokenizer.json, tokenizer_config.json. ``models.hf.load_pretrained`` and transformers' ``from_pretrained``
    both read it."""
    from models.lm.transformer import Transformer

    if isinstance(model, Transformer):
        if model.num_outputs != model.cfg.vocab_size:
            raise ValueError("only language models export to GPT-2 (this Transformer has a classifier head)")
        cfg, params = gpt2_config_of(model.cfg), _gpt2_params_of(model, tolerance)
    elif isinstance(model, Decoder) and model.cfg.model_type == "gpt2":
        cfg = model.cfg
        params = {tuple(p): np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    else:
        raise ValueError(f"save_pretrained writes GPT-2 checkpoints of in-house Transformers or gpt2 Decoders; "
                         f"got {type(model).__name__}")
    tok = tokenizer if isinstance(tokenizer, HFTokenizer) else hf_tokenizer_of(tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_checkpoint(directory / "model.safetensors", to_hf_tensors(cfg, params))
    (directory / "config.json").write_text(json.dumps(_gpt2_json(cfg, tok), indent=2))
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids if len(tok.eos_ids) > 1 else tok.eos_ids[0],
                  "pad_token_id": tok.pad_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tok.save(directory)
    jax.block_until_ready(0)
    return directory


def main(argv=None) -> None:
    """``python -m models.hf.export lm_stories models/checkpoints/lm_stories_hf``: export a shipped (or any
    in-house) checkpoint and check that the written checkpoint gives the same logits."""
    import argparse

    import jax.numpy as jnp

    from models.lm.checkpoint import load_model

    from .pretrained import load_pretrained

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint", help="an in-house checkpoint directory or shipped name (lm_stories)")
    parser.add_argument("out", help="the Hugging Face model directory to write")
    args = parser.parse_args(argv)
    model, tok = load_model(args.checkpoint)
    save_pretrained(model, tok, args.out)
    loaded, _ = load_pretrained(args.out)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.cfg.vocab_size, (4, model.cfg.max_len)))
    err = float(jnp.max(jnp.abs(loaded(ids)[0] - model(ids)[0])))
    print(json.dumps({"out": str(args.out), "max_logit_error": err}))


if __name__ == "__main__":
    main()
