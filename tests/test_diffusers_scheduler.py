"""models.diffusers.scheduler against diffusers' own DDPMScheduler / DDIMScheduler (fixtures written by
scripts/_diffusers_scheduler_fixtures.py with diffusers 0.42.1; no torch needed here)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.diffusers import scheduler as sch

FIX = Path(__file__).parent / "fixtures" / "diffusers"
DATA = np.load(FIX / "schedulers.npz")
META = json.loads((FIX / "schedulers.json").read_text())
# float32 on both sides: diffusers computes the coefficients in float32, we in float64 then round, so outputs
# of size O(1) (|x| ≲ 5, coefficients ≲ 30 for the v/ε conversions at ᾱ → 0) agree to a few float32 ulps.
ATOL, RTOL = 2e-5, 2e-5


def _schedule(case):
    cfg = sch.scheduler_from_config(case["config"])
    return sch.set_timesteps(cfg, case["num_inference_steps"], eta=case["eta"],
                             use_clipped_model_output=case["use_clipped_model_output"])


@pytest.mark.parametrize("n", range(len(META["cases"])))
def test_every_configuration_steps_as_diffusers(n):
    case = META["cases"][n]
    schedule = _schedule(case)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), DATA[f"{n}/timesteps"])
    for j, k in enumerate(case["steps"]):
        prev, x0 = sch.step(schedule, k, jnp.asarray(DATA[f"{n}/model_output"][j]), jnp.asarray(DATA[f"{n}/sample"][j]),
                            jnp.asarray(DATA[f"{n}/noise"][j]))
        np.testing.assert_allclose(np.asarray(x0), DATA[f"{n}/x0"][j], atol=ATOL, rtol=RTOL, err_msg=f"x0 step {k}")
        np.testing.assert_allclose(np.asarray(prev), DATA[f"{n}/prev_sample"][j], atol=ATOL, rtol=RTOL,
                                   err_msg=f"prev step {k} of {case['config']}")


def test_grid_covers_the_settings():
    cases = [c["config"] for c in META["cases"]]
    for field, values in (("beta_schedule", sch.BETA_SCHEDULES), ("prediction_type", sch.PREDICTION_TYPES),
                          ("timestep_spacing", sch.SPACINGS), ("variance_type", sch.VARIANCE_TYPES)):
        assert set(values) <= {c.get(field) for c in cases}, field
    assert {0.0, 0.5, 1.0} <= {c["eta"] for c in META["cases"] if c["config"]["_class_name"] == "DDIMScheduler"}


@pytest.mark.parametrize("n", range(len(META["loops"])))
def test_whole_loop_as_diffusers(n):
    """A chain of steps with the closed-form network 0.4 x + 0.001 t ends where diffusers' loop ends."""
    case = META["loops"][n]
    schedule = _schedule(case)

    def body(x, inp):
        k, noise = inp
        t = schedule.timesteps[k]
        return sch.step(schedule, k, 0.4 * x + 0.001 * t, x, noise)[0], None

    x, _ = jax.lax.scan(body, jnp.asarray(DATA[f"loop{n}/x_init"]),
                        (jnp.arange(schedule.num_steps), jnp.asarray(DATA[f"loop{n}/noise"])))
    np.testing.assert_allclose(np.asarray(x), DATA[f"loop{n}/final"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bad, word", [
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(thresholding=True), "thresholding"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(skip_prk_steps=True), "skip_prk_steps"),
    (dict(_class_name="PNDMScheduler"), "PNDMScheduler"),
])
def test_unsupported_settings_raise_naming_them(bad, word):
    with pytest.raises(ValueError, match=word):
        sch.scheduler_from_config({"_class_name": "DDPMScheduler", **bad})


def test_bad_step_counts_and_eta_raise():
    cfg = sch.scheduler_from_config({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        sch.set_timesteps(cfg, 1001)
    with pytest.raises(ValueError, match="eta"):
        sch.set_timesteps(cfg, 10, eta=-1.0)
    with pytest.raises(ValueError, match="DDIM settings"):
        sch.set_timesteps(sch.scheduler_from_config({}), 10, eta=0.5)
    assert not sch.set_timesteps(cfg, 10, eta=0.0).stochastic
