"""Reward-tempered SMC against peers on one shared target, measured in one run.

Target: the conjugate Gaussian in D dimensions, z ~ N(μ0, s0² I), reward r(z) = −|z − y|²/(2τ²), β = 1, with

    log Z = Σ_d [ ½ log(2πτ²) + log N(y_d; μ0, s0² + τ²) ]     (closed form).

Compared, all with N particles:
  * ours     — ``pplalign.tempered_smc`` on ``tilt(numpyro_model, r, 1)``, HMC moves (adaptive steps).
  * blackjax — ``blackjax.adaptive_tempered_smc`` with the same ESS target, the same number of HMC moves and
               leapfrog steps, a fixed step size (blackjax does not adapt it) of 0.5·posterior sd; log Ẑ is the
               sum of its ``log_likelihood_increment``; the loop is a compiled ``lax.while_loop``.
  * genjax   — ``genjax.init`` (importance sampling from the prior) on the same model written with the reward
               as an observed Gaussian site y ~ N(z, τ²); its log Ẑ estimates log p(y) = log Z − D·½log(2πτ²),
               which we shift back.

Each method is compiled once, then run ``--repeats`` times with fresh keys; we report the mean and sd of
log Ẑ − log Z, the median time per run, and the ratios (peer / ours) of time and of RMSE of log Ẑ.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

MU0, S0, TAU = 0.5, 1.5, 0.5


def _time_runs(fn, keys):
    jax.block_until_ready(fn(keys[0]))  # compile
    out, times = [], []
    for k in keys[1:]:
        start = time.perf_counter()
        value = jax.block_until_ready(fn(k))
        times.append(time.perf_counter() - start)
        out.append(float(value))
    return np.asarray(out), statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--particles", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--ess-target", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.particles, args.repeats = 2, 64, 2

    try:
        import blackjax
    except ImportError:  # a bare GPU image may lack it: report the others
        blackjax = None
    try:
        import genjax
    except ImportError:
        genjax = None
    import numpyro
    import numpyro.distributions as dist

    import pplalign
    from pplalign.tempered import run_tempered

    d, n = args.dim, args.particles
    y = jnp.linspace(-1.0, 2.0, d)
    log_Z = float(jnp.sum(0.5 * jnp.log(2 * jnp.pi * TAU**2) + dist.Normal(MU0, math.sqrt(S0**2 + TAU**2)).log_prob(y)))
    post_sd = math.sqrt(1.0 / (1.0 / S0**2 + 1.0 / TAU**2))
    reward = lambda z: -0.5 * jnp.sum((z - y) ** 2) / TAU**2

    # --- ours -------------------------------------------------------------------------------------
    def model():
        return numpyro.sample("z", dist.Normal(MU0 * jnp.ones(d), S0).to_event(1))

    target = pplalign.tilt(model, reward, 1.0)
    stages = {}

    # The compiled body of tempered_smc (the public call adds input checks, a few ms of Python per call).
    @jax.jit
    def ours_jit(key):
        p, info = run_tempered(
            key, target, n, mcmc="hmc", num_mcmc_steps=args.mcmc_steps, num_leapfrog=args.leapfrog,
            ess_target=args.ess_target, max_stages=100,
        )
        return p.log_Z, info.num_stages

    def ours(key):
        lz, steps = ours_jit(key)
        stages["ours"] = int(steps)
        return lz

    # --- blackjax ---------------------------------------------------------------------------------
    methods = {"ours": ours}
    if blackjax is not None:
        methods["blackjax"] = _blackjax_method(blackjax, d, n, args, post_sd, reward, stages)
    if genjax is not None:
        methods["genjax_is"] = _genjax_method(genjax, d, n, y)

    keys = list(jax.random.split(jax.random.key(0), args.repeats + 1))
    results = {}
    for name, fn in methods.items():
        lz, t = _time_runs(fn, keys)
        err = lz - log_Z
        results[name] = dict(
            log_Z_err_mean=float(err.mean()),
            log_Z_err_sd=float(err.std(ddof=1)) if len(err) > 1 else 0.0,
            log_Z_rmse=float(np.sqrt(np.mean(err**2))),
            time_s=t,
            stages=stages.get(name),
        )
    ours_r = results["ours"]
    ratios = {}
    for peer in ("blackjax", "genjax_is"):
        if peer in results:
            ratios[f"time_ratio_{peer}_over_ours"] = results[peer]["time_s"] / ours_r["time_s"]
            ratios[f"rmse_ratio_{peer}_over_ours"] = results[peer]["log_Z_rmse"] / max(ours_r["log_Z_rmse"], 1e-12)
    summary = dict(
        benchmark="peer_tempered",
        dim=d,
        particles=n,
        repeats=args.repeats,
        backend=jax.default_backend(),
        log_Z=log_Z,
        **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
        **ratios,
    )
    for name, r in results.items():
        print(f"{name:10s} log Ẑ − log Z = {r['log_Z_err_mean']:+.4f} ± {r['log_Z_err_sd']:.4f}  "
              f"time {r['time_s'] * 1e3:8.1f} ms  stages {r['stages']}")
    print(json.dumps(summary))
    return summary


def _blackjax_method(blackjax, d, n, args, post_sd, reward, stages):
    logprior = lambda z: jnp.sum(jax.scipy.stats.norm.logpdf(z, MU0, S0))
    params = blackjax.smc.extend_params(
        dict(step_size=0.5 * post_sd, inverse_mass_matrix=jnp.ones(d), num_integration_steps=args.leapfrog)
    )
    smc = blackjax.adaptive_tempered_smc(
        logprior, reward, blackjax.hmc.build_kernel(), blackjax.hmc.init, params,
        blackjax.smc.resampling.systematic, args.ess_target, num_mcmc_steps=args.mcmc_steps,
    )

    @jax.jit
    def bj(key):
        k0, k1 = jax.random.split(key)
        state = smc.init(MU0 + S0 * jax.random.normal(k0, (n, d)))

        def cond(c):
            return c[0].tempering_param < 1.0

        def body(c):
            state, log_Z, i = c
            state, info = smc.step(jax.random.fold_in(k1, i), state)
            return state, log_Z + info.log_likelihood_increment, i + 1

        _, lz, steps = jax.lax.while_loop(cond, body, (state, jnp.zeros(()), jnp.zeros((), jnp.int32)))
        return lz, steps

    def blackjax_run(key):
        lz, steps = bj(key)
        stages["blackjax"] = int(steps)
        return lz

    return blackjax_run


def _genjax_method(genjax, d, n, y):
    """genjax importance sampling from the prior on the model with the reward as an observed site."""

    @genjax.gen
    def g_model():
        # Multivariate sites: genjax keeps per-element weights of vector-valued scalar distributions.
        z = genjax.multivariate_normal(MU0 * jnp.ones(d), S0**2 * jnp.eye(d)) @ "z"
        genjax.multivariate_normal(z, TAU**2 * jnp.eye(d)) @ "y"
        return z

    shift = d * 0.5 * math.log(2 * math.pi * TAU**2)

    @jax.jit
    def gj(key):
        pc = genjax.seed(lambda: genjax.init(g_model, (), genjax.const(n), {"y": y}))(key)
        return pc.log_marginal_likelihood() + shift

    return gj


if __name__ == "__main__":
    main()
