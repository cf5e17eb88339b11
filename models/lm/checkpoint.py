"""Saving and loading models: ``config.json`` + ``tokenizer.json`` + orbax-saved parameters.

A checkpoint directory holds

    config.json      the LMConfig (and ``num_outputs`` for classifier heads)
    tokenizer.json   the vocabulary
    params/          nnx parameters, saved with orbax (``StandardCheckpointer``)

``load_model`` checks every parameter's shape against the configuration before building the model, so a
checkpoint from another configuration fails with a ``ValueError`` naming the mismatching parameters, instead
of a broadcasting error deep inside a forward pass. ``load_params`` does the same for a user's own checkpoint
files restored into a model the user built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .tokenizer import Tokenizer
from .transformer import LMConfig, Transformer

__all__ = ["save_model", "load_model", "load_params", "checkpoint_path", "flat_shapes"]

CHECKPOINT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """Path of a shipped checkpoint, e.g. ``checkpoint_path("lm_stories")``."""
    path = CHECKPOINT_ROOT / name
    if not (path / "config.json").exists():
        available = sorted(p.name for p in CHECKPOINT_ROOT.glob("lm_*") if (p / "config.json").exists())
        raise ValueError(f"no shipped checkpoint {name!r} under {CHECKPOINT_ROOT}; available: {available}")
    return path


def flat_shapes(tree: Any) -> dict[str, tuple]:
    """{'blocks/0/qkv/kernel': shape, ...} with every key turned into a string."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        out[key] = tuple(np.shape(leaf))
    return out


def _pure_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_model(path: str | Path, model: Transformer, tokenizer: Tokenizer) -> Path:
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    meta = json.loads(model.cfg.to_json())
    if model.num_outputs != model.cfg.vocab_size:
        meta["num_outputs"] = model.num_outputs
    (path / "config.json").write_text(json.dumps(meta, indent=1))
    tokenizer.save(path / "tokenizer.json")
    params_dir = path / "params"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(params_dir, jax.tree_util.tree_map(np.asarray, _pure_params(model)), force=True)
    ckptr.wait_until_finished()
    return path


def _check_shapes(expected: dict, found: dict, where: str) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        lines = [f"checkpoint {where} does not match the model configuration:"]
        lines += [f"  {k}: checkpoint {found[k]} vs model {expected[k]}" for k in wrong[:10]]
        if missing:
            lines.append(f"  missing in checkpoint: {missing[:10]}")
        if extra:
            lines.append(f"  not in the model: {extra[:10]}")
        raise ValueError("\n".join(lines))


def load_params(model: nnx.Module, params_dir: str | Path) -> nnx.Module:
    """Restore orbax-saved parameters into ``model`` (in place, and returned), checking every shape first."""
    params_dir = Path(params_dir).resolve()
    if not params_dir.exists():
        raise ValueError(f"no checkpoint at {params_dir}")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(params_dir)
    meta_tree = getattr(meta, "item_metadata", meta)
    found = {k: tuple(getattr(leaf, "shape", ())) for k, leaf in _flat_leaves(meta_tree).items()}
    expected = flat_shapes(_pure_params(model))
    _check_shapes(expected, found, str(params_dir))
    target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), _pure_params(model))
    restored = ckptr.restore(params_dir, target)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, restored))
    nnx.update(model, state)
    return model


def _flat_leaves(tree: Any) -> dict[str, Any]:
    is_leaf = lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        out[key] = leaf
    return out


def load_model(path: str | Path, cfg: Optional[LMConfig] = None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a checkpoint directory or a shipped checkpoint's name (``"lm_stories"``).

    ``cfg`` (optional) is the configuration the caller expects; the checkpoint's parameters are checked
    against it, and a mismatch raises ``ValueError``."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        path = checkpoint_path(str(path))
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a checkpoint directory (no config.json)")
    meta = json.loads((path / "config.json").read_text())
    num_outputs = meta.pop("num_outputs", None)
    saved_cfg = LMConfig(**meta)
    cfg = cfg or saved_cfg
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the configuration says vocab_size={cfg.vocab_size}")
    # built abstractly (shapes only, no random initialisation to compile), then filled from the checkpoint
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), num_outputs=num_outputs))
    load_params(model, path / "params")
    return model, tokenizer
