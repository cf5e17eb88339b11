"""diffusers tensor names ↔ :class:`models.diffusers.unet.UNet2DModel` parameters, both ways.

Our module's attribute names are diffusers' module names, so a parameter path maps to a tensor name by
joining it with dots and renaming the leaf (``kernel``/``scale``/``embedding`` → ``weight``); the layout
follows from the rank: a 4-D kernel is a convolution (torch ``[O, I, kh, kw]`` ↔ ours ``[kh, kw, I, O]``), a
2-D ``kernel`` a linear layer (torch ``[O, I]`` ↔ ours ``[I, O]``), everything else is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from models.hf.weights import _tensor_names, assign, write_checkpoint

__all__ = ["WEIGHTS_NAME", "tensor_name", "our_shapes", "read_weights", "to_diffusers_tensors", "assign",
           "write_checkpoint"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def tensor_name(path: tuple) -> str:
    """diffusers' name of our parameter at ``path``; the GroupNorm wrapper's inner ``norm`` is not a level."""
    parts = [str(p) for p in path[:-1] if p != "norm"]
    return ".".join(parts + [_LEAF[path[-1]]])


def our_shapes(model: Any) -> dict[tuple, tuple]:
    return {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _from_torch(path: tuple, a: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    return a


def _to_torch(path: tuple, a: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    return a


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return shape


def read_weights(file: Path, shapes: dict[tuple, tuple]) -> dict[tuple, np.ndarray]:
    """Our parameters (path → numpy array, file dtype) from a diffusers ``diffusion_pytorch_model.safetensors``.

    Raises ``ValueError`` listing every missing and unexpected tensor and every tensor whose shape disagrees
    with ``config.json``."""
    from safetensors import SafetensorError, safe_open

    if not file.exists():
        found = sorted(p.name for p in file.parent.glob("*"))
        raise ValueError(f"{file.parent} has no {file.name} (found: {found}); pplalign reads diffusers' safetensors "
                         "weights only (re-save a .bin checkpoint with diffusers' save_pretrained first)")
    names = {tensor_name(p): p for p in shapes}
    present = set(_tensor_names(file))
    missing, unexpected = sorted(set(names) - present), sorted(present - set(names))
    out: dict[tuple, np.ndarray] = {}
    wrong = []
    try:
        with safe_open(str(file), framework="numpy") as f:
            for name in sorted(set(names) & present):
                path = names[name]
                found, expected = tuple(f.get_slice(name).get_shape()), _torch_shape(path, shapes[path])
                if found != expected:
                    wrong.append(f"{name} {list(found)} (config implies {list(expected)})")
                    continue
                out[path] = _from_torch(path, f.get_tensor(name))
    except SafetensorError as e:
        raise ValueError(f"could not read the weights in {file}: {e}") from None
    if missing or unexpected or wrong:
        parts = [f"{what} ({len(items)}): {', '.join(items)}" for what, items in
                 (("missing tensors", missing), ("unexpected tensors", unexpected), ("mismatched shapes", wrong))
                 if items]
        raise ValueError(f"{file} does not match its config.json: " + "; ".join(parts))
    return out


def to_diffusers_tensors(model: Any) -> dict[str, np.ndarray]:
    """diffusers' tensors (name → torch-layout array) of our model: the inverse of :func:`read_weights`."""
    return {tensor_name(tuple(p)): np.ascontiguousarray(_to_torch(tuple(p), np.asarray(v.get_value())))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
