"""The table from Hugging Face tensor names to :class:`models.hf.decoder.Decoder` parameters, both ways.

A :class:`Rule` ties one checkpoint tensor to one or more of our parameters with a layout:

* ``copy``   — same array (embeddings, norms, biases, GPT-2's ``Conv1D`` weights, stored [in, out] already);
* ``linear`` — a ``torch.nn.Linear`` weight [out, in], our kernel is its transpose [in, out];
* ``fused``  — GPT-2's ``c_attn`` [D, 3D] (or its bias [3D]): q, k and v side by side on the last axis.

Tensors a checkpoint may carry that hold no parameter (causal-mask buffers, RoPE frequencies, a tied
``lm_head.weight``) are ignored; any other unexpected or missing tensor is an error that lists them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .config import DecoderConfig

__all__ = ["Rule", "rules", "read_checkpoint", "write_checkpoint", "assign", "to_hf_tensors"]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple  # paths into the module, e.g. (("blocks", 0, "attn", "q", "kernel"),); one path may be given bare
    layout: str = "copy"

    def __post_init__(self):
        if self.ours and isinstance(self.ours[0], str):
            object.__setattr__(self, "ours", (self.ours,))


def _norm_rules(hf: str, ours: tuple, cfg: DecoderConfig) -> list[Rule]:
    out = [Rule(f"{hf}.weight", ours + ("scale",))]
    if cfg.norm == "layernorm":
        out.append(Rule(f"{hf}.bias", ours + ("bias",)))
    return out


def _linear(hf: str, ours: tuple, bias: bool, layout: str = "linear") -> list[Rule]:
    out = [Rule(f"{hf}.weight", ours + ("kernel",), layout)]
    if bias:
        out.append(Rule(f"{hf}.bias", ours + ("bias",)))
    return out


def _gpt2_layer(i: int, cfg: DecoderConfig) -> list[Rule]:
    b, h = ("blocks", i), f"h.{i}"
    qkv = lambda name: tuple(b + ("attn", x, name) for x in ("q", "k", "v"))
    return [
        *_norm_rules(f"{h}.ln_1", b + ("norm1",), cfg),
        Rule(f"{h}.attn.c_attn.weight", qkv("kernel"), "fused"),
        Rule(f"{h}.attn.c_attn.bias", qkv("bias"), "fused"),
        *_linear(f"{h}.attn.c_proj", b + ("attn", "o"), True, "copy"),
        *_norm_rules(f"{h}.ln_2", b + ("norm2",), cfg),
        *_linear(f"{h}.mlp.c_fc", b + ("mlp", "up"), True, "copy"),
        *_linear(f"{h}.mlp.c_proj", b + ("mlp", "down"), True, "copy"),
    ]


def _gpt_neo_layer(i: int, cfg: DecoderConfig) -> list[Rule]:
    b, h = ("blocks", i), f"h.{i}"
    return [
        *_norm_rules(f"{h}.ln_1", b + ("norm1",), cfg),
        *[r for x in "qkv" for r in _linear(f"{h}.attn.attention.{x}_proj", b + ("attn", x), False)],
        *_linear(f"{h}.attn.attention.out_proj", b + ("attn", "o"), True),
        *_norm_rules(f"{h}.ln_2", b + ("norm2",), cfg),
        *_linear(f"{h}.mlp.c_fc", b + ("mlp", "up"), True),
        *_linear(f"{h}.mlp.c_proj", b + ("mlp", "down"), True),
    ]


def _llama_layer(i: int, cfg: DecoderConfig) -> list[Rule]:
    b, h = ("blocks", i), f"layers.{i}"
    out = [*_norm_rules(f"{h}.input_layernorm", b + ("norm1",), cfg)]
    out += [r for x in "qkv" for r in _linear(f"{h}.self_attn.{x}_proj", b + ("attn", x), cfg.qkv_bias)]
    out += _linear(f"{h}.self_attn.o_proj", b + ("attn", "o"), cfg.out_bias)
    if cfg.qk_norm:
        out += [Rule(f"{h}.self_attn.q_norm.weight", b + ("attn", "q_norm", "scale")),
                Rule(f"{h}.self_attn.k_norm.weight", b + ("attn", "k_norm", "scale"))]
    out += _norm_rules(f"{h}.post_attention_layernorm", b + ("norm2",), cfg)
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        out += _linear(f"{h}.mlp.{theirs}", b + ("mlp", ours), cfg.mlp_bias)
    return out


_LAYOUT = {  # model_type: (prefix, embedding, learned positions, final norm, per-layer rules)
    "gpt2": ("transformer.", "wte.weight", "wpe.weight", "ln_f", _gpt2_layer),
    "gpt_neo": ("transformer.", "wte.weight", "wpe.weight", "ln_f", _gpt_neo_layer),
    "llama": ("model.", "embed_tokens.weight", None, "norm", _llama_layer),
    "qwen2": ("model.", "embed_tokens.weight", None, "norm", _llama_layer),
    "qwen3": ("model.", "embed_tokens.weight", None, "norm", _llama_layer),
}

# checkpoint tensors that are not parameters
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.attention\.(masked_)?bias|rotary_emb\.inv_freq)$")


def rules(cfg: DecoderConfig, prefix: str | None = None) -> list[Rule]:
    """Every tensor of a ``cfg`` checkpoint, with ``prefix`` (default: the architecture's own, e.g.
    ``model.``; original GPT-2 files have none). ``lm_head.weight`` never has one."""
    default, embed, pos, norm_f, layer = _LAYOUT[cfg.model_type]
    prefix = default if prefix is None else prefix
    out = [Rule(embed, ("embed", "embedding"))]
    if pos is not None:
        out.append(Rule(pos, ("pos", "embedding")))
    for i in range(cfg.num_layers):
        out += layer(i, cfg)
    out += _norm_rules(norm_f, ("norm_f",), cfg)
    out = [dataclasses.replace(r, hf=prefix + r.hf) for r in out]
    if not cfg.tie_embeddings:
        out.append(Rule("lm_head.weight", ("head", "kernel"), "linear"))
    return out


def detect_prefix(cfg: DecoderConfig, names: Iterable[str]) -> str:
    """The prefix the checkpoint's names use (``transformer.``/``model.`` or none)."""
    default, embed, *_ = _LAYOUT[cfg.model_type]
    names = set(names)
    return "" if embed in names and default + embed not in names else default


