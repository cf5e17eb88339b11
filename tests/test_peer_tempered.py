"""The tempered-SMC peer benchmark (benchmarks/peer_tempered.py): its quick run's JSON line, and the log Z of
its targets (benchmarks/_tempered_targets.py) checked independently: by quadrature at D = 2 (the conjugate
Gaussian; the banana, whose Z must equal its untwisted Gaussian's), and the logistic reference by a fresh
importance-sampling run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

from benchmarks import peer_tempered
from benchmarks._tempered_targets import (
    LOGISTIC_LOG_Z,
    LOGISTIC_LOG_Z_SE,
    breast_cancer_design,
    logistic_reference,
    make_target,
)


def _log_quadrature(target, lo, hi, points=1500):
    """log ∫ p(z) p(y | z) dz over the box [lo, hi]² by the trapezoid rule on a points² grid (D = 2)."""
    g1, g2 = (jnp.linspace(lo[i], hi[i], points) for i in range(2))
    z = jnp.stack(jnp.meshgrid(g1, g2, indexing="ij"), axis=-1).reshape(-1, 2)
    log_f = jax.jit(jax.vmap(lambda v: target.log_prior(v) + target.log_likelihood(v)))(z)
    f = np.exp(np.asarray(log_f, np.float64) - float(log_f.max())).reshape(points, points)
    area = np.trapezoid(np.trapezoid(f, np.asarray(g2), axis=1), np.asarray(g1))
    return math.log(area) + float(log_f.max())


def test_quick_run_prints_one_json_line_with_a_ratio_per_target(capsys):
    peer_tempered.main(["--quick", "--threads", "0"])  # 0: leave this process's XLA flags alone
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["benchmark"] == "peer_tempered"
    assert set(summary["accuracy_per_second_ratio"]) == set(peer_tempered.QUICK_TARGETS)
    assert set(summary["accuracy_per_evaluation_ratio"]) == set(peer_tempered.QUICK_TARGETS)
    for name in peer_tempered.QUICK_TARGETS:
        methods = summary["targets"][name]["methods"]
        assert {"ours", "ours_fixed", "blackjax", "numpyro_is", "genjax_is"} <= set(methods)
        for m, r in methods.items():
            assert {"log_Z_err_mean", "log_Z_err_se", "log_Z_rmse", "time_s", "evaluations"} <= set(r), m
            assert np.isfinite(r["log_Z_err_mean"]) and r["time_s"] > 0, (m, r)
            if m != "ours":
                assert r["accuracy_per_second_ratio"] > 0 and r["accuracy_per_evaluation_ratio"] > 0, m
                lo, hi = r["accuracy_per_second_ratio_ci95"]
                assert lo <= r["accuracy_per_second_ratio"] <= hi, m
        ratio = summary["accuracy_per_second_ratio"][name]
        assert ratio == methods["blackjax"]["accuracy_per_second_ratio"]
        # the definition: (RMSE_peer² t_peer) / (RMSE_ours² t_ours)
        bj, ours = methods["blackjax"], methods["ours"]
        assert ratio == pytest.approx(bj["log_Z_rmse"] ** 2 * bj["time_s"] / (ours["log_Z_rmse"] ** 2 * ours["time_s"]))
        # evaluations: ours 2N + stages·N·moves·leapfrog (2 moves × 5 leapfrog in --quick); IS from the prior N
        assert ours["evaluations"] == pytest.approx(64 * (2 + ours["stages"] * 10))
        assert methods["numpyro_is"]["evaluations"] == 64
        # N = 64 tempered SMC on a 2-d target: log Ẑ within 1 nat on average (IS from the prior needs no such luck)
        assert abs(methods["ours"]["log_Z_err_mean"]) < 1.0 and abs(bj["log_Z_err_mean"]) < 1.0


def test_gaussian_log_Z_equals_quadrature():
    target = make_target("gauss2")
    # the integrand is the posterior (sd ≈ 0.47 around y) times Z: a box of ±8 posterior sds is exact to 1e-10
    assert _log_quadrature(target, (-5.0, -4.0), (5.0, 6.0)) == pytest.approx(target.log_Z, abs=1e-4)


def test_banana_log_Z_equals_its_gaussians_by_quadrature():
    target = make_target("banana2")
    # posterior in u = φ(z): u1 ≈ N(3.0, 0.5²), u2 ≈ N(−0.8, 0.45²); z2 = u2 + 10 − 0.1 z1² lies in [0.5, 13] there
    assert _log_quadrature(target, (-2.0, -5.0), (8.0, 20.0), points=2500) == pytest.approx(target.log_Z, abs=1e-4)


def test_banana_prior_sampler_draws_the_density():
    """z = φ⁻¹(u), u ~ N(0, S): φ(z) must have mean 0 and variances S = (100, 1, …); z2 itself is skewed."""
    target = make_target("banana10")
    m = 40_000
    z = target.sample_prior(jax.random.key(3), m)
    u = np.asarray(z.at[:, 1].add(0.1 * (z[:, 0] ** 2 - 100.0)))
    scale = np.ones(10)
    scale[0] = 10.0
    # 5 standard errors: se(mean) = s/√M, se(var) = s²·√(2/M)
    np.testing.assert_array_less(np.abs(u.mean(0)), 5 * scale / math.sqrt(m))
    np.testing.assert_array_less(np.abs(u.var(0) - scale**2), 5 * scale**2 * math.sqrt(2 / m))
    assert np.mean(np.asarray(z[:, 1])) == pytest.approx(0.0, abs=0.1) and np.median(np.asarray(z[:, 1])) > 5.0


@pytest.mark.parametrize("name", ["gauss5", "banana10", "logistic"])
def test_numpyro_model_is_prior_times_likelihood(name):
    target = make_target(name)
    z = target.sample_prior(jax.random.key(1), 1)[0]
    lp, _ = log_density(target.numpyro_model, (), {}, {"z": z})
    assert float(lp) == pytest.approx(float(target.log_prior(z) + target.log_likelihood(z)), rel=1e-5)


def test_logistic_design_and_reference_log_Z():
    x, y = breast_cancer_design()
    assert x.shape == (569, 31) and set(np.unique(np.asarray(y))) == {0.0, 1.0}
    np.testing.assert_allclose(np.asarray(x[:, 0]), 1.0)
    np.testing.assert_allclose(np.asarray(x[:, 1:].mean(0)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x[:, 1:].std(0)), 1.0, atol=1e-5)
    # an independent run (another seed, fewer draws) must agree within 4 of its and the constant's joint se
    log_z, se = logistic_reference(100_000, seed=1234)
    assert abs(log_z - LOGISTIC_LOG_Z) < 4 * math.hypot(se, LOGISTIC_LOG_Z_SE), (log_z, se)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown target"):
        make_target("gaussian5")
    with pytest.raises(ValueError, match="D >= 2"):
        make_target("banana1")
