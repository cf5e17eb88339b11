"""VI on a genjax program (ADEV, pplalign.vi.fit) against numpyro SVI + Trace_ELBO on the same model and family.

Model: Bayesian linear regression, w ~ N(0, I_d), b ~ N(0, 1), y_i ~ N(x_i·w + b, σ_y²), written in both
libraries as independent Normals (genjax: :data:`pplalign.vi.adev.independent_normal`; numpyro: ``to_event`` and
a ``plate``), so neither factorises a covariance.
Family: mean-field Gaussian, w ~ N(μ_w, diag s_w²), b ~ N(μ_b, s_b²), s = exp(log s), reparameterised.

The comparison is matched: the same optax optimiser object (Adam, decaying step), the same number of steps
and of reparameterised draws per step, the same initial parameters; both are one compiled ``lax.scan`` over
the steps returning the parameters and the loss history (ours through the public ``pplalign.vi.fit``, Python
overhead included; numpyro's ``init`` + ``update`` under one ``jit``). Time is the median over repeats, taken
alternately, after a compiling call (``benchmarks._timing.interleaved_medians``). Each fitted q is scored with
the *same* held-out ELBO estimate (M fresh draws, the same draws for every fit), and the gap is compared with
its Monte Carlo error. log p(y) (closed form) bounds both; the exact mean-field optimum is reported too.

    python -m experiments.vi_peer_numpyro [--quick] [--out DIR]

The last line printed is one JSON object; ``vi_time_ratio`` is our time over numpyro's.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._timing import interleaved_medians

NOISE = 0.5


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


def genjax_objective(x, y, samples):
    """The ELBO of the model and guide above as a genjax/ADEV objective for :func:`pplalign.vi.fit`."""
    from genjax import gen, normal
    from genjax.adev import multivariate_normal_diag_reparam, normal_reparam

    from pplalign.vi.adev import as_objective, elbo, independent_normal

    @gen
    def model(x):
        w = independent_normal(jnp.zeros(x.shape[1]), 1.0) @ "w"
        b = normal(0.0, 1.0) @ "b"
        independent_normal(x @ w + b, NOISE) @ "y"

    @gen
    def guide(p):
        multivariate_normal_diag_reparam(p["loc_w"], jnp.exp(p["log_scale_w"])) @ "w"
        normal_reparam(p["loc_b"], jnp.exp(p["log_scale_b"])) @ "b"

    return as_objective(elbo(model, guide, {"y": y}, (x,)), num_samples=samples)


def numpyro_svi(x, y, samples, optimizer):
    """numpyro's SVI with Trace_ELBO on the same model, guide and initial parameters."""
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

    return SVI(model, guide, optimizer, Trace_ELBO(num_particles=samples, vectorize_particles=True))


def fitters(x, y, steps, samples, optimizer):
    """``{"genjax": key -> params, "numpyro": key -> params}``: one whole fit each, the loss history kept."""
    from pplalign.vi import fit

    objective = genjax_objective(x, y, samples)
    p0 = init_params(x.shape[1])

    def run_genjax(key):
        return fit(objective, p0, key=key, num_steps=steps, optimizer=optimizer, chunk_size=steps, progress=False).params

    svi = numpyro_svi(x, y, samples, optimizer)

    @jax.jit
    def numpyro_loop(key):  # the shape of loop pplalign.vi.fit runs: one compiled scan, losses stacked
        state = svi.init(key, x, y)
        state, losses = jax.lax.scan(lambda st, _: svi.update(st, x, y), state, None, length=steps)
        return {n: v for n, v in svi.get_params(state).items() if n in p0}, losses

    return {"genjax": run_genjax, "numpyro": lambda key: numpyro_loop(key)[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/vi_peer_numpyro")
    ap.add_argument("--repeats", type=int, default=None, help="timed fits per library (median reported)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    steps, samples, m, seeds, repeats = (1500, 4, 10000, 3, 5) if args.quick else (5000, 8, 200000, 10, 11)
    repeats = args.repeats or repeats
    x, y = make_data(jax.random.key(0), 50, 3)
    # the same optimiser for both: Adam with a decaying step, so both runs settle at the optimum
    lr = optax.adam(optax.exponential_decay(0.05, steps, 0.02))
    runs = fitters(x, y, steps, samples, lr)
    fit_keys = jax.random.split(jax.random.key(1), seeds)
    fitted = {name: [jax.block_until_ready(run(k)) for k in fit_keys] for name, run in runs.items()}
    time_keys = jax.random.split(jax.random.key(4), repeats + 1)
    times = interleaved_medians(runs, lambda r: (time_keys[r],), repeats=repeats)
    # every fit is scored on the same held-out draws (key 2): the scoring noise is common to all of them
    scores = {name: [score_elbo(jax.random.key(2), p, x, y, m) for p in ps] for name, ps in fitted.items()}
    elbo = {name: np.array([e for e, _ in sc]) for name, sc in scores.items()}
    # standard error of each library's mean ELBO: the spread over fitting seeds (SGD noise) and the scoring error
    se = {name: math.sqrt(e.var(ddof=1) / seeds + scores[name][0][1] ** 2) for name, e in elbo.items()}
    # of the gap: the seed spreads add; the scoring draws are shared, so their error is counted once
    gap_se = math.sqrt(sum(e.var(ddof=1) / seeds for e in elbo.values()) + scores["genjax"][0][1] ** 2)
    gap = float(elbo["genjax"].mean() - elbo["numpyro"].mean())
    result = {
        "elbo_genjax": float(elbo["genjax"].mean()),
        "elbo_genjax_se": se["genjax"],
        "elbo_numpyro": float(elbo["numpyro"].mean()),
        "elbo_numpyro_se": se["numpyro"],
        "elbo_gap": gap,
        "elbo_se": gap_se,
        "within_mc_error": bool(abs(gap) <= 3 * gap_se),
        "fit_seeds": seeds,
        "log_evidence": log_evidence(x, y),
        "elbo_mean_field_optimum": mean_field_optimum(x, y),
        "time_genjax_s_per_fit": times["genjax"],
        "time_numpyro_s_per_fit": times["numpyro"],
        "timing_repeats": repeats,
        "steps": steps,
        "samples_per_step": samples,
        "score_draws": m,
        "max_param_diff_seed0": float(max(jnp.max(jnp.abs(fitted["genjax"][0][k] - fitted["numpyro"][0][k])) for k in fitted["genjax"][0])),
        "vi_time_ratio": times["genjax"] / times["numpyro"],
    }
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
