"""Training of the small denoisers and the digit classifier (optax), with tqdm progress and npz checkpoints
that resume: an interrupted run restarts from its last checkpoint and, because the key of step i is
``fold_in(key, i)``, continues exactly as if it had never stopped.

    python -m models.diffusion.train ring            # 2-D ring denoiser  -> models/checkpoints/ring8_mlp.npz
    python -m models.diffusion.train checkerboard
    python -m models.diffusion.train digits          # class-conditional 8×8 digits denoiser
    python -m models.diffusion.train classifier      # digit classifier (reward log p(c|x), FD features)

The denoiser loss is the ε-prediction objective E‖ε − ε̂(√ᾱ_s x_0 + √(1−ᾱ_s) ε, s, c)‖² with s uniform on
1..T (Ho et al. 2020); the label is dropped to the null class with probability ``label_drop`` (0.3 for digits)
so that one network is both the conditional and the unconditional model (Ho & Salimans 2022).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from .nets import MLPClassifier, MLPDenoiser
from .schedule import alpha_bars_of, vp_betas

__all__ = ["build", "save_params", "load_params", "fit", "denoiser_loss", "CONFIGS", "CHECKPOINT_DIR", "main"]

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"

CONFIGS: dict[str, dict] = {
    "ring": dict(kind="denoiser", data="ring", dim=2, hidden=128, depth=3, time_dim=32, num_classes=0,
                 total_steps=100, steps=3000, batch=512, lr=2e-3, file="ring8_mlp.npz"),
    "checkerboard": dict(kind="denoiser", data="checkerboard", dim=2, hidden=128, depth=3, time_dim=32,
                         num_classes=0, total_steps=100, steps=3000, batch=512, lr=2e-3, file="checkerboard_mlp.npz"),
    "digits": dict(kind="denoiser", data="digits", dim=64, hidden=256, depth=4, time_dim=64, num_classes=10,
                   label_drop=0.3, total_steps=100, steps=8000, batch=256, lr=1e-3, file="digits_mlp.npz"),
    "classifier": dict(kind="classifier", data="digits", dim=64, hidden=128, depth=2, num_classes=10,
                       steps=1500, batch=256, lr=2e-3, noise=0.2, file="digits_classifier.npz"),
}


def build(config: dict) -> nnx.Module:
    """A freshly initialised network for a config (weights from seed 0)."""
    rngs = nnx.Rngs(0)
    if config["kind"] == "denoiser":
        return MLPDenoiser(config["dim"], config["hidden"], config["depth"], config["time_dim"],
                           config["num_classes"], rngs=rngs)
    if config["kind"] == "classifier":
        return MLPClassifier(config["dim"], config["num_classes"], config["hidden"], config["depth"], rngs=rngs)
    raise ValueError(f"unknown network kind {config['kind']!r}")


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def _restore(tree, arrays: list[np.ndarray]):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if len(leaves) != len(arrays) or any(np.shape(a) != np.shape(b) for a, b in zip(leaves, arrays)):
        raise ValueError("checkpoint does not match this configuration (different leaves or shapes)")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])


def save_params(path: str | os.PathLike, module: nnx.Module, config: dict) -> None:
    """Write the network's weights and its config (the small file that ships)."""
    _, state = nnx.split(module)
    arrays = {f"p{i}": a for i, a in enumerate(_leaves(state))}
    np.savez(path, config=np.asarray(json.dumps(config, sort_keys=True)), **arrays)


def load_params(path: str | os.PathLike) -> tuple[nnx.Module, dict]:
    """Rebuild the network of a saved config and load its weights."""
    with np.load(path) as z:
        config = json.loads(str(z["config"]))
        arrays = [z[f"p{i}"] for i in range(sum(k.startswith("p") for k in z.files))]
    module = build(config)
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, _restore(state, arrays)), config


def fit(
    module: nnx.Module,
    loss_fn: Callable[[nnx.Module, jax.Array], jax.Array],
    config: dict,
    *,
    checkpoint: str | os.PathLike | None = None,
    save_every: int = 500,
    chunk: int = 50,
    seed: int = 0,
    desc: str = "train",
    stop_after: int | None = None,
) -> tuple[nnx.Module, list[float]]:
    """Adam with cosine decay on ``loss_fn(module, key)`` for ``config['steps']`` steps.

    ``checkpoint``: an npz holding params, optimiser state, step and config, written every ``save_every``
    steps; if it exists with the same config the run resumes from it (a different config raises).
    Steps run ``chunk`` at a time inside one compiled ``lax.scan``. ``stop_after`` ends the run early at that
    step, as an interruption would (after saving), for tests of resumption.
    """
    steps = int(config["steps"])
    graphdef, params = nnx.split(module)
    opt = optax.adam(optax.cosine_decay_schedule(config["lr"], steps, alpha=0.05))
    opt_state = opt.init(params)
    start, losses = 0, []
    base_key = jax.random.PRNGKey(seed)
    config_json = json.dumps(config, sort_keys=True)
    if checkpoint is not None and Path(checkpoint).exists():
        with np.load(checkpoint) as z:
            if str(z["config"]) != config_json:
                raise ValueError(f"checkpoint {checkpoint} belongs to another configuration: {z['config']}")
            n_p = int(z["num_params"])
            params = _restore(params, [z[f"a{i}"] for i in range(n_p)])
            n_o = int(z["num_opt"])
            opt_state = _restore(opt_state, [z[f"b{i}"] for i in range(n_o)])
            start, losses = int(z["step"]), list(z["losses"])

    def one(carry, i):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), jax.random.fold_in(base_key, i)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    run_chunk = jax.jit(lambda carry, idx: jax.lax.scan(one, carry, idx))

    def save(step):
        if checkpoint is None:
            return
        p, o = _leaves(params), _leaves(opt_state)
        tmp = Path(str(checkpoint) + ".tmp.npz")
        np.savez(tmp, config=np.asarray(config_json), step=step, losses=np.asarray(losses, np.float32),
                 num_params=len(p), num_opt=len(o), **{f"a{i}": a for i, a in enumerate(p)},
                 **{f"b{i}": b for i, b in enumerate(o)})
        os.replace(tmp, checkpoint)  # atomic: an interrupted save leaves the previous checkpoint

    with tqdm(total=steps, initial=start, desc=desc, leave=False) as bar:
        step = start
        end = steps if stop_after is None else min(steps, int(stop_after))
        while step < end:
            n = min(chunk, end - step)
            (params, opt_state), chunk_losses = run_chunk((params, opt_state), jnp.arange(step, step + n))
            losses.extend(np.asarray(chunk_losses).tolist())
            step += n
            bar.update(n)
            bar.set_postfix(loss=f"{float(np.mean(losses[-n:])):.4f}")
            if step % save_every < n or step == end:
                save(step)
    return nnx.merge(graphdef, params), losses


