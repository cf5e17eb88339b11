"""The shipped checkpoints (models/checkpoints/*.npz, trained by :mod:`models.diffusion.train`) as ready
programs: no download, no training at run time."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from .nets import ClassifierReward, EpsDenoiser
from .sampler import DDPM, ddim
from .schedule import alpha_bars_of, vp_betas
from .train import CHECKPOINT_DIR, CONFIGS, load_params

__all__ = ["checkpoint_path", "load_denoiser", "load_classifier", "program", "classifier_reward"]


def checkpoint_path(name: str) -> Path:
    if name not in CONFIGS:
        raise ValueError(f"unknown checkpoint {name!r}; one of {sorted(CONFIGS)}")
    path = CHECKPOINT_DIR / CONFIGS[name]["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with `python -m models.diffusion.train {name}`")
    return path


def load_denoiser(name: str, label: int = -1, guidance: float = 0.0) -> EpsDenoiser:
    """The trained denoiser ``(x, s) -> x̂_0`` of 'ring', 'checkerboard' or 'digits' (class ``label``,
    −1 for unconditional; ``guidance`` is the classifier-free weight). Digits x̂_0 is clipped to [−1, 1]."""
    net, config = load_params(checkpoint_path(name))
    if config["kind"] != "denoiser":
        raise ValueError(f"{name!r} is not a denoiser")
    alpha_bars = alpha_bars_of(vp_betas(config["total_steps"]))
    clip = 1.0 if config["data"] == "digits" else None
    return EpsDenoiser(net, alpha_bars, jnp.asarray(label, jnp.int32), (config["dim"],), clip, float(guidance))


def program(name: str, num_steps: int | None = None, eta: float = 1.0, label: int = -1, guidance: float = 0.0) -> DDPM:
    """A DDPM (``num_steps`` = None) or strided DDIM(η) program over a shipped denoiser."""
    den = load_denoiser(name, label, guidance)
    total = int(den.alpha_bars.shape[0]) - 1
    return ddim(den, vp_betas(total), num_steps, eta)


def load_classifier():
    """The digit classifier (an ``MLPClassifier``: logits and ``features``)."""
    net, _ = load_params(checkpoint_path("classifier"))
    return net


def classifier_reward(classes) -> ClassifierReward:
    """r(x) = log p(c ∈ classes | x) under the shipped digit classifier."""
    mask = jnp.zeros((10,), jnp.float32).at[jnp.asarray(classes, jnp.int32)].set(1.0)
    return ClassifierReward(load_classifier(), mask)
