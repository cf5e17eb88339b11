"""VI on a genjax program (ADEV, pplalign.vi.fit) against numpyro SVI + Trace_ELBO on the same model and family.

Model: Bayesian linear regression, w ~ N(0, I_d), b ~ N(0, 1), y_i ~ N(x_i·w + b, σ_y²).
Family: mean-field Gaussian, w ~ N(μ_w, diag s_w²), b ~ N(μ_b, s_b²), s = exp(log s), reparameterised.
Both fit with Adam for the same number of steps and samples per step. Each fitted q is then scored with the
*same* ELBO estimator (M fresh draws, standard error from them), and the gap is compared with the Monte
Carlo error. The closed-form optimum (for a linear-Gaussian model the mean-field ELBO optimum has no closed
form, but log p(y) does) is reported as the upper bound.

    python -m experiments.vi_peer_numpyro [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

NOISE = 0.5
SEEDS = 3


def make_data(key, n, d):
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (d,))
    y = x @ w + 0.3 + NOISE * jax.random.normal(ke, (n,))
    return x, y


def log_joint(w, b, x, y):
    """log p(w, b, y | x) in plain JAX (the reference both fits are scored with)."""
    lp = -0.5 * jnp.sum(w**2) - 0.5 * b**2 - 0.5 * (w.shape[-1] + 1) * math.log(2 * math.pi)
    resid = y - (x @ w + b)
    return lp + jnp.sum(-0.5 * (resid / NOISE) ** 2 - math.log(NOISE) - 0.5 * math.log(2 * math.pi))


def score_elbo(key, params, x, y, m):
    """ELBO of a fitted mean-field q by M draws: (mean, standard error)."""
    d = x.shape[1]
    kw, kb = jax.random.split(key)
    sw, sb = jnp.exp(params["log_scale_w"]), jnp.exp(params["log_scale_b"])
    w = params["loc_w"] + sw * jax.random.normal(kw, (m, d))
    b = params["loc_b"] + sb * jax.random.normal(kb, (m,))
    log_q = jnp.sum(-0.5 * ((w - params["loc_w"]) / sw) ** 2 - jnp.log(sw), -1) - 0.5 * ((b - params["loc_b"]) / sb) ** 2 - jnp.log(sb)
    log_q = log_q - 0.5 * (d + 1) * math.log(2 * math.pi)
    vals = jax.vmap(lambda wi, bi: log_joint(wi, bi, x, y))(w, b) - log_q
    return float(jnp.mean(vals)), float(jnp.std(vals) / math.sqrt(m))


def log_evidence(x, y):
    """log p(y | x) in closed form: y ~ N(0, X Xᵀ + 1 1ᵀ + σ² I)."""
    n = x.shape[0]
    cov = x @ x.T + jnp.ones((n, n)) + NOISE**2 * jnp.eye(n)
    return float(jax.scipy.stats.multivariate_normal.logpdf(y, jnp.zeros(n), cov))


def mean_field_optimum(x, y):
    """The exact optimum of the mean-field Gaussian ELBO for this conjugate model (CAVI fixed point): the
    means are the posterior mean, the variances 1/Λ_ii of the posterior precision Λ; ELBO by closed form."""
    z = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], axis=1)
    prec = z.T @ z / NOISE**2 + jnp.eye(z.shape[1])
    var = 1.0 / jnp.diag(prec)
    # KL(q‖post) for Gaussians with q's mean at the posterior mean (no mean term), ELBO = log p(y) − KL
    k = z.shape[1]
    kl = 0.5 * (jnp.sum(prec.diagonal() * var) - k - jnp.sum(jnp.log(var)) - jnp.linalg.slogdet(prec)[1])
    return log_evidence(x, y) - float(kl)


def init_params(d):
    return {
        "loc_w": jnp.zeros((d,)),
        "log_scale_w": jnp.full((d,), -1.0),
        "loc_b": jnp.zeros(()),
        "log_scale_b": jnp.full((), -1.0),
    }


def _timed_runs(run, key):
    """Fit once per seed (the first call compiles and is not timed); (list of params, mean seconds per fit)."""
    keys = jax.random.split(key, SEEDS)
    jax.block_until_ready(run(keys[0]))
    out, t0 = [], time.perf_counter()
    for k in keys:
        out.append(jax.block_until_ready(run(k)))
    return out, (time.perf_counter() - t0) / len(keys)


def fit_genjax(key, x, y, steps, samples, lr):
    from genjax import gen, multivariate_normal, normal
    from genjax.adev import multivariate_normal_diag_reparam, normal_reparam

    from pplalign.vi import adev, fit

    @gen
    def model(x):
        # genjax adds the scores of addresses as they are, so each address is one (multivariate) draw
        w = multivariate_normal(jnp.zeros(x.shape[1]), jnp.eye(x.shape[1])) @ "w"
        b = normal(0.0, 1.0) @ "b"
        multivariate_normal(x @ w + b, NOISE**2 * jnp.eye(x.shape[0])) @ "y"

    @gen
    def guide(p):
        multivariate_normal_diag_reparam(p["loc_w"], jnp.exp(p["log_scale_w"])) @ "w"
        normal_reparam(p["loc_b"], jnp.exp(p["log_scale_b"])) @ "b"

    objective = adev.as_objective(adev.elbo(model, guide, {"y": y}, (x,)), num_samples=samples)
    run = lambda k: fit(objective, init_params(x.shape[1]), key=k, num_steps=steps, optimizer=lr, chunk_size=steps, progress=False).params
    return _timed_runs(run, key)


def fit_numpyro(key, x, y, steps, samples, lr):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO

    d = x.shape[1]

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(x @ w + b, NOISE), obs=y)

    def guide(x, y):
        p0 = init_params(d)
        lw = numpyro.param("loc_w", p0["loc_w"])
        sw = numpyro.param("log_scale_w", p0["log_scale_w"])
        lb = numpyro.param("loc_b", p0["loc_b"])
        sb = numpyro.param("log_scale_b", p0["log_scale_b"])
        numpyro.sample("w", dist.Normal(lw, jnp.exp(sw)).to_event(1))
        numpyro.sample("b", dist.Normal(lb, jnp.exp(sb)))

    svi = SVI(model, guide, lr, Trace_ELBO(num_particles=samples, vectorize_particles=True))

    @jax.jit
    def run(key):  # the same shape of loop as pplalign.vi.fit: one compiled scan of updates
        state = svi.init(key, x, y)
        state, _ = jax.lax.scan(lambda st, _: svi.update(st, x, y), state, None, length=steps)
        return svi.get_params(state)

    names = ("loc_w", "log_scale_w", "loc_b", "log_scale_b")
    return _timed_runs(lambda k: {n: v for n, v in run(k).items() if n in names}, key)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/vi_peer_numpyro")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    steps, samples, m = (1500, 4, 10000) if args.quick else (5000, 8, 200000)
    global SEEDS
    SEEDS = 3 if args.quick else 10
    x, y = make_data(jax.random.key(0), 50, 3)
    # the same optimiser for both: Adam with a decaying step, so both runs settle at the optimum
    lr = optax.adam(optax.exponential_decay(0.05, steps, 0.02))
    p_g, t_g = fit_genjax(jax.random.key(1), x, y, steps, samples, lr)
    p_n, t_n = fit_numpyro(jax.random.key(1), x, y, steps, samples, lr)
    e_g = np.array([score_elbo(jax.random.key(2), p, x, y, m)[0] for p in p_g])
    e_n = np.array([score_elbo(jax.random.key(2), p, x, y, m)[0] for p in p_n])
    # Monte Carlo error of the comparison: the spread of the fitted ELBO over fitting seeds (SGD noise), plus
    # the scoring error (common random numbers: the same draws score every fit)
    se = math.sqrt(e_g.var(ddof=1) / SEEDS + e_n.var(ddof=1) / SEEDS + score_elbo(jax.random.key(3), p_g[0], x, y, m)[1] ** 2)
    result = {
        "elbo_genjax": float(e_g.mean()),
        "elbo_numpyro": float(e_n.mean()),
        "elbo_se": se,
        "elbo_gap": float(e_g.mean() - e_n.mean()),
        "within_mc_error": bool(abs(e_g.mean() - e_n.mean()) <= 3 * se),
        "fit_seeds": SEEDS,
        "log_evidence": log_evidence(x, y),
        "elbo_mean_field_optimum": mean_field_optimum(x, y),
        "time_genjax_s_per_fit": t_g,
        "time_numpyro_s_per_fit": t_n,
        "time_ratio_genjax_over_numpyro": t_g / t_n,
        "steps": steps,
        "samples_per_step": samples,
        "score_draws": m,
        "max_param_diff_seed0": float(max(jnp.max(jnp.abs(p_g[0][k] - p_n[0][k])) for k in p_g[0])),
    }
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
