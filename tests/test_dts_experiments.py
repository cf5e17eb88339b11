"""The DTS experiments run end to end in quick mode and print their JSON summary last."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quick(name, out):
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dts_gmm_quick(tmp_path):
    summary = run_quick("dts_gmm", tmp_path)
    for key in ("nfe_ratio_vs_is", "nfe_ratio_vs_smc", "floor_ratio", "tilt_bias"):
        assert key in summary
    assert set(summary["tilt_bias"]) == {"dts", "dts_consistent"}
    assert summary["consistent_method"] == "dts_twisted_gp"
    assert summary["data_variance"] > 10  # ring of radius 6: 18 + 0.25 per coordinate
    assert math.isfinite(summary["floor_ratio"]) and summary["floor_ratio"] > 0
    assert os.path.exists(tmp_path / "dts_gmm.png") and os.path.exists(tmp_path / "dts_gmm.json")


def test_dts_anytime_quick_resumes_exactly(tmp_path):
    summary = run_quick("dts_anytime", tmp_path)
    assert summary["resume_identical"] is True
    assert summary["variant"] == "twisted_gp" and summary["pilot_nfe"] == 32 * 10  # the pilot is counted
    assert math.isfinite(summary["final_energy"])
    assert os.path.exists(tmp_path / "tree.npz") and os.path.exists(tmp_path / "dts_anytime.png")
