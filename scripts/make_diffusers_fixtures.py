"""Build the committed diffusers fixtures in tests/fixtures/diffusers/ with diffusers itself (the reference side).

Tiny *random* ``UNet2DModel``s, saved with diffusers' own ``save_pretrained`` (``<name>/unet/``) next to a
``<name>/scheduler/scheduler_config.json``, and diffusers' outputs on fixed inputs (batch 3, several timesteps,
class labels for the conditional ones) in ``<name>/reference.npz``: the JAX UNet of models/diffusers/ is checked
against these numbers by tests/test_diffusers_unet.py without torch.

The models between them cover: attention at two resolutions and in the middle block, ``AttnDownBlock2D`` /
``AttnUpBlock2D`` beside the plain blocks, differing channel counts per level, a class embedding
(``num_class_embeds``), ``scale_shift`` time conditioning, ``flip_sin_to_cos=False`` with ``freq_shift=1``,
``center_input_sample``, ``downsample_padding=0``, a mid-block scale factor, one head or several.

NOT run by the tests or CI. It needs the optional ``[reference]`` extra (torch, diffusers) in a separate Python
3.11 virtual environment (the CPU torch wheel is a 3.11 build):

    /work/hfref/bin/pip install torch==2.13.0 diffusers==0.42.1 transformers safetensors numpy
    /work/hfref/bin/python scripts/make_diffusers_fixtures.py        # (re)writes tests/fixtures/diffusers/*

Deterministic (fixed seeds, one torch thread) and idempotent: each run removes and rewrites the directories it
owns. If scripts/_diffusers_scheduler_fixtures.py exists, its ``scheduler_fixtures(out_dir)`` writes the
scheduler fixtures into the same directory.

    /work/hfref/bin/python scripts/make_diffusers_fixtures.py --check DIR [--out FILE.npz]

loads DIR (any diffusers UNet or pipeline directory, e.g. one written by ``models.diffusers.save_pretrained``)
with ``UNet2DModel.from_pretrained`` and records its outputs on the standard inputs into DIR/reference.npz
(or --out): the other direction of the round trip.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_hf_fixtures import perturb_small_params, save_npz  # noqa: E402  (same house helpers)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "diffusers"
BATCH = 3
TIMESTEP_SETS = ([0, 500, 999], [10, 250, 750], [999, 3, 42])

MODELS = {
    # attention at 8×8 and 4×4 (AttnDown/AttnUp) and in the middle; one input channel, as the digits UNet
    "attn2_uncond": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                         layers_per_block=1, norm_num_groups=4, attention_head_dim=8),
    # class-conditional, three widths, attention at 16×16 and 4×4, two resnets a level, one head per block,
    # cos-first embedding with freq_shift 1, centred input, padding-0 downsampling, mid scale factor
    "class_cond": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 24),
                       down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
                       layers_per_block=2, norm_num_groups=4, attention_head_dim=None, num_class_embeds=10,
                       flip_sin_to_cos=False, freq_shift=1, center_input_sample=True, downsample_padding=0,
                       mid_block_scale_factor=1.4),
    # scale_shift time conditioning (the mid attention then has no group norm), 2 output channels, no mid
    # attention but attention in the up path only
    "scale_shift": dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        layers_per_block=1, norm_num_groups=2, attention_head_dim=4,
                        resnet_time_scale_shift="scale_shift", add_attention=True),
}
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                 prediction_type="epsilon", variance_type="fixed_small", clip_sample=True)


def standard_inputs(config, seed=0):
    """(sample [B, C, H, W], timesteps [S, B], class labels [B] or None): fixed, from numpy."""
    rng = np.random.default_rng(seed)
    size = config["sample_size"]
    sample = rng.standard_normal((BATCH, config["in_channels"], size, size)).astype(np.float32)
    timesteps = np.asarray(TIMESTEP_SETS, np.int64)
    labels = np.asarray([0, 3, 9][:BATCH], np.int64) if config.get("num_class_embeds") else None
    return sample, timesteps, labels


@torch.no_grad()
def record(model, sample, timesteps, labels):
    outs = []
    for ts in timesteps:
        cl = None if labels is None else torch.from_numpy(labels)
        outs.append(model(torch.from_numpy(sample), torch.from_numpy(ts), class_labels=cl).sample.numpy())
    arrays = dict(sample=sample, timesteps=timesteps, output=np.stack(outs))
    if labels is not None:
        arrays["class_labels"] = labels
    return arrays


def build(name, config, seed):
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    perturb_small_params(model, seed)  # norms 1 + N(0, .2²), biases N(0, .1²): a dropped one is caught
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
         "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, indent=2) + "\n")
    save_npz(out / "reference.npz", record(model, *standard_inputs(config, seed)))
    return sum(p.numel() for p in model.parameters())


def check(directory, out):
    directory = Path(directory)
    sub = directory / "unet" if (directory / "unet" / "config.json").exists() else directory
    model = UNet2DModel.from_pretrained(sub).eval()
    save_npz(out or directory / "reference.npz", record(model, *standard_inputs(dict(model.config))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", default=None, help="record diffusers' outputs for this directory instead")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.check:
        check(args.check, args.out)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, config) in enumerate(MODELS.items()):
        print(f"{name}: {build(name, config, seed=i):,} parameters")
    hook = Path(__file__).resolve().parent / "_diffusers_scheduler_fixtures.py"
    if hook.exists():
        from _diffusers_scheduler_fixtures import scheduler_fixtures

        scheduler_fixtures(OUT)
    (OUT / "versions.json").write_text(json.dumps(
        {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
         "numpy": np.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
