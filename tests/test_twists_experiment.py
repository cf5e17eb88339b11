"""The twisted-SMC bounds experiment in quick mode: runs, writes its files, and its numbers make sense."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEARNED = ("ctl", "sixo", "dpg", "soft_rl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("twisted_smc_bounds")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.twisted_smc_bounds", "--quick", "--no-progress", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_outputs_and_keys(run):
    out, summary = run
    for name in ("results.json", "table.txt", "bounds.png"):
        assert (out / name).stat().st_size > 0
    for m in ("bootstrap",) + LEARNED:
        for key in ("lower", "upper", "kl_sigma_q", "kl_q_sigma", "ess"):
            assert key in summary[m]
    assert summary["log_Z"] == pytest.approx(-2.3498, abs=1e-3)


def test_learned_twists_beat_bootstrap(run):
    _, s = run
    boot = s["bootstrap"]
    for m in LEARNED:
        r = s[m]
        assert r["loss_last"] < r["loss_first"], m  # training decreased the loss
        # exact KLs (enumeration): the learned proposal is far closer to σ than p₀ is
        assert r["kl_sigma_q"] < 0.5 * boot["kl_sigma_q"], m
        assert r["kl_q_sigma"] < 0.5 * boot["kl_q_sigma"], m
        assert r["upper"] - r["lower"] < boot["upper"] - boot["lower"], m
