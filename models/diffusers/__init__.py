"""diffusers-format diffusion models in JAX: the UNet (:class:`UNet2DModel`, numerics as diffusers'),
its config and weights loader (:func:`load_pretrained`, :func:`save_pretrained`).

Schedulers live in :mod:`models.diffusers.scheduler` and the ``Sequential`` program in
:mod:`models.diffusers.program`.
"""

from .config import UNetConfig, config_from_diffusers, config_to_diffusers
from .pretrained import load_pretrained, load_unet, save_pretrained
from .unet import UNet2DModel, timestep_embedding

__all__ = ["UNet2DModel", "UNetConfig", "load_pretrained", "load_unet", "save_pretrained", "config_from_diffusers",
           "config_to_diffusers", "timestep_embedding"]

# --- schedulers and program (models.diffusers.scheduler / models.diffusers.program): the lead fills this in ---
