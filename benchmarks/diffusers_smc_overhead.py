"""NFE per second of SMC against plain ancestral sampling on a real image-DDPM architecture.

The UNet is google/ddpm-cifar10-32's (Ho et al. 2020's CIFAR-10 DDPM as diffusers ships it: 35.7M
parameters, 32×32×3, attention at 16×16) with random weights, sampled by its DDPM scheduler on S of the 1000
trained steps through :func:`models.diffusers.program.unet_program`. SMC is Feynman–Kac steering
(``pplalign.potentials.fk_steering``, difference potential on the reward of the cached x̂₀, ESS-adaptive
resampling) with a cheap reward (the mean of the red channel), so the measured difference is SMC's own
cost: potentials, weights and resampling gathers of the [N, 3, 32, 32] state. Both count N·S NFE.

    python -m benchmarks.diffusers_smc_overhead              # GPU size: 256 particles, 100 steps
    python -m benchmarks.diffusers_smc_overhead --quick      # a tiny UNet on CPU

Prints one JSON line last: ``plain_nfe_per_s``, ``smc_nfe_per_s``, ``smc_over_plain`` (time ratio).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pplalign
from benchmarks._timing import interleaved_medians
from models.diffusers import UNet2DModel, config_from_diffusers
from models.diffusers.program import unet_program
from pplalign.potentials import fk_steering

# google/ddpm-cifar10-32, unet/config.json and scheduler/scheduler_config.json
CIFAR10_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
                    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
                    attention_head_dim=None, center_input_sample=False, downsample_padding=0,
                    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6,
                    norm_num_groups=32, act_fn="silu", time_embedding_type="positional")
CIFAR10_SCHEDULER = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, variance_type="fixed_small", clip_sample=True)
TINY_UNET = dict(CIFAR10_UNET, sample_size=8, block_out_channels=[8, 16], norm_num_groups=4,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                 layers_per_block=1)


def red_mean(x):
    return jnp.mean(x[0])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny UNet, 4 particles, 3 steps (CPU smoke run)")
    args = parser.parse_args(argv)
    config = TINY_UNET if args.quick else CIFAR10_UNET
    n, steps, repeats = (4, 3, 1) if args.quick else (args.particles, args.steps, args.repeats)
    unet = UNet2DModel(config_from_diffusers(config), rngs=nnx.Rngs(0))
    params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(unet, nnx.Param))))
    program = unet_program(unet, CIFAR10_SCHEDULER, steps)
    target = pplalign.tilt(program, red_mean, 0.1)
    fns = {
        "plain": jax.jit(lambda k: pplalign.ancestral_sample(k, program, n)),
        "smc": jax.jit(lambda k: fk_steering(k, target, n, potential="difference").log_Z),
    }
    times = interleaved_medians(fns, lambda r: (jax.random.PRNGKey(r),), repeats=repeats)
    nfe = n * steps
    result = dict(benchmark="diffusers_smc_overhead", architecture="tiny" if args.quick else "ddpm-cifar10-32",
                  parameters=params, particles=n, steps=steps, device=jax.devices()[0].platform,
                  plain_seconds=times["plain"], smc_seconds=times["smc"], plain_nfe_per_s=nfe / times["plain"],
                  smc_nfe_per_s=nfe / times["smc"], smc_over_plain=times["smc"] / times["plain"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