def denoiser_loss(sample_batch: Callable, alpha_bars: jax.Array, batch: int, label_drop: float = 0.1):
    """ε-prediction loss; ``sample_batch(key, batch) -> (x0, labels or None)``."""
    total = alpha_bars.shape[0] - 1

    def loss(net, key):
        k_data, k_s, k_eps, k_drop = jax.random.split(key, 4)
        x0, labels = sample_batch(k_data, batch)
        s = jax.random.randint(k_s, (batch,), 1, total + 1)
        eps = jax.random.normal(k_eps, x0.shape)
        ab = alpha_bars[s][:, None]
        xs = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
        if labels is not None:
            labels = jnp.where(jax.random.uniform(k_drop, (batch,)) < label_drop, -1, labels)
        pred = net(xs, s.astype(jnp.float32) * (1000.0 / total), labels)
        return jnp.mean((pred - eps) ** 2)

    return loss


def _digits_split():
    from .data import load_digits

    x, y = load_digits()
    perm = np.random.default_rng(0).permutation(len(x))
    test = perm[:297]
    train = perm[297:]
    return (x[train], y[train]), (x[test], y[test])


def train(name: str, out_dir: str | os.PathLike = CHECKPOINT_DIR, work_dir: str | os.PathLike | None = None,
          steps: int | None = None) -> tuple[nnx.Module, dict]:
    """Train one of :data:`CONFIGS` (resuming from ``work_dir``'s checkpoint) and write its weights to out_dir."""
    config = dict(CONFIGS[name])
    if steps is not None:
        config["steps"] = int(steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir) if work_dir is not None else Path("results") / "train_diffusion"
    work_dir.mkdir(parents=True, exist_ok=True)
    module = build(config)
    if config["kind"] == "denoiser":
        alpha_bars = alpha_bars_of(vp_betas(config["total_steps"]))
        if config["data"] == "digits":
            (xtr, ytr), _ = _digits_split()
            xtr, ytr = jnp.asarray(xtr), jnp.asarray(ytr)

            def sample_batch(key, n):
                idx = jax.random.randint(key, (n,), 0, xtr.shape[0])
                return xtr[idx], ytr[idx]
        else:
            from .data import checkerboard_sampler, ring_sampler

            draw = ring_sampler() if config["data"] == "ring" else checkerboard_sampler()
            sample_batch = lambda key, n: (draw(key, n), None)
        loss = denoiser_loss(sample_batch, alpha_bars, config["batch"], config.get("label_drop", 0.1))
    else:
        (xtr, ytr), _ = _digits_split()
        xtr, ytr = jnp.asarray(xtr), jnp.asarray(ytr)

        def loss(net, key):
            k1, k2 = jax.random.split(key)
            idx = jax.random.randint(k1, (config["batch"],), 0, xtr.shape[0])
            # Noise augmentation: the reward also scores denoised estimates, which are blurrier than data.
            x = xtr[idx] + config["noise"] * jax.random.normal(k2, xtr[idx].shape)
            return optax.softmax_cross_entropy_with_integer_labels(net(x), ytr[idx]).mean()

    module, losses = fit(module, loss, config, checkpoint=work_dir / f"{name}_ckpt.npz", desc=name)
    save_params(out_dir / config["file"], module, config)
    info = dict(name=name, final_loss=float(np.mean(losses[-100:])), steps=len(losses))
    if config["kind"] == "classifier":
        _, (xte, yte) = _digits_split()
        info["test_accuracy"] = float(np.mean(np.argmax(np.asarray(module(jnp.asarray(xte))), -1) == yte))
    return module, info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--out", default=str(CHECKPOINT_DIR))
    parser.add_argument("--work", default=None, help="where resumable checkpoints go (default results/train_diffusion)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    for name in args.names:
        _, info = train(name, args.out, args.work, args.steps)
        print(json.dumps(info))


if __name__ == "__main__":
    main()
