"""``load_pretrained`` / ``save_pretrained``: diffusers model directories ↔ :class:`UNet2DModel` (+ scheduler config).

A diffusers pipeline directory holds ``unet/config.json``, ``unet/diffusion_pytorch_model.safetensors``,
``scheduler/scheduler_config.json`` and ``model_index.json``; a bare UNet directory (what
``UNet2DModel.save_pretrained`` writes) holds the first two at its top. Weights are read with the
``safetensors`` library into numpy (no torch), into a module built abstractly (``nnx.eval_shape``), so a big
UNet is never initialised randomly first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.hf.pretrained import _dtype
from models.hf.pretrained import resolve as hf_resolve
from models.hf.tokenizer import _read_json

from .config import config_from_diffusers, config_to_diffusers
from .scheduler import SchedulerConfig, scheduler_from_config
from .unet import UNet2DModel
from .weights import WEIGHTS_NAME, assign, our_shapes, read_weights, to_diffusers_tensors, write_checkpoint

__all__ = ["load_pretrained", "save_pretrained", "load_unet", "resolve", "unet_directory", "scheduler_config_dict"]

_FILES = ["model_index.json", "unet/config.json", f"unet/{WEIGHTS_NAME}", "scheduler/scheduler_config.json",
          "config.json", WEIGHTS_NAME, "scheduler_config.json"]
_PIPELINES = {"DDPMScheduler": "DDPMPipeline", "DDIMScheduler": "DDIMPipeline"}
_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}
_ONLY = {"ddpm": {"set_alpha_to_one"}, "ddim": {"variance_type"}}  # fields the other scheduler class lacks


def resolve(path_or_name: str | Path) -> Path:
    """A local directory as it is; otherwise a hub name (``google/ddpm-cifar10-32``), fetching only the UNet
    and scheduler files (:func:`models.hf.pretrained.resolve`: the local cache first, then the network)."""
    return hf_resolve(path_or_name, allow_patterns=_FILES)


def unet_directory(directory: Path) -> Path:
    """``directory/unet`` for a pipeline directory, ``directory`` for a bare UNet one."""
    for d in (directory / "unet", directory):
        if (d / "config.json").exists():
            return d
    raise ValueError(f"{directory} is not a diffusers model directory: it has neither unet/config.json "
                     "nor config.json")


def _scheduler_config(directory: Path) -> Optional[dict]:
    for f in (directory / "scheduler" / "scheduler_config.json", directory / "scheduler_config.json",
              directory.parent / "scheduler" / "scheduler_config.json"):
        if f.exists():
            return _read_json(f)
    return None


def load_unet(directory: str | Path, *, dtype: Any = "float32") -> UNet2DModel:
    """The UNet alone from a pipeline or bare UNet directory (see :func:`load_pretrained`)."""
    param_dtype = _dtype(dtype, "dtype", jnp.float32)
    unet_dir = unet_directory(Path(directory))
    cfg = config_from_diffusers(_read_json(unet_dir / "config.json"))
    model = nnx.eval_shape(lambda: UNet2DModel(cfg, dtype=param_dtype, rngs=nnx.Rngs(0)))
    arrays = read_weights(unet_dir / WEIGHTS_NAME, our_shapes(model))
    assign(model, {p: jnp.asarray(np.asarray(a), param_dtype) for p, a in arrays.items()})
    jax.block_until_ready(nnx.state(model))
    return model


def scheduler_config_dict(scheduler: SchedulerConfig | dict) -> dict:
    """The ``scheduler_config.json`` dict of a :class:`SchedulerConfig` (a dict is returned as it is)."""
    if isinstance(scheduler, dict):
        return scheduler
    fields = {f.name: getattr(scheduler, f.name) for f in dataclasses.fields(scheduler)}
    kind = fields.pop("kind")
    out = {"_class_name": _CLASSES[kind], **{k: v for k, v in fields.items() if k not in _ONLY[kind]}}
    if out.get("trained_betas") is not None:
        out["trained_betas"] = list(out["trained_betas"])
    return out


def load_pretrained(path_or_name: str | Path, *, dtype: Any = "float32") -> tuple[UNet2DModel, Optional[SchedulerConfig]]:
    """Load a diffusers ``UNet2DModel`` checkpoint and its scheduler configuration.

    Args:
      path_or_name: a pipeline directory (``unet/``, ``scheduler/``), a bare UNet directory (``config.json`` and
        ``diffusion_pytorch_model.safetensors``), or a hub name resolved through the local Hugging Face cache
        (see :func:`resolve`).
      dtype: parameter and activation dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (group norms and
        attention softmax are float32 in every case).

    Returns:
      (unet, scheduler): the :class:`~models.diffusers.scheduler.SchedulerConfig` of
      ``scheduler/scheduler_config.json`` (for a bare UNet directory: a ``scheduler_config.json`` beside it or
      in ``../scheduler/``), or None when there is none. Raises ``ValueError`` for a missing or unreadable file,
      an unsupported block type, config field or scheduler setting, missing, unexpected or mis-shaped tensors
      (all listed), or an unknown dtype.
    """
    directory = resolve(path_or_name)
    raw = _scheduler_config(unet_directory(directory))
    return load_unet(directory, dtype=dtype), (scheduler_from_config(raw) if raw is not None else None)


def save_pretrained(unet: UNet2DModel, directory: str | Path, *,
                    scheduler_config: SchedulerConfig | dict | None = None) -> Path:
    """Write ``unet`` in diffusers' pipeline layout: ``unet/config.json``, ``unet/diffusion_pytorch_model
    .safetensors`` (the model's dtype, torch layout) and, with a scheduler (a :class:`SchedulerConfig`, or a
    ``scheduler_config.json`` dict with its ``_class_name``, e.g. ``"DDPMScheduler"``),
    ``scheduler/scheduler_config.json`` and ``model_index.json``,
    so that ``diffusers.DDPMPipeline.from_pretrained(directory)`` loads it."""
    directory = Path(directory)
    (directory / "unet").mkdir(parents=True, exist_ok=True)
    cfg = config_to_diffusers(unet.config)
    (directory / "unet" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_checkpoint(directory / "unet" / WEIGHTS_NAME, to_diffusers_tensors(unet))
    if scheduler_config is not None:
        scheduler_config = scheduler_config_dict(scheduler_config)
        cls = scheduler_config.get("_class_name")
        if cls is None:
            raise ValueError("scheduler_config needs a '_class_name' (e.g. 'DDPMScheduler') for diffusers")
        (directory / "scheduler").mkdir(exist_ok=True)
        (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
        index = {"_class_name": _PIPELINES.get(cls, "DiffusionPipeline"), "scheduler": ["diffusers", cls],
                 "unet": ["diffusers", "UNet2DModel"]}
        (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory
