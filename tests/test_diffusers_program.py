"""models.diffusers.program: the UNet + scheduler ``Sequential`` program.

* On a tiny random diffusers UNet: an ancestral sample through the program equals the scheduler's own loop
  (models.diffusers.scheduler.step, itself checked against diffusers) under the same noise; a class label
  reaches a class-conditional UNet.
* On a linear-Gaussian "UNet" (the exact ε-predictor of N(μ, v) data, no clipping), the program's chain is
  Gaussian per pixel, so the tilted target of the reward r(x) = γ·Σ x is closed form: the final x ~ N(m, q)
  per pixel gives σ = N(m + γq, q) and log Z = d(γm + γ²q/2) at β = 1. SMC, FK steering and TDS must hit it.
* NFE counts under smc, fk_steering, tds, reward_guidance and dts; DTS refuses DDIM with η = 0; the particle
  axis shards over 8 host devices; bad input raises ValueError.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.diffusers import load_unet
from models.diffusers import scheduler as sch
from models.diffusers.program import unet_program
from pplalign.guidance import reward_guidance, tds
from pplalign.potentials import GaussianPosteriorTwist, fk_steering

ROOT = Path(__file__).resolve().parents[1]
DDPM = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, clip_sample=False)
S = 10


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianEps:
    """ε̂(x, t) of data x₀ ~ N(μ, v) per pixel: E[x₀|x_t] = μ + √ᾱ v (x − √ᾱ μ)/(ᾱ v + 1 − ᾱ)."""

    mu: jax.Array
    v: jax.Array
    alphas_cumprod: jax.Array

    def __call__(self, x, t):
        ab = self.alphas_cumprod[t]
        x0 = self.mu + jnp.sqrt(ab) * self.v * (x - jnp.sqrt(ab) * self.mu) / (ab * self.v + 1 - ab)
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SumReward:
    gamma: float = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x):
        return self.gamma * jnp.sum(x)


GAMMA = 0.5
SHAPE = (1, 2, 2)


@pytest.fixture(scope="module")
def gaussian():
    """(program, exact final mean m, variance q per pixel): the chain's moments propagated step by step through
    its Gaussian kernels x' = A x + B + σ z (A, B read off the kernel's mean, which is affine in x)."""
    acp = jnp.asarray(sch.scheduler_from_config(DDPM).alphas_cumprod())
    program = unet_program(GaussianEps(jnp.float32(0.3), jnp.float32(0.25), acp), DDPM, S, sample_shape=SHAPE)
    m, q = 0.0, 1.0
    for k in range(S):
        def mean_of(x, k=k):
            state = program.init(jax.random.PRNGKey(0))._replace(x=jnp.full(SHAPE, x))
            x0, eps = sch.predict(program.schedule, k, program.net(state.x, program.schedule.timesteps[k]), state.x)
            mean, var = program.reverse_moments(state._replace(x0=x0, eps=eps), k)
            return mean[0, 0, 0], var
        B, var = mean_of(0.0)
        A = mean_of(1.0)[0] - B
        m, q = float(A * m + B), float(A ** 2 * q + var)
    return program, m, q


def _weighted_mean_and_se(p):
    w = np.asarray(p.normalized_weights, np.float64)
    x = np.asarray(p.samples).reshape(len(w), -1).mean(1)
    ess = 1.0 / np.sum(w ** 2)
    mean = float(np.sum(w * x))
    return mean, float(np.sqrt(np.sum(w * (x - mean) ** 2) / ess)), ess


N = 2000


@pytest.mark.parametrize("sampler", ["smc", "fk_steering", "tds"])
def test_tilted_samplers_hit_the_closed_form_target(gaussian, sampler):
    """Weighted pixel mean within 5 standard errors (SE from the ESS) of m + γq; log Ẑ within 0.1 of log Z
    (the relative variance of Ẑ over N = 2000 particles of a smooth 4-d tilt is far below that)."""
    program, m, q = gaussian
    d = int(np.prod(SHAPE))
    target = pplalign.tilt(program, SumReward(GAMMA), 1.0)
    key = jax.random.PRNGKey(3)
    run = dict(smc=lambda: pplalign.smc(key, target, N), fk_steering=lambda: fk_steering(key, target, N),
               tds=lambda: tds(key, target, N))[sampler]
    p = run()
    assert int(p.nfe) == (2 if sampler == "tds" else 1) * N * S
    mean, se, ess = _weighted_mean_and_se(p)
    assert abs(mean - (m + GAMMA * q)) < 5 * se, (sampler, mean, m + GAMMA * q, se, ess)
    assert abs(float(p.log_Z) - d * (GAMMA * m + GAMMA ** 2 * q / 2)) < 0.1


def test_guidance_and_posterior_twist_nfe(gaussian):
    program, _, _ = gaussian
    target = pplalign.tilt(program, SumReward(GAMMA), 1.0)
    p = reward_guidance(jax.random.PRNGKey(0), target, 16)
    assert int(p.nfe) == 2 * 16 * S
    twist = GaussianPosteriorTwist.create(program, SumReward(GAMMA), 1.0, data_variance=0.25, num_draws=4)
    p = pplalign.smc(jax.random.PRNGKey(0), target, 16, twist=twist)
    assert int(p.nfe) == 16 * S and np.all(np.isfinite(np.asarray(p.log_weights)))


def test_dts_runs_and_refuses_a_deterministic_ddim(gaussian):
    program, _, _ = gaussian
    target = pplalign.tilt(program, SumReward(GAMMA), 1.0)
    particles, tree = pplalign.dts(jax.random.PRNGKey(0), target, 8, num_samples=4)
    assert 0 < int(particles.nfe) == int(tree.nfe) <= 8 * S
    ddim0 = unet_program(program.net, dict(DDPM, _class_name="DDIMScheduler"), S, eta=0.0, sample_shape=SHAPE)
    with pytest.raises(ValueError, match="stochastic"):
        pplalign.dts(jax.random.PRNGKey(0), pplalign.tilt(ddim0, SumReward(GAMMA), 1.0), 8)


# --- a tiny random diffusers UNet ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_unet():
    """diffusers-built random UNet of the committed fixtures (16×16×3, attention at two resolutions, 10 classes);
    loading it (abstract module + assigned weights) costs far less than a fresh random init."""
    return load_unet(ROOT / "tests" / "fixtures" / "diffusers" / "class_cond")


def test_ancestral_sample_equals_the_scheduler_loop(tiny_unet):
    """pplalign.ancestral_sample through the program (final_std = 0: diffusers' noiseless last step) equals the
    loop x ← step(UNet(x, t_k), x, z_k) under the same standard-normal draws, which are those of
    ancestral_sample's keys (init: split(init_key, n); step t: split(fold_in(run_key, t), n)). DDIM (η = 0.6,
    trailing spacing, v-prediction) with a class label; the DDPM kernel's loop is checked in
    test_diffusers_scheduler (one UNet compile here keeps the test cheap)."""
    n, steps = 3, 4
    config, eta = dict(_class_name="DDIMScheduler", timestep_spacing="trailing", prediction_type="v_prediction"), 0.6
    program = unet_program(tiny_unet, config, steps, eta=eta, class_label=2, final_std=0.0)
    key = jax.random.PRNGKey(5)
    got = pplalign.ancestral_sample(key, program, n)
    init_key, run_key = jax.random.split(key)
    x = jax.vmap(lambda k: jax.random.normal(k, (3, 16, 16)))(jax.random.split(init_key, n))
    sc = program.schedule
    for k in range(steps):
        z = jax.vmap(lambda kk: jax.random.normal(kk, (3, 16, 16)))(jax.random.split(jax.random.fold_in(run_key, k), n))
        out = tiny_unet(x, sc.timesteps[k], jnp.full((n,), 2))
        x = sch.step(sc, k, out, x, z)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), atol=1e-5)
    # the default program differs only by the last step's floor σ = √β_0 (a density for SMC/DTS)
    default = unet_program(tiny_unet, config, steps, eta=eta, class_label=2)
    state = default.init(key)
    assert float(default.reverse_moments(state, steps - 1)[1]) > 0
    assert float(default.reverse_moments(state, 0)[1]) == pytest.approx(float(sc.std[0]) ** 2)


def test_unet_program_bad_input(tiny_unet):
    with pytest.raises(ValueError, match="class_label"):
        unet_program(tiny_unet, DDPM, S)  # class-conditional UNet without a label
    with pytest.raises(ValueError, match="class_label"):
        unet_program(tiny_unet, DDPM, S, class_label=10)
    with pytest.raises(ValueError, match="divisible"):
        unet_program(tiny_unet, DDPM, S, class_label=0, sample_shape=(3, 6, 6))
    with pytest.raises(ValueError, match="eta"):
        unet_program(tiny_unet, DDPM, S, class_label=0, eta=0.5)
    with pytest.raises(ValueError, match="final_std"):
        unet_program(tiny_unet, DDPM, S, class_label=0, final_std=-1.0)
    with pytest.raises(ValueError, match="sample_shape"):
        unet_program(GaussianEps(0.0, 1.0, jnp.ones(1000)), DDPM, S)


def _sharded_check() -> dict:  # runs inside an 8-device subprocess
    import jax

    import pplalign
    from tests.test_diffusers_program import DDPM, SHAPE, GaussianEps, S, SumReward

    acp = jnp.asarray(sch.scheduler_from_config(DDPM).alphas_cumprod())
    program = unet_program(GaussianEps(jnp.float32(0.3), jnp.float32(0.25), acp), DDPM, S, sample_shape=SHAPE)
    target = pplalign.tilt(program, SumReward(GAMMA), 1.0)
    key = jax.random.PRNGKey(1)
    a = pplalign.smc(key, target, 64)
    b = pplalign.smc(key, target, 64, mesh=pplalign.particle_mesh())
    return dict(devices=jax.device_count(), shards=len(b.samples.sharding.device_set),
                diff=float(jnp.max(jnp.abs(a.samples - b.samples))), logz=float(abs(a.log_Z - b.log_Z)),
                nfe=int(b.nfe))


def test_particle_axis_shards_over_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    code = "import json, tests.test_diffusers_program as t; print(json.dumps(t._sharded_check()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["shards"] == 8 and out["nfe"] == 64 * S
    assert out["diff"] < 1e-5 and out["logz"] < 1e-4
