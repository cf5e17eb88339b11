"""Train the shipped digits UNet (``models/checkpoints/digits_unet/``, diffusers layout) and check its samples.

    python -m models.diffusers.train                      # train (resumable), write the checkpoint, evaluate
    python -m models.diffusers.train --evaluate-only      # evaluate the shipped checkpoint

Data: scikit-learn's 8×8 digits in [−1, 1] (``models.diffusion.data.load_digits``, the training split of
``models.diffusion.train``), upsampled to 16×16 by pixel repetition (nearest), so that 2×2 mean pooling maps a
sample back to the 8×8 grid of the shipped digit classifier exactly; one channel, NCHW ``[B, 1, 16, 16]``.

Model: a diffusers ``UNet2DModel`` (block widths 8, 32; attention at 8×8 and in the middle block) trained for
ε-prediction under DDPM's 1000-step linear β schedule (β from 1e-4 to 0.02; Ho et al. 2020):
E‖ε − ε̂(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖², t uniform on diffusers' 0..999, with ᾱ_t = Π_{i≤t}(1 − β_i). The loop
is :func:`models.diffusion.train.fit` (optax Adam with cosine decay, tqdm progress, resumable npz checkpoint).

Check: samples drawn by DDPM ancestral sampling on a strided grid of timesteps (diffusers' ``leading``
spacing) are pooled to 8×8 and classified by ``models/checkpoints/digits_classifier.npz``; the class
histogram and the mean top-class probability are reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.diffusion.train import CHECKPOINT_DIR, _digits_split, denoiser_loss, fit

from .config import UNetConfig
from .pretrained import load_unet, save_pretrained
from .unet import UNet2DModel

__all__ = ["UNET", "SCHEDULER", "TRAIN", "OUT_DIR", "digits_16", "ddpm_alpha_bars", "build", "train", "sample",
           "evaluate", "main"]

OUT_DIR = CHECKPOINT_DIR / "digits_unet"
UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[8, 32],
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            layers_per_block=1, norm_num_groups=4, attention_head_dim=16)
SCHEDULER = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                 beta_end=0.02, prediction_type="epsilon", variance_type="fixed_small", clip_sample=True,
                 clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0)
TRAIN = dict(steps=600, batch=32, lr=3e-3)


def digits_16(x8: np.ndarray) -> np.ndarray:
    """[N, 64] digits in [−1, 1] → [N, 1, 16, 16] by pixel repetition."""
    x = np.asarray(x8, np.float32).reshape(-1, 1, 8, 8)
    return x.repeat(2, axis=2).repeat(2, axis=3)


def pool_8(x16: jax.Array) -> jax.Array:
    """[N, 1, 16, 16] → [N, 64]: 2×2 means, the inverse of :func:`digits_16`."""
    return x16.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(-1, 64)


def ddpm_alpha_bars(scheduler: dict = SCHEDULER) -> jax.Array:
    """[1, ᾱ_0, …, ᾱ_{T−1}]: index s = t + 1 for diffusers' timestep t (``denoiser_loss`` indexes 1..T)."""
    betas = jnp.linspace(scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"],
                         dtype=jnp.float32)
    return jnp.concatenate([jnp.ones((1,)), jnp.cumprod(1.0 - betas)])


def build(seed: int = 0) -> UNet2DModel:
    return UNet2DModel(UNetConfig(**UNET), rngs=nnx.Rngs(seed))


class _Flat(nnx.Module):
    """The UNet on flat [B, 256] images and ``denoiser_loss``'s index s = t + 1 (its time argument)."""

    def __init__(self, unet: UNet2DModel):
        self.unet = unet

    def __call__(self, x, s, labels=None):
        return self.unet(x.reshape(-1, 1, 16, 16), s - 1.0).reshape(x.shape)


