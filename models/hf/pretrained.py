"""``load_pretrained``: a Hugging Face model directory (or hub name) → (:class:`Decoder`, :class:`HFTokenizer`).

Reads ``config.json``, ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (through the
``safetensors`` library, bfloat16 via ml_dtypes; no torch), ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json``. The weights are placed into a module built abstractly (``nnx.eval_shape``), so a
model is never initialised randomly first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import config_from_hf
from .decoder import Decoder
from .tokenizer import HFTokenizer
from .weights import assign, read_checkpoint, untie_if_distinct

__all__ = ["load_pretrained", "resolve", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json", "model*.safetensors", "model.safetensors.index.json"]


def _dtype(value: Any, what: str, default=None):
    if value is None:
        return default
    try:
        name = value if isinstance(value, str) else jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"{what}={value!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve(path_or_name: str | Path, allow_patterns: list[str] = _FILES) -> Path:
    """A local directory as it is; otherwise a hub name through ``huggingface_hub.snapshot_download`` (its
    cache first, then the network), fetching only ``allow_patterns``. Raises ``ValueError`` saying how to
    download when neither works."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; load_pretrained takes a model directory (config.json, *.safetensors)")
    name = str(path_or_name)
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ValueError(f"no such model directory: {name}")
    from huggingface_hub import snapshot_download

    errors = []
    for local_only in (True, False):
        try:
            return Path(snapshot_download(repo_id=name, allow_patterns=allow_patterns, local_files_only=local_only))
        except Exception as e:  # offline, unknown repo, gated repo, bad name: all end in the same advice
            errors.append(f"{type(e).__name__}: {e}".splitlines()[0])
    raise ValueError(
        f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
        f"({errors[-1]}). Download it first on a machine with network access, e.g. "
        f"`hf download {name} --local-dir ./{name.split('/')[-1]}` (or `huggingface-cli download ...`), "
        "then pass that directory.")


def _read_config(directory: Path) -> dict:
    from .tokenizer import _read_json

    if not (directory / "config.json").exists():
        raise ValueError(f"{directory} has no config.json: not a Hugging Face model directory")
    return _read_json(directory / "config.json")


def _special_ids_from_configs(directory: Path) -> tuple:
    """(end ids, pad id, bos id) from generation_config.json, then config.json."""
    from .tokenizer import _ids, _read_json

    gen, cfg = _read_json(directory / "generation_config.json"), _read_json(directory / "config.json")
    eos = list(dict.fromkeys(_ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))))
    if not eos:
        raise ValueError(f"{directory}: neither generation_config.json nor config.json names an end token; "
                         "load with tokenizer=True")
    pad = next(iter(_ids(gen.get("pad_token_id")) + _ids(cfg.get("pad_token_id"))), eos[0])
    bos = next(iter(_ids(gen.get("bos_token_id")) + _ids(cfg.get("bos_token_id"))), None)
    return tuple(eos), int(pad), bos


def load_pretrained(path_or_name: str | Path, *, dtype: Any = "float32", cache_dtype: Any = None,
                    tokenizer: bool = True) -> tuple[Decoder, Optional[HFTokenizer]]:
    """Load a causal LM checkpoint of a supported architecture (``gpt2``, ``gpt_neo``, ``llama``, ``qwen2``,
    ``qwen3``; see :mod:`models.hf.config`).

    Args:
      path_or_name: a model directory, or a hub name such as ``"Qwen/Qwen2.5-0.5B"`` (resolved through the
        local Hugging Face cache; see :func:`resolve`).
      dtype: the weights' and activations' dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (attention
        scores, softmax, norms and logits are float32 in every case).
      cache_dtype: the KV cache's dtype for programs built on this model (default: ``dtype``); kept on the
        model as ``model.cache_dtype``, which ``LMProgram.from_prompt`` reads.
      tokenizer: also load the tokenizer (``tokenizer.json``).

    Returns:
      (model, tokenizer). Raises ``ValueError`` naming the file, tensor or setting for a missing or corrupt
      file, missing or unexpected tensors, a shape that disagrees with the config, an unsupported
      architecture or feature, a tokenizer whose ids exceed the embedding, or an unknown dtype.
    """
    param_dtype = _dtype(dtype, "dtype", jnp.float32)
    cache = _dtype(cache_dtype, "cache_dtype") or param_dtype
    directory = resolve(path_or_name)
    cfg = untie_if_distinct(directory, config_from_hf(_read_config(directory)))
    model = nnx.eval_shape(lambda: Decoder(cfg, dtype=param_dtype, rngs=nnx.Rngs(0)))
    shapes = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    arrays = read_checkpoint(directory, cfg, shapes)
    assign(model, {p: jnp.asarray(np.asarray(a), param_dtype) for p, a in arrays.items()})
    model.cache_dtype = jnp.dtype(cache).name
    tok = HFTokenizer.from_dir(directory) if tokenizer else None
    # without a tokenizer, LMProgram.from_prompt still needs the checkpoint's own end/pad/bos ids
    model.special_token_ids = (tuple(tok.eos_ids), tok.pad_id, tok.bos_id) if tok is not None else \
        _special_ids_from_configs(directory)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer in {directory} has ids up to {tok.vocab_size - 1}, beyond the model's "
                         f"embedding of {cfg.vocab_size} rows (config.json vocab_size)")
    if tok is not None and any(i >= cfg.vocab_size for i in tok.eos_ids + [tok.pad_id]):
        raise ValueError(f"end/pad ids {tok.eos_ids + [tok.pad_id]} exceed the embedding of {cfg.vocab_size} rows")
    jax.block_until_ready(nnx.state(model))
    return model, tok
