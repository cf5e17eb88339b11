"""diffusers' own DDPM/DDIM scheduler numbers, for tests/test_diffusers_scheduler.py (the reference side).

For each scheduler configuration of a small grid (DDPM and DDIM × the three beta schedules × the three
prediction types, cycling through the timestep spacings, clipping, variance types, η, ``set_alpha_to_one`` and
``steps_offset``) it records ``set_timesteps(S)``'s timesteps and, at every sampling step k, diffusers' ``step``
on fixed random (model_output, sample) under fixed variance noise: DDIM receives the noise as
``variance_noise``; DDPM draws it from ``torch.Generator().manual_seed(seed_k)``, and the same generator seed
reproduces it with ``torch.randn``, which is recorded. Two configurations are also run as whole sampling
loops with the closed-form "network" ``model_output = 0.4 x + 0.001 t`` (a chain of steps, as a pipeline runs).

Writes ``schedulers.npz`` and ``schedulers.json`` (the configs) into the given directory. Run by
``scripts/make_diffusers_fixtures.py`` or directly, with the reference Python (torch, diffusers):

    /work/hfref/bin/python scripts/_diffusers_scheduler_fixtures.py [OUT_DIR]
"""

import json
import sys
from itertools import product
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

SHAPE = (2, 1, 4, 4)
NUM_STEPS = 10


def grid() -> list[dict]:
    """The scheduler configurations (each: the diffusers config, S, η for DDIM, use_clipped_model_output)."""
    spacings = ("leading", "trailing", "linspace")
    cases = []
    for i, (kind, schedule, pred) in enumerate(product(("ddpm", "ddim"), ("linear", "scaled_linear",
                                                                      "squaredcos_cap_v2"),
                                                       ("epsilon", "v_prediction", "sample"))):
        cfg = dict(_class_name="DDPMScheduler" if kind == "ddpm" else "DDIMScheduler", num_train_timesteps=1000,
                   beta_schedule=schedule, beta_start=1e-4 if schedule == "linear" else 8.5e-4,
                   beta_end=0.02 if schedule == "linear" else 0.012, prediction_type=pred,
                   clip_sample=bool(i % 2), clip_sample_range=1.0 + 0.5 * (i % 3 == 0),
                   timestep_spacing=spacings[i % 3], steps_offset=1 if i % 4 == 0 and spacings[i % 3] == "leading"
                   else 0)
        case = dict(config=cfg, num_inference_steps=NUM_STEPS if i % 5 else 7, eta=0.0, use_clipped_model_output=False)
        if kind == "ddpm":
            cfg["variance_type"] = ("fixed_small", "fixed_large")[i % 2]
        else:
            cfg["set_alpha_to_one"] = bool(i % 3)
            case["eta"] = (0.0, 0.5, 1.0)[i % 3]
            case["use_clipped_model_output"] = i % 4 == 1
        cases.append(case)
    # S = T on the training grid, and a pipeline-length DDIM
    cases.append(dict(config=dict(_class_name="DDPMScheduler", num_train_timesteps=1000), num_inference_steps=1000,
                      eta=0.0, use_clipped_model_output=False, steps=[0, 1, 500, 998, 999]))
    return cases


def _scheduler(cfg: dict):
    cls = DDPMScheduler if cfg["_class_name"] == "DDPMScheduler" else DDIMScheduler
    return cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _step(sched, cfg, case, out, t, x, seed):
    """One diffusers step under noise reproducible from ``seed``; returns (prev, x0, noise)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    if cfg["_class_name"] == "DDPMScheduler":
        res = sched.step(out, int(t), x, generator=torch.Generator().manual_seed(seed))
        if int(t) == 0:
            noise = torch.zeros_like(x)  # diffusers adds none at t = 0
    else:
        res = sched.step(out, int(t), x, eta=case["eta"], use_clipped_model_output=case["use_clipped_model_output"],
                         variance_noise=noise if case["eta"] > 0 else None)
    return res.prev_sample, res.pred_original_sample, noise


def scheduler_fixtures(out_dir) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    arrays, cases = {}, grid()
    for n, case in enumerate(cases):
        cfg = case["config"]
        sched = _scheduler(cfg)
        sched.set_timesteps(case["num_inference_steps"])
        ts = sched.timesteps.numpy()
        arrays[f"{n}/timesteps"] = ts
        steps = case.pop("steps", list(range(len(ts))))
        case["steps"] = steps
        g = torch.Generator().manual_seed(100 + n)
        outs, xs, prevs, x0s, noises = [], [], [], [], []
        for k in steps:
            out = torch.randn(SHAPE, generator=g)
            x = 1.5 * torch.randn(SHAPE, generator=g)
            prev, x0, noise = _step(sched, cfg, case, out, ts[k], x, 1000 * n + k)
            for lst, v in ((outs, out), (xs, x), (prevs, prev), (x0s, x0), (noises, noise)):
                lst.append(v.numpy())
        for name, lst in (("model_output", outs), ("sample", xs), ("prev_sample", prevs), ("x0", x0s),
                          ("noise", noises)):
            arrays[f"{n}/{name}"] = np.stack(lst).astype(np.float32)
    # whole loops with model_output = 0.4 x + 0.001 t
    loops = [dict(config=dict(_class_name="DDPMScheduler", num_train_timesteps=1000, clip_sample=True),
                  num_inference_steps=20, eta=0.0, use_clipped_model_output=False),
             dict(config=dict(_class_name="DDIMScheduler", num_train_timesteps=1000, timestep_spacing="trailing",
                              clip_sample=False, prediction_type="v_prediction"),
                  num_inference_steps=10, eta=0.7, use_clipped_model_output=False)]
    for n, case in enumerate(loops):
        cfg = case["config"]
        sched = _scheduler(cfg)
        sched.set_timesteps(case["num_inference_steps"])
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7 + n))
        arrays[f"loop{n}/x_init"] = x.numpy()
        noises = []
        for k, t in enumerate(sched.timesteps):
            x, _, noise = _step(sched, cfg, case, 0.4 * x + 0.001 * float(t), t, x, 5000 + 100 * n + k)
            noises.append(noise.numpy())
        arrays[f"loop{n}/noise"] = np.stack(noises).astype(np.float32)
        arrays[f"loop{n}/final"] = x.numpy()
    np.savez_compressed(out_dir / "schedulers.npz", **arrays)
    (out_dir / "schedulers.json").write_text(json.dumps(dict(cases=cases, loops=loops), indent=1) + "\n")
    return out_dir / "schedulers.npz"


if __name__ == "__main__":
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    print(scheduler_fixtures(sys.argv[1] if len(sys.argv) > 1 else root / "tests" / "fixtures" / "diffusers"))
