"""models.diffusers: the JAX UNet2DModel against diffusers' own outputs (fixtures built by
scripts/make_diffusers_fixtures.py with diffusers 0.42.1), the save/load round trip, every bad input's error,
and the shipped digits UNet."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models.diffusers import UNet2DModel, load_pretrained, save_pretrained
from models.diffusers.weights import WEIGHTS_NAME

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "diffusers"
NAMES = ["attn2_uncond", "class_cond", "scale_shift"]
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "digits_unet"
TOL = 1e-4  # float32: the recorded outputs are O(1); our worst measured error is ~1e-6


@pytest.fixture(scope="module")
def loaded():
    return {name: load_pretrained(FIXTURES / name) for name in NAMES}


def _reference(name):
    with np.load(FIXTURES / name / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def _all_timesteps(unet, ref):
    """One compiled call over every recorded timestep set: the batch repeated S times."""
    s, b = ref["timesteps"].shape
    x = np.tile(ref["sample"], (s, 1, 1, 1))
    labels = np.tile(ref["class_labels"], s) if "class_labels" in ref else None
    graphdef, state = nnx.split(unet)
    run = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
    return np.asarray(run(state, x, ref["timesteps"].reshape(-1), labels)).reshape(ref["output"].shape)


@pytest.mark.parametrize("name", NAMES)
def test_unet_equals_diffusers_outputs(loaded, name):
    unet, _ = loaded[name]
    ref = _reference(name)
    out = _all_timesteps(unet, ref)
    err = np.abs(out - ref["output"]).max()
    assert err < TOL, f"{name}: max |ours - diffusers| = {err:.2e}"
    # the outputs differ across timesteps, so the time embedding is exercised, not bypassed
    assert np.abs(ref["output"][0] - ref["output"][1]).max() > 100 * TOL


def test_one_particle_layout_matches_batch(loaded):
    unet, _ = loaded["scale_shift"]  # the smallest fixture: this call runs eagerly
    ref = _reference("scale_shift")
    single = np.asarray(unet(ref["sample"][1], ref["timesteps"][0, 1]))
    np.testing.assert_allclose(single, ref["output"][0, 1], atol=TOL)


def test_scheduler_config_is_returned(loaded):
    _, sched = loaded["attn2_uncond"]
    raw = json.loads((FIXTURES / "attn2_uncond" / "scheduler" / "scheduler_config.json").read_text())
    assert sched.kind == "ddpm" and sched.num_train_timesteps == raw["num_train_timesteps"] == 1000
    assert sched.beta_end == raw["beta_end"] and sched.prediction_type == raw["prediction_type"]


def test_save_load_round_trip_is_exact(loaded, tmp_path):
    unet, sched = loaded["class_cond"]
    save_pretrained(unet, tmp_path / "rt", scheduler_config=sched)
    ours, theirs = load_file(tmp_path / "rt" / "unet" / WEIGHTS_NAME), load_file(
        FIXTURES / "class_cond" / "unet" / WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    diffusers_cfg = json.loads((FIXTURES / "class_cond" / "unet" / "config.json").read_text())
    our_cfg = json.loads((tmp_path / "rt" / "unet" / "config.json").read_text())
    assert {k: v for k, v in diffusers_cfg.items() if not k.startswith("_")} == \
        {k: v for k, v in our_cfg.items() if not k.startswith("_")}
    index = json.loads((tmp_path / "rt" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["unet"] == ["diffusers", "UNet2DModel"]
    again, sched2 = load_pretrained(tmp_path / "rt")
    assert sched2 == sched and again.config == unet.config


def test_bare_unet_directory_loads(tmp_path):
    shutil.copytree(FIXTURES / "scale_shift" / "unet", tmp_path / "bare")
    unet, sched = load_pretrained(tmp_path / "bare")
    assert isinstance(unet, UNet2DModel) and sched is None


# ------------------------------------------------------------------------------------------------ bad input
def _copy_with(tmp_path, name="scale_shift", **changes):
    d = tmp_path / "bad"
    shutil.copytree(FIXTURES / name, d)
    cfg_path = d / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, words", [
    (dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]), ["CrossAttnDownBlock2D", "AttnDownBlock2D"]),
    (dict(up_block_types=["AttnUpBlock2D", "SkipUpBlock2D"]), ["SkipUpBlock2D", "UpBlock2D"]),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), ["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"]),
    (dict(cross_attention_dim=8), ["cross_attention_dim", "supported"]),
    (dict(time_embedding_type="fourier"), ["time_embedding_type", "positional"]),
    (dict(resnet_time_scale_shift="spatial"), ["spatial", "scale_shift"]),
    (dict(class_embed_type="timestep"), ["class_embed_type", "None"]),
])
def test_unsupported_config_raises_naming_it(tmp_path, changes, words):
    with pytest.raises(ValueError) as e:
        load_pretrained(_copy_with(tmp_path, **changes))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_missing_and_unexpected_tensors_are_all_listed(tmp_path):
    d = _copy_with(tmp_path)
    f = d / "unet" / WEIGHTS_NAME
    t = load_file(f)
    gone = ["conv_in.weight", "mid_block.attentions.0.to_q.bias"]
    for k in gone:
        del t[k]
    t["extra.weight"] = np.zeros(3, np.float32)
    save_file(t, f)
    with pytest.raises(ValueError, match="missing tensors") as e:
        load_pretrained(d)
    assert all(k in str(e.value) for k in gone + ["extra.weight"]), str(e.value)


def test_mismatched_tensor_shape_raises(tmp_path):
    d = _copy_with(tmp_path)
    f = d / "unet" / WEIGHTS_NAME
    t = load_file(f)
    t["up_blocks.0.resnets.0.conv1.weight"] = t["up_blocks.0.resnets.0.conv1.weight"][:, :-1]
    save_file(t, f)
    with pytest.raises(ValueError, match=r"mismatched shapes.*up_blocks\.0\.resnets\.0\.conv1\.weight"):
        load_pretrained(d)


def test_missing_files_raise(tmp_path):
    d = _copy_with(tmp_path)
    (d / "unet" / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="safetensors"):
        load_pretrained(d)
    with pytest.raises(ValueError, match="not a diffusers model directory"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no such"):
        load_pretrained(tmp_path / "nowhere" / "at" / "all")


def test_bad_image_shapes_and_labels_raise(loaded):
    unet, _ = loaded["attn2_uncond"]  # 1 channel, two downsamples: H, W divisible by 4
    with pytest.raises(ValueError, match="not divisible by 2\\^2"):
        unet(jnp.zeros((2, 1, 16, 10)), 0)
    with pytest.raises(ValueError, match="in_channels=1"):
        unet(jnp.zeros((2, 3, 16, 16)), 0)
    with pytest.raises(ValueError, match="NCHW"):
        unet(jnp.zeros((16, 16)), 0)
    with pytest.raises(ValueError, match="unconditional"):
        unet(jnp.zeros((2, 1, 16, 16)), 0, jnp.zeros(2, jnp.int32))
    cond, _ = loaded["class_cond"]
    with pytest.raises(ValueError, match="class_labels"):
        cond(jnp.zeros((2, 3, 16, 16)), 0)


def test_unknown_dtype_raises():
    with pytest.raises(ValueError, match="float32"):
        load_pretrained(FIXTURES / "scale_shift", dtype="int8")


# ------------------------------------------------------------------------------------------------ live diffusers
def test_live_against_diffusers(loaded):
    """Fresh random inputs through diffusers itself (needs the [reference] extra; skipped in CI)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for name in NAMES:
        theirs = diffusers.UNet2DModel.from_pretrained(FIXTURES / name / "unet").eval()
        unet, _ = loaded[name]
        c, s = unet.config.in_channels, unet.config.sample_size
        x = np.random.default_rng(7).standard_normal((2, c, s, s)).astype(np.float32)
        t = np.asarray([17, 901])
        labels = np.asarray([1, 8]) if unet.config.num_class_embeds else None
        with torch.no_grad():
            ref = theirs(torch.from_numpy(x), torch.from_numpy(t),
                         class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
        np.testing.assert_allclose(np.asarray(unet(x, t, labels)), ref, atol=TOL)


# ------------------------------------------------------------------------------------------------ shipped UNet
@pytest.mark.skipif(not SHIPPED.exists(), reason="digits UNet not trained yet")
def test_shipped_digits_unet_denoises():
    """On held-out digits noised to t = 300, the trained ε-prediction's MSE is far below 1 (the MSE of
    predicting 0, since ε ~ N(0, I)). With 16 images × 256 pixels the MSE's standard error is ≲ 1/√4096 ≈ 0.016
    (per-pixel squared errors are ~χ²₁-like, correlated within an image: a few times that at most)."""
    from models.diffusers.train import _digits_split, ddpm_alpha_bars, digits_16

    unet, sched = load_pretrained(SHIPPED)
    assert sched.kind == "ddpm" and sched.prediction_type == "epsilon" and sched.beta_schedule == "linear"
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    _, (xte, _) = _digits_split()
    x0 = jnp.asarray(digits_16(xte[:16]))
    t = 300
    ab = ddpm_alpha_bars()[t + 1]
    eps = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    graphdef, state = nnx.split(unet)
    pred = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, t))(state, jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps)
    mse = float(jnp.mean((pred - eps) ** 2))
    assert mse < 0.5, mse
