"""diffusers-format diffusion models in JAX: the UNet (:class:`UNet2DModel`, numerics as diffusers'),
its config and weights loader (:func:`load_pretrained`, :func:`save_pretrained`), DDPM/DDIM schedulers with
diffusers' numerics (:mod:`models.diffusers.scheduler`) and the UNet with its scheduler as a ``Sequential``
program (:func:`unet_program`) for ``pplalign.smc``, FK steering, TDS and DTS.
"""

from .config import UNetConfig, config_from_diffusers, config_to_diffusers
from .pretrained import load_pretrained, load_unet, save_pretrained
from .program import UNetSampler, UNetState, unet_program
from .scheduler import Schedule, SchedulerConfig, scheduler_from_config, set_timesteps
from .unet import UNet2DModel, timestep_embedding

__all__ = ["UNet2DModel", "UNetConfig", "load_pretrained", "load_unet", "save_pretrained", "config_from_diffusers",
           "config_to_diffusers", "timestep_embedding", "SchedulerConfig", "Schedule", "scheduler_from_config",
           "set_timesteps", "UNetSampler", "UNetState", "unet_program"]