def is_ignored(name: str, cfg: DecoderConfig) -> bool:
    return bool(_IGNORED.search(name)) or (cfg.tie_embeddings and name == "lm_head.weight")


# --- layouts ----------------------------------------------------------------------------------------------------
def hf_shape(rule: Rule, shapes: list[tuple]) -> tuple:
    """The checkpoint shape of a rule, from our parameters' shapes."""
    if rule.layout == "linear":
        return tuple(reversed(shapes[0]))
    if rule.layout == "fused":
        return shapes[0][:-1] + (sum(s[-1] for s in shapes),)
    return shapes[0]


def from_hf(rule: Rule, array: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
    if rule.layout == "linear":
        return [array.T]
    if rule.layout == "fused":
        cuts = np.cumsum([s[-1] for s in shapes])[:-1]
        return np.split(array, cuts, axis=-1)
    return [array]


def to_hf(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
    if rule.layout == "linear":
        return np.ascontiguousarray(arrays[0].T)
    if rule.layout == "fused":
        return np.concatenate(arrays, axis=-1)
    return arrays[0]


# --- files ------------------------------------------------------------------------------------------------------
def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name → file, from ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
        if missing:
            raise ValueError(f"{index} names shard(s) that are missing from {directory}: {missing}")
        return {name: directory / f for name, f in weight_map.items()}
    if single.exists():
        return {name: single for name in _tensor_names(single)}
    found = sorted(p.name for p in directory.glob("*"))
    raise ValueError(f"{directory} has neither model.safetensors nor model.safetensors.index.json (found: {found}); "
                     "pplalign reads safetensors weights only (convert a .bin checkpoint with transformers first)")


def _tensor_names(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


def _shorten(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def untie_if_distinct(directory: Path, cfg: DecoderConfig) -> DecoderConfig:
    """A config that says tied embeddings while the file holds an ``lm_head.weight`` unequal to the embedding
    is untied, as transformers does (merged or fine-tuned checkpoints keep ``tie_word_embeddings: true``)."""
    if not cfg.tie_embeddings:
        return cfg
    files = checkpoint_files(directory)
    if "lm_head.weight" not in files:
        return cfg
    from safetensors import safe_open

    embed = rules(cfg, detect_prefix(cfg, files))[0].hf
    with safe_open(str(files["lm_head.weight"]), framework="numpy") as f:
        head = f.get_tensor("lm_head.weight")
    with safe_open(str(files[embed]), framework="numpy") as f:
        table = f.get_tensor(embed)
    if head.shape == table.shape and np.array_equal(head, table):
        return cfg
    return dataclasses.replace(cfg, tie_embeddings=False)


def read_checkpoint(directory: Path, cfg: DecoderConfig, our_shapes: dict[tuple, tuple]) -> dict[tuple, np.ndarray]:
    """Our parameters (path → numpy array, in the file's dtype) from a checkpoint directory.

    Raises ``ValueError`` listing missing and unexpected tensors, or naming a tensor whose shape disagrees
    with ``config.json``."""
    from safetensors import SafetensorError, safe_open

    files = checkpoint_files(directory)
    table = rules(cfg, detect_prefix(cfg, files))
    wanted = {r.hf for r in table}
    missing = sorted(wanted - set(files))
    unexpected = sorted(n for n in files if n not in wanted and not is_ignored(n, cfg))
    if missing or unexpected:
        parts = ([f"missing tensors: {_shorten(missing)}"] if missing else []) + \
                ([f"unexpected tensors: {_shorten(unexpected)}"] if unexpected else [])
        raise ValueError(f"checkpoint in {directory} does not match its config.json ({cfg.model_type}, "
                         f"{cfg.num_layers} layers): " + "; ".join(parts))
    out: dict[tuple, np.ndarray] = {}
    handles: dict[Path, Any] = {}
    try:
        for rule in table:
            path = files[rule.hf]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="numpy").__enter__()
            f = handles[path]
            shapes = [our_shapes[p] for p in rule.ours]
            expected = hf_shape(rule, shapes)
            found = tuple(f.get_slice(rule.hf).get_shape())
            if found != expected:
                raise ValueError(f"tensor {rule.hf} in {path.name} has shape {list(found)} but config.json implies "
                                 f"{list(expected)} (hidden {cfg.d_model}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
                                 f"head_dim {cfg.head_dim}, vocab {cfg.vocab_size})")
            for p, a in zip(rule.ours, from_hf(rule, f.get_tensor(rule.hf), shapes)):
                out[p] = a
    except SafetensorError as e:
        raise ValueError(f"could not read the weights in {directory}: {e}") from None
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return out


def to_hf_tensors(cfg: DecoderConfig, params: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors (HF names) from our parameters: the inverse of :func:`read_checkpoint`."""
    return {r.hf: np.ascontiguousarray(to_hf(r, [params[p] for p in r.ours])) for r in rules(cfg)}


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def assign(module: Any, params: dict[tuple, Any]) -> None:
    """Set each parameter at its path (``("blocks", 0, "attn", "q", "kernel")``) of an nnx module."""
    for path, value in params.items():
        node = module
        for part in path[:-1]:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        getattr(node, path[-1]).set_value(value)
