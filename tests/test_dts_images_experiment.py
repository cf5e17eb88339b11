"""experiments/dts_images.py --quick: the class-conditional DTS protocol runs on the shipped digits UNet, writes
its JSON and plot, counts NFE per method, and the reward-seeking samplers beat the plain sampler on reward.
A classifier whose input size does not fit the images is refused."""

import json

import jax
import numpy as np
import pytest

from experiments import dts_images
from models.diffusers.train import OUT_DIR as DIGITS_UNET
from models.diffusion.pretrained import load_classifier


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("dts_images")
    unet = str(DIGITS_UNET) if (DIGITS_UNET / "unet").exists() else "random"
    return dts_images.main(["--quick", "--unet", unet, "--out", str(out)]), out


def test_quick_json_plot_and_nfe(result):
    summary, out = result
    assert (out / "quality_vs_nfe.png").exists()
    saved = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["n"]): r for r in summary["table"]}
    assert set(m for m, _ in rows) == set(dts_images.METHODS) and ("best_of_n", 1) in rows
    S = dts_images.QUICK["num_steps"]
    assert rows[("best_of_n", 1)]["nfe_per_sample"] == S and rows[("best_of_n", 4)]["nfe_per_sample"] == 4 * S
    assert rows[("fk_smc", 4)]["nfe_per_sample"] == 4 * S
    assert rows[("tds", 4)]["nfe_per_sample"] == 2 * 2 * S  # n/2 particles, 2 NFE per particle-step
    assert 0 < rows[("dts", 4)]["nfe_per_sample"] <= 4 * S
    for r in summary["table"]:
        assert np.isfinite(r["frechet"]) and 0 <= r["accuracy"] <= 1 and r["mean_reward"] <= 0
    assert saved["best_baseline"] == summary["best_baseline"]


def test_reward_seeking_methods_beat_best_of_one(result):
    """Mean log p(c|x) over 8 samples: best-of-4 and FK-SMC each above the plain sampler, and so is the mean of
    all reward-seeking rows (their reward spread over 8 samples is ~1 nat; the gains are several nats)."""
    summary, _ = result
    rows = {(r["method"], r["n"]): r["mean_reward"] for r in summary["table"]}
    plain = rows[("best_of_n", 1)]
    assert rows[("best_of_n", 4)] > plain and rows[("fk_smc", 4)] > plain
    seeking = [v for (m, n), v in rows.items() if (m, n) != ("best_of_n", 1)]
    assert np.mean(seeking) > plain


def test_classifier_shape_mismatch_raises():
    with pytest.raises(ValueError, match="cannot be mean-pooled"):
        dts_images.PooledClassifier.create(load_classifier(), (1, 12, 12))
    clf = dts_images.PooledClassifier.create(load_classifier(), (1, 16, 16))
    assert clf(jax.numpy.zeros((2, 1, 16, 16))).shape == (2, 10)
