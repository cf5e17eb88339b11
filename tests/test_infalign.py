"""InfAlign-CTRL (pplalign.vi.infalign; Balashankar et al. 2024): calibration is the base CDF, the transform,
exact best-of-N win rates, and the matched-KL comparison with plain KL-RL on the exact Markov testbed."""

import json

import numpy as np
import pytest

from pplalign.vi import infalign


def test_calibration_is_uniform_under_the_base_policy():
    # C from m = 2000 base samples, evaluated on 2000 fresh base samples of a continuous reward: a two-sample
    # KS statistic; at level 0.001 its critical value is 1.95·√(2/m) = 0.062.
    rng = np.random.default_rng(0)
    m = 2000
    base, fresh = rng.standard_normal(m), rng.standard_normal(m)
    u = np.sort(np.asarray(infalign.calibrate(np.exp(fresh), np.exp(base))))  # invariant to the increasing exp
    ks = max(np.max(np.arange(1, m + 1) / m - u), np.max(u - np.arange(m) / m))
    assert ks < 1.95 * np.sqrt(2 / m)
    # mid-rank ties and a weighted (exact) base law: values {0, 1} with P = (0.3, 0.7)
    c = np.asarray(infalign.calibrate([0.0, 1.0, 2.0, -1.0], [0.0, 1.0], [0.3, 0.7]))
    np.testing.assert_allclose(c, [0.15, 0.65, 1.0, 0.0], atol=1e-6)
    # a NaN reward is not calibrated to the top (it stays NaN, so the non-finite-reward checks see it)
    assert np.isnan(np.asarray(infalign.calibrate(np.array([np.nan, 1.0]), [0.0, 1.0]))[0])


def test_transform_and_bon_win_rates():
    np.testing.assert_allclose(np.asarray(infalign.exponential_transform(np.array([0.0, 0.5, 1.0]), 2.0)),
                               np.exp(2.0 * (np.array([0.0, 0.5, 1.0]) - 1)), rtol=1e-6)
    with pytest.raises(ValueError):
        infalign.exponential_transform(0.5, 0.0)
    # BoN of the base against itself wins half the time; with 3 distinct equiprobable rewards BoN_2 of p₀
    # against one p₀ sample: max law (1/9, 3/9, 5/9), win = Σ q·(below + ½·mass) = (1/9·1/6 + 3/9·1/2 + 5/9·5/6)
    p = np.full(3, 1 / 3)
    w = infalign.bon_win_rates([0.0, 1.0, 2.0], p, p, 2)
    assert w["vs_base_bon"] == pytest.approx(0.5)
    assert w["vs_base"] == pytest.approx(1 / 54 + 3 / 18 + 25 / 54)
    with pytest.raises(ValueError):
        infalign.bon_win_rates([0.0, 1.0], [0.5, 0.6], [0.5, 0.5], 1)


def test_uniform_model_against_closed_forms():
    # β → ∞: σ = U, so BoN_N(U) vs U wins N/(N+1) and vs BoN_N(U) wins ½, at KL 0
    r = infalign.uniform_bon_win_rate(1.0, 1e9, 4)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["vs_base"] == pytest.approx(4 / 5, abs=1e-4) and r["vs_base_bon"] == pytest.approx(0.5, abs=1e-4)
    # t → 0: Φ_t(u) ≈ e^{−t}(1 + t u), σ(u) ∝ e^{λu} with λ = t e^{−t}/β; KL = λ E[u] − log((e^λ − 1)/λ),
    # E[u] = 1/(1 − e^{−λ}) − 1/λ (grid error O(1/4096²), linearisation error O(t) = 1e-4 relative)
    t, lam = 1e-4, 2.0
    r = infalign.uniform_bon_win_rate(t, t * np.exp(-t) / lam, 1)
    mean = 1 / (1 - np.exp(-lam)) - 1 / lam
    assert r["vs_base"] == pytest.approx(mean, rel=1e-3)
    assert r["kl"] == pytest.approx(lam * mean - np.log((np.exp(lam) - 1) / lam), rel=1e-3)


def test_choose_t_prefers_a_steeper_transform_for_larger_n():
    # on the uniform model at KL = 1: for N = 1 the win rate is E_σ[u], maximised by the linear tilt (t → 0);
    # for N = 4 a steep exponential wins
    t1, t4 = infalign.choose_t(1, 1.0), infalign.choose_t(4, 1.0)
    assert t1["t"] == min(r["t"] for r in t1["grid"])
    assert t4["t"] >= 8 and all(abs(r["kl"] - 1.0) < 1e-3 for r in t4["grid"])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from experiments import infalign as exp
    out = tmp_path_factory.mktemp("infalign")
    exp.main(["--quick", "--fit-steps", "60", "--out", str(out)])
    return json.loads((out / "results.json").read_text())


def test_ctrl_beats_plain_kl_rl_on_best_of_n_at_matched_kl(quick):
    # exact (enumerated) at KL(π‖p₀) = 1 on the Markov testbed: the CTRL policy tuned for N wins more often
    # under BoN_N than plain KL-RL on the raw reward; and for N = 1 calibration alone beats the raw reward
    k = quick["kls"].index(1.0)
    at = lambda name, n: quick["table"][name][k][f"N={n}"]["vs_base_bon"]
    for name in quick["table"]:
        assert abs(quick["table"][name][k]["kl"] - 1.0) < 1e-4
    assert at("ctrl_4", 4) > at("plain", 4) + 0.01
    assert at("ctrl_16", 16) > at("plain", 16) + 0.01
    assert at("calibrated", 1) > at("plain", 1)
    assert at("ctrl_16", 1) < at("calibrated", 1)  # the BoN transform costs single-sample win rate
    # the VI fit (existing KL-regularised VI) approaches the enumerated optimum
    fit = quick["vi_fits"]["ctrl_4"]
    assert fit["kl_q_sigma"] < 1e-2
    # ... and that optimum is the CTRL policy of the table (same KL budget, same BoN win rates)
    assert abs(fit["kl_q_p0"] - 1.0) < 0.02
    for n in (1, 4, 16):
        assert abs(fit[f"N={n}"]["vs_base_bon"] - at("ctrl_4", n)) < 0.01
