"""Diffusion models as pplalign ``Sequential`` programs: schedules, the DDPM/DDIM reverse process over any
denoiser, small flax.nnx denoisers and a digit classifier, their training and shipped checkpoints.

Light to import: the networks live in :mod:`models.diffusion.nets` (flax), loaded on demand.
"""

from .sampler import DDPM, DiffusionState, ddim, ddpm
from .schedule import alpha_bars_of, vp_betas

__all__ = ["DiffusionState", "DDPM", "ddpm", "ddim", "alpha_bars_of", "vp_betas"]
