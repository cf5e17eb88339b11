"""Imperfect verifiers (models.lm.verifiers; Stroebl et al. 2024): the corrupted checker's false-positive rate,
the resampling ceiling, the utility-optimal n and the range check. Pure numpy: no model, no compile."""

import numpy as np
import pytest

from models.lm.verifiers import (
    NoisyChecker,
    ThresholdPRM,
    check_range,
    first_accepted,
    operating_points,
    resampling_ceiling,
    resampling_curve,
    utility_optimal_n,
)


def test_noisy_checker_hits_its_false_positive_rate():
    # 4000 distinct wrong solutions: the accepted count is Binomial(4000, 0.1), s.d. √(4000·0.1·0.9) = 19;
    # 4 s.d. is 76 of 4000, i.e. ±0.019 on the rate. Right ones are always accepted (TPR 1).
    m, fpr = 4000, 0.1
    chk = NoisyChecker(fpr, seed=3)
    toks = np.arange(m * 4).reshape(m, 4)
    rate = np.mean([chk(0, t, False) for t in toks])
    assert abs(rate - fpr) < 4 * np.sqrt(fpr * (1 - fpr) / m)
    assert all(chk(0, t, True) for t in toks[:200])
    # keyed: the same solution gets the same verdict; another seed changes verdicts
    assert [chk(0, t, False) for t in toks[:300]] == [NoisyChecker(fpr, seed=3)(0, t, False) for t in toks[:300]]
    assert [chk(0, t, False) for t in toks[:300]] != [NoisyChecker(fpr, seed=4)(0, t, False) for t in toks[:300]]


def test_resampling_approaches_the_closed_form_ceiling():
    # 100 problems with known p_i; pools of 256 i.i.d. draws whose tokens are distinct (so the checker's coins
    # are independent). With n = 32 the finite-n closed form is within 1e-3 of the ceiling for these p_i, FPR
    # (acceptance a ≥ 0.24, (1 − a)^32 < 2e-4); the measured mean over 100 problems × 8 groups has
    # s.d. ≤ √(0.25/800) = 0.018, tolerance 4 s.d. = 0.07.
    rng = np.random.default_rng(0)
    P, M, n, fpr = 100, 256, 32, 0.2
    p = rng.uniform(0.05, 0.6, P)
    correct = rng.random((P, M)) < p[:, None]
    tokens = np.arange(P * M).reshape(P, M, 1)
    accepts = NoisyChecker(fpr, seed=1).accepts(tokens, correct)
    right, wrong = first_accepted(accepts, correct, n)
    ceiling = resampling_ceiling(p, fpr).mean()
    cf_right, cf_wrong = resampling_curve(p, n, fpr)
    assert abs(cf_right.mean() - ceiling) < 1e-3
    assert abs(right.mean() - ceiling) < 0.07
    assert abs(wrong.mean() - cf_wrong.mean()) < 0.07
    assert ceiling < 1 - 0.05  # the cap is real: well below what a perfect verifier reaches
    assert abs(resampling_ceiling(p, 0.0).mean() - 1.0) < 1e-12
    # a perfect verifier: the first accepted sample is right whenever one of the n is
    right0, wrong0 = first_accepted(correct, correct, n)
    assert np.all(wrong0 == 0) and np.allclose(right0, correct.reshape(P, -1, n).any(-1).mean(1))


def test_utility_optimal_n_is_finite_for_a_mix_of_problems():
    # closed-form utility of a mix of easy (p = 0.9) and hopeless (p = 0.01) problems at FPR 0.1, c = 1:
    # easy problems saturate after a few draws while hopeless ones keep accumulating false positives, so U(n)
    # peaks at a finite n; the search must return the argmax of the curve it is given.
    p, fpr, c = np.array([0.9, 0.9, 0.01, 0.01]), 0.1, 1.0
    ns = np.arange(1, 129)
    curves = [resampling_curve(p, n, fpr) for n in ns]
    right = [r.mean() for r, _ in curves]
    wrong = [w.mean() for _, w in curves]
    res = utility_optimal_n(ns, right, wrong, c)
    u = np.asarray(right) - c * np.asarray(wrong)
    assert res["n"] == ns[int(np.argmax(u))] and 1 < res["n"] < 10
    assert res["utility"] > u[-1] + 0.05  # strictly better than resampling as long as possible
    # a cost so high that answering never pays: abstain (n = 0)
    assert utility_optimal_n(ns, right, wrong, 100.0)["n"] == 0


def test_prm_operating_points_report_measured_rates():
    rng = np.random.default_rng(1)
    y = rng.random(2000) < 0.4
    s = np.clip(np.where(y, rng.beta(5, 2, 2000), rng.beta(2, 5, 2000)), 0, 1)
    for op in operating_points(s, y, [0.05, 0.2]):
        assert op["fpr"] <= op["target_fpr"] + 1e-12
        acc = ThresholdPRM(op["threshold"]).accepts(s)
        assert op["fpr"] == pytest.approx(acc[~y].mean()) and op["tpr"] == pytest.approx(acc[y].mean())
        assert op["tpr"] > op["fpr"]


def test_verifier_outside_its_declared_range_raises():
    with pytest.raises(ValueError, match="outside its declared range"):
        ThresholdPRM(0.5).accepts(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="outside its declared range"):
        check_range([np.nan], 0.0, 1.0)
    with pytest.raises(ValueError, match="probability"):
        NoisyChecker(1.5)
    with pytest.raises(ValueError, match="smaller than n"):
        first_accepted(np.ones((2, 3), bool), np.ones((2, 3), bool), 4)


def test_quick_experiment_runs_and_counts_compute(tmp_path):
    # the CI-sized run of experiments.imperfect_verifiers (4 problems, n ∈ {1, 4}): every method reports
    # accuracy with policy tokens, verifier calls and NFE; resampling stops early so it never spends more
    import json

    from experiments import imperfect_verifiers as exp

    exp.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    # FPR 0: the ceiling is the fraction of problems with a right sample in the pool, which is exactly the
    # resampling accuracy at the largest n (one group = the whole pool)
    exact = res["verifiers"]["checker_fpr0"]
    assert exact["ceiling"] == pytest.approx(exact["rows"][-1]["resample"]["accuracy"])
    for vr in res["verifiers"].values():
        for row in vr["rows"]:
            r = row["resample"]
            assert 1.0 <= r["verifier_calls"] <= row["n"] and r["policy_tokens"] <= row["accepted_majority"]["policy_tokens"] + 1e-9
            for m in ("resample", "accepted_majority", "particle_filter"):
                assert {"accuracy", "wrong", "nfe", "policy_tokens", "verifier_calls"} <= set(row[m])
                assert 0.0 <= row[m]["accuracy"] + row[m]["wrong"] <= 1.0 + 1e-9
    assert (tmp_path / "accuracy.png").exists()