def train(out_dir: str | Path = OUT_DIR, work_dir: str | Path = "results/train_diffusers",
          steps: int | None = None, seed: int = 0, stop_after: int | None = None) -> tuple[UNet2DModel, dict]:
    """Fit the digits UNet (resuming from ``work_dir``'s checkpoint) and save it in diffusers layout.
    ``stop_after``: end at that step of the ``steps``-step cosine schedule (same run, cut short)."""
    config = dict(TRAIN, unet=UNET, scheduler=SCHEDULER)
    if steps is not None:
        config["steps"] = int(steps)
    (xtr, _), _ = _digits_split()
    data = jnp.asarray(digits_16(xtr).reshape(len(xtr), -1))

    def sample_batch(key, n):
        return data[jax.random.randint(key, (n,), 0, data.shape[0])], None

    loss = denoiser_loss(sample_batch, ddpm_alpha_bars(), config["batch"])
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    net, losses = fit(_Flat(build(seed)), loss, config, checkpoint=work_dir / "digits_unet_ckpt.npz",
                      save_every=50, chunk=25, seed=seed, desc="digits_unet", stop_after=stop_after)
    save_pretrained(net.unet, out_dir, scheduler_config=SCHEDULER)
    return net.unet, dict(steps=len(losses), final_loss=float(np.mean(losses[-100:])))


def sample(unet: UNet2DModel, key: jax.Array, n: int, num_steps: int = 100, scheduler: dict = SCHEDULER) -> jax.Array:
    """n images by DDPM ancestral sampling on the timesteps t_k = k·T/S (``leading`` spacing), k = S−1..0:
    x_{t'} ~ q(x_{t'} | x_t, x̂₀) with x̂₀ = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t clipped to [−1, 1] and the posterior
    (``fixed_small``) variance (1−ᾱ_{t'})/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_{t'}) (Ho et al. 2020, eqs. 6–7)."""
    total = scheduler["num_train_timesteps"]
    ab = ddpm_alpha_bars(scheduler)[1:]
    ts = jnp.arange(num_steps - 1, -1, -1) * (total // num_steps)
    k0, key = jax.random.split(key)
    x = jax.random.normal(k0, (n, 1, 16, 16))

    def step(x, inp):
        t, k = inp
        prev = t - total // num_steps
        a_t, a_p = ab[t], jnp.where(prev >= 0, ab[jnp.maximum(prev, 0)], 1.0)
        eps = unet(x, t)
        x0 = jnp.clip((x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t), -1.0, 1.0)
        beta = 1 - a_t / a_p
        mean = (jnp.sqrt(a_p) * beta * x0 + jnp.sqrt(1 - beta) * (1 - a_p) * x) / (1 - a_t)
        var = jnp.clip((1 - a_p) / (1 - a_t) * beta, 1e-20)
        noise = jnp.where(prev >= 0, jnp.sqrt(var), 0.0) * jax.random.normal(k, x.shape)
        return mean + noise, None

    x, _ = jax.lax.scan(step, x, (ts, jax.random.split(key, num_steps)))
    return x


def evaluate(unet: UNet2DModel, n: int = 64, num_steps: int = 50, seed: int = 1) -> dict:
    """Classify n samples (pooled to 8×8) with the shipped digit classifier: class histogram, mean top-class
    probability, and the same probability on held-out real digits for reference."""
    from models.diffusion.pretrained import load_classifier

    clf = load_classifier()
    graphdef, state = nnx.split(unet)
    x = jax.jit(lambda s, k: sample(nnx.merge(graphdef, s), k, n, num_steps))(state, jax.random.PRNGKey(seed))
    p = jax.nn.softmax(clf(pool_8(x)), -1)
    _, (xte, _) = _digits_split()
    p_real = jax.nn.softmax(clf(jnp.asarray(xte)), -1)
    return {"n": n, "num_steps": num_steps, "histogram": np.bincount(np.asarray(p.argmax(-1)), minlength=10).tolist(),
            "mean_top_probability": float(p.max(-1).mean()),
            "fraction_top_probability_over_0.9": float((p.max(-1) > 0.9).mean()),
            "real_test_mean_top_probability": float(p_real.max(-1).mean()),
            "pixel_range": [float(x.min()), float(x.max())]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("--work", default="results/train_diffusers", help="where the resumable checkpoint goes")
    parser.add_argument("--steps", type=int, default=None, help=f"length of the schedule (default {TRAIN['steps']})")
    parser.add_argument("--stop-after", type=int, default=None, help="end the run at this step")
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=50)
    args = parser.parse_args(argv)
    if args.evaluate_only:
        unet, info = load_unet(args.out), {}
    else:
        unet, info = train(args.out, args.work, args.steps, stop_after=args.stop_after)
    info.update(evaluate(unet, args.samples, args.sample_steps))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
