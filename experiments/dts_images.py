"""Diffusion Tree Sampling on a real-format image DDPM: the class-conditional protocol of Jain et al. 2025
("Diffusion Tree Sampling: scalable inference-time alignment of diffusion models", §5: MNIST/CIFAR-10 DDPMs,
a classifier reward), with every method at matched NFE.

Base p₀: a diffusers-format UNet with its scheduler as a ``Sequential`` program
(:func:`models.diffusers.program.unet_program`; default the shipped digits UNet, 16×16×1, DDPM, 1000 linear β,
ε-prediction, sampled on S leading-spaced steps). Reward r(x) = log p(c | x) from a classifier (the shipped
8×8 digit MLP; 16×16 images are 2×2 mean-pooled to its grid, which inverts the UNet's training upsampling), at
β = 1, so σ(x) ∝ p₀(x)·p(c | x) ∝ p(x | c) when both models are right: "digits of class c".

Methods (``experiments.diffusion_digits`` runs them; each produced sample comes from an independent run, one
particle picked by its weight), at a budget of n particles per sample (trees: n iterations):
  best_of_n   ``pplalign.best_of_n`` (n = 1: the plain sampler);
  fk_smc      Feynman–Kac steering, difference potential on r(x̂₀) (Singhal et al. 2025);
  tds         the twisted diffusion sampler (Wu et al. 2023), n/2 particles so that its 2 NFE per
              particle-step match the others' budget;
  dts         DTS as published (Boltzmann selection on soft values, progressive widening);
  dts_twisted_gp  DTS variant "twisted" (unbiased values, consistent samples) guided by the Gaussian-posterior
              twist log E_{N(x̂₀, v_s I)}[p(c | x)] (:class:`pplalign.potentials.GaussianPosteriorTwist`, v_s
              from the data's pixel variance), level-calibrated by a 64-particle pilot whose NFE are counted
              (shared by the samples of a class); its rollouts branch, so an iteration costs more NFE than
              one path: it is reported at the NFE it spent.
Metrics against the real images of class c: Fréchet distance in the classifier's feature space (its last
hidden layer), class accuracy (classifier's argmax = c) and mean reward; all against NFE per sample.
Claims checked (Jain et al. 2025): "DTS matches the FID of the best baseline with up to 10× less compute" —
``claims.dts_nfe_ratio`` is the best baseline's NFE at its best Fréchet over the least NFE at which a DTS
variant reaches it (≥ 1 supports the claim; None: never reached).

Run: ``python -m experiments.dts_images --quick`` (CI, shipped digits UNet) or, on a GPU with your own DDPM,
``python -m experiments.dts_images --unet PATH --classifier PATH [--classes 0,1,...]``: PATH is a diffusers
model directory (or hub name) and a classifier npz of ``models.diffusion.train`` (an MLP over the images,
mean-pooled to its input size; a mismatched input size raises ``ValueError``). Writes results.json and
quality_vs_nfe.png into --out; prints one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pplalign
from experiments.diffusion_digits import TREES, _one_sample, evaluate
from models.diffusers import load_pretrained
from models.diffusers.program import unet_program
from models.diffusers.train import OUT_DIR as DIGITS_UNET
from models.diffusers.train import digits_16
from models.diffusion.data import load_digits
from models.diffusion.nets import ClassifierReward
from models.diffusion.pretrained import checkpoint_path
from models.diffusion.train import load_params
from pplalign import search
from pplalign.potentials import GaussianPosteriorTwist

METHODS = ("best_of_n", "fk_smc", "tds", "dts", "dts_twisted_gp")
BASELINES = ("best_of_n", "fk_smc", "tds")
QUICK = dict(num_steps=8, budgets=(4,), num_samples=8, classes=(3,))
# the paper's budgets: particles/iterations per sample from 1 to 64, DDPM at 100 steps, every class
FULL = dict(num_steps=100, budgets=(1, 4, 16, 64), num_samples=64, classes=tuple(range(10)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PooledClassifier:
    """An MLP classifier over images [..., C, H, W], mean-pooled by ``factor`` × ``factor`` and flattened to its
    input size: logits ``self(x)`` and ``features(x)`` (its last hidden layer)."""

    net: Any
    factor: int = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def create(net, image_shape) -> "PooledClassifier":
        dim = int(net.layers[0].in_features)
        c, h, w = image_shape
        factor = math.isqrt(max(c * h * w // dim, 1))
        if factor < 1 or h % factor or w % factor or c * (h // factor) * (w // factor) != dim:
            raise ValueError(f"the classifier takes {dim} inputs; images of shape {tuple(image_shape)} (C, H, W) "
                             "cannot be mean-pooled to that (need C·(H/f)·(W/f) = inputs for an integer f)")
        return PooledClassifier(net, factor)

    def _pool(self, x):
        *lead, c, h, w = x.shape
        f = self.factor
        return x.reshape(*lead, c, h // f, f, w // f, f).mean(axis=(-3, -1)).reshape(*lead, -1)

    def features(self, x):
        return self.net.features(self._pool(x))

    def __call__(self, x):
        return self.net(self._pool(x))


def load_unet_program(unet_path, num_steps: int):
    if unet_path == "random":  # the digits architecture with random weights (a smoke test of the pipeline)
        from models.diffusers.train import SCHEDULER, build

        return unet_program(build(0), SCHEDULER, num_steps)
    unet, scheduler = load_pretrained(unet_path)
    if scheduler is None:
        raise ValueError(f"{unet_path} has no scheduler/scheduler_config.json: the program needs its scheduler")
    return unet_program(unet, scheduler, num_steps)


def _best_of(target, n: int):
    """key -> (the first of n draws from p₀, the draw of highest reward): best-of-1 and best-of-n."""

    def one(key):
        x = pplalign.ancestral_sample(key, target.base, n)
        return x[0], x[jnp.argmax(jax.vmap(target.reward)(x))]

    return one


def _row(method, c, n, nfe, samples, clf, ref_features, reward) -> dict:
    m = evaluate(samples, clf, ref_features, np.eye(10)[c], reward)
    return dict(method=method, cls=int(c), n=n, nfe_per_sample=float(nfe), frechet=m["frechet"],
                accuracy=m["in_class"], mean_reward=m["mean_reward"])


def run(base, clf, reference, cfg, seed: int = 0) -> list[dict]:
    """Rows (method, class, n, nfe_per_sample, frechet, accuracy, mean_reward) for every class and budget."""
    key = jax.random.PRNGKey(seed)
    data_variance = float(np.mean(np.var(np.concatenate(list(reference.values())), axis=0)))
    rows = []
    for c in cfg["classes"]:
        reward = ClassifierReward(clf, jnp.zeros((10,), jnp.float32).at[c].set(1.0))
        target = pplalign.tilt(base, reward, 1.0)
        ref = jnp.asarray(reference[c])
        ref_features = clf.features(ref)
        guess = GaussianPosteriorTwist.create(base, reward, 1.0, data_variance=data_variance, num_draws=16)
        twist = search.calibrate_twist(jax.random.fold_in(key, 1000 + c), target, guess, 64)
        pilot_share = float(twist.pilot_nfe) / cfg["num_samples"]
        for n in cfg["budgets"]:  # best-of-1 and best-of-n read off the same n independent draws per sample
            keys = jax.random.split(jax.random.fold_in(key, 100 * c + n), cfg["num_samples"])
            first, best = jax.jit(jax.vmap(_best_of(target, n)))(keys)
            for m, x in ([(1, first)] if n == max(cfg["budgets"]) and 1 not in cfg["budgets"] else []) + [(n, best)]:
                rows.append(_row("best_of_n", c, m, m * base.num_steps, x, clf, ref_features, reward))
        for i, (method, n) in enumerate((m, n) for n in cfg["budgets"] for m in METHODS if m != "best_of_n"):
            keys = jax.random.split(jax.random.fold_in(key, 100 * c + 50 + i), cfg["num_samples"])
            one = _one_sample(method, target, max(n // 2, 1) if method == "tds" else n, twist)
            batched = (lambda ks, one=one: jax.lax.map(one, ks)) if method in TREES else jax.vmap(one)
            samples, nfe, broken = jax.jit(batched)(keys)
            if bool(np.any(np.asarray(broken))):
                raise RuntimeError(f"{method} n={n}: a tree filled its capacity or a reward was non-finite")
            extra = pilot_share if method == "dts_twisted_gp" else 0.0
            rows.append(_row(method, c, n, float(np.mean(nfe)) + extra, samples, clf, ref_features, reward))
    return rows


def summarise(rows) -> dict:
    """Per (method, n): metrics averaged over classes; and the compute ratio of the paper's claim."""
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["n"]), []).append(r)
    avg = [dict(method=m, n=n, **{k: float(np.mean([r[k] for r in rs])) for k in
                                  ("nfe_per_sample", "frechet", "accuracy", "mean_reward")})
           for (m, n), rs in sorted(table.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1]))]
    best = min((r for r in avg if r["method"] in BASELINES), key=lambda r: r["frechet"])
    reach = [r["nfe_per_sample"] for r in avg if r["method"].startswith("dts") and r["frechet"] <= best["frechet"]]
    ratio = best["nfe_per_sample"] / min(reach) if reach else None
    return dict(table=avg, best_baseline=dict(method=best["method"], n=best["n"], frechet=best["frechet"],
                                              nfe=best["nfe_per_sample"]), dts_nfe_ratio=ratio)


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("frechet", "accuracy", "mean_reward"),
                              ("Fréchet distance (classifier features)", "class accuracy", "mean log p(c | x)")):
        for m in METHODS:
            pts = sorted((r["nfe_per_sample"], r[key]) for r in table if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--unet", default=str(DIGITS_UNET), help="diffusers model directory or hub name ('random': "
                        "the digits architecture with random weights)")
    parser.add_argument("--classifier", default=None, help="classifier npz (default: the shipped digit MLP)")
    parser.add_argument("--reference", default=None, help="npz with x [N, C, H, W] and y [N] real images (default: "
                        "scikit-learn digits at 16×16)")
    parser.add_argument("--classes", default=None, help="comma-separated classes (default: 3 quick, 0..9 full)")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--out", default="results/dts_images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.classes:
        cfg["classes"] = tuple(int(c) for c in args.classes.split(","))
    if args.num_samples:
        cfg["num_samples"] = args.num_samples
    start = time.time()
    base = load_unet_program(args.unet, cfg["num_steps"])
    net, _ = load_params(args.classifier or checkpoint_path("classifier"))
    clf = PooledClassifier.create(net, base.event_shape)
    if args.reference:
        with np.load(args.reference) as z:
            x_ref, y_ref = z["x"], z["y"]
    else:
        x8, y_ref = load_digits()
        x_ref = digits_16(x8)
    if tuple(x_ref.shape[1:]) != tuple(base.event_shape):
        raise ValueError(f"reference images have shape {x_ref.shape[1:]}; the UNet makes {base.event_shape}")
    reference = {c: x_ref[y_ref == c] for c in cfg["classes"]}
    rows = run(base, clf, reference, cfg, args.seed)
    summary = summarise(rows)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "results.json").write_text(json.dumps(dict(config=cfg, unet=args.unet, rows=rows, **summary),
                                                         indent=1))
    plot(summary["table"], os.path.join(args.out, "quality_vs_nfe.png"))
    for r in summary["table"]:
        print(f"{r['method']:>15} n={r['n']:>3}  NFE {r['nfe_per_sample']:8.1f}  Fréchet {r['frechet']:8.3f}  "
              f"acc {r['accuracy']:.2f}  reward {r['mean_reward']:7.3f}")
    out = dict(unet=args.unet, quick=args.quick, table=summary["table"], best_baseline=summary["best_baseline"],
               claims=dict(dts_nfe_ratio=summary["dts_nfe_ratio"]), seconds=round(time.time() - start, 1))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
