"""Tempered SMC against blackjax (and importance sampling as the floor) on several static targets, in one run.

Targets (``benchmarks._tempered_targets``): the conjugate Gaussian at D = 5 and 20 and the banana (twisted
Gaussian) at D = 10, all with exact log Z, and Bayesian logistic regression on the breast-cancer data (D = 31)
with a reference log Z. Each is a prior p(z) and a likelihood p(y | z); every method estimates log Z = log p(y)
on the path π_λ ∝ p(z) p(y | z)^λ.

Methods, all with the same N particles, ESS target, HMC kernel family, number of moves per stage and leapfrog
steps per move, systematic resampling:

  * ours        — ``pplalign.tempered.run_tempered`` on ``tilt(prior model, log p(y | ·), β = 1)``, adaptive
                  λ schedule; its HMC step is per-coordinate, h = c · (weighted particle sd), c adapted
                  between stages towards acceptance 0.65 (extra ``run_tempered`` options: ``--ours KEY=VALUE``).
  * ours_fixed  — the same at a fixed schedule: the λ's of one adaptive pilot run (another key), then fresh
                  keys. Ẑ is then exactly unbiased (Del Moral et al. 2006), so its mean log Ẑ error is the
                  Jensen gap −Var(log Ẑ)/2 + …, and our mean error is reported with its standard error.
  * blackjax    — ``blackjax.adaptive_tempered_smc`` with ``blackjax.hmc``, tuned between stages from the
                  population as ``blackjax.inner_kernel_tuning`` does (its loop written out): the inverse mass matrix
                  set to the particles' variances (``smc.tuning.from_particles``; equivalent to our
                  per-coordinate sd scaling) and one step size per particle updated from its acceptance rate
                  towards 0.65 (``smc.tuning.from_kernel_info.update_scale_from_acceptance_rate``), both
                  started where ours start (prior variances, step D^{-1/4}). log Ẑ is the sum of its
                  ``log_likelihood_increment``; the loop is a compiled ``lax.while_loop``.
  * numpyro_is  — importance sampling from the prior with numpyro: ``Predictive`` draws z, ``log_likelihood``
                  scores y; log Ẑ = log mean p(y | z_i).
  * genjax_is   — ``genjax.init`` (importance sampling from the prior), on the Gaussian targets only (the model
                  written in genjax, y an observed site).

Each method is compiled once (the first call, not timed), then run ``--repeats`` times with fresh keys, the
methods in alternation so that the load of a shared machine hits them alike. For each
target and method we report the mean log Ẑ − log Z with its standard error (sd/√R), the RMSE, the median
seconds per run and the stages, and for each peer

    accuracy_per_second_ratio = (RMSE_peer² · t_peer) / (RMSE_ours² · t_ours)

(> 1: ours reaches a given accuracy in less time, as the variance of log Ẑ falls like 1/N and time grows
like N), with a ~95% interval from the delta-method errors of the two RMSE² (at R = 10 repeats it spans
about a factor 3 either way: use ``--repeats`` ≥ 30 to resolve a ratio near 1). For the logistic target the RMSE is against the reference value, whose own standard error
(``LOGISTIC_LOG_Z_SE``) is printed with it. ``accuracy_per_evaluation_ratio`` is the same with the mean
number of per-particle density evaluations (with or without gradient) in place of the time — a cost that load
on a shared machine cannot blur; blackjax's count per stage and particle is moves × leapfrog + 3 (the ESS
solver's ℓ, the HMC init's density and gradient, the new weights' ℓ), ours is ``Particles.nfe``.
Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._tempered_targets import Target, make_target
from benchmarks._threads import pin_xla_cpu_threads
from benchmarks._timing import interleaved_medians

DEFAULT_TARGETS = ("gauss5", "gauss20", "logistic", "banana10")
QUICK_TARGETS = ("gauss2",)
HMC_ACCEPTANCE = 0.65  # the acceptance both samplers' step sizes are steered to


def _time_methods(methods: dict, keys: list) -> tuple[dict, dict]:
    """log Ẑ of every run and the median seconds per run of each method, the methods timed in alternation
    (``_timing.interleaved_medians``: compile first, then run r of every method before run r + 1), so that
    the load of a shared machine hits them alike. keys[0] is the compile call's, whose value is dropped."""
    values = {name: [] for name in methods}

    def recording(name, fn):
        def run(key):
            out = jax.block_until_ready(fn(key))
            values[name].append(float(out))
            return out

        return run

    times = interleaved_medians({n: recording(n, f) for n, f in methods.items()}, lambda r: (keys[r],),
                                repeats=len(keys) - 1)
    return {name: np.asarray(v[1:]) for name, v in values.items()}, times


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--ours takes KEY=VALUE; got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string, e.g. mcmc=mala


# --- ours ---------------------------------------------------------------------------------------------------


def ours_methods(target: Target, args, stages: dict) -> dict:
    """``ours`` (adaptive λ) and ``ours_fixed`` (the λ's of one adaptive pilot run, then fixed)."""
    import pplalign
    from pplalign.tempered import run_tempered

    tilted = pplalign.tilt(target.prior_model, target.log_likelihood, 1.0)
    # --ours KEY=VALUE may also override a matched setting (e.g. ess_target), which the JSON then records
    options = dict(
        mcmc="hmc", num_mcmc_steps=args.mcmc_steps, num_leapfrog=args.leapfrog, ess_target=args.ess_target,
        max_stages=args.max_stages,
    ) | dict(args.ours)

    @jax.jit
    def adaptive(key):
        p, info = run_tempered(key, tilted, args.particles, **options)
        return p.log_Z, info.num_stages, p.nfe, info.lambdas

    schedule = adaptive(jax.random.key(10_000))[3]  # the pilot, on a key no timed run uses

    @jax.jit
    def fixed(key):
        p, info = run_tempered(key, tilted, args.particles, schedule=schedule, **options)
        return p.log_Z, info.num_stages, p.nfe

    def timed(name, fn):
        def run(key):
            out = fn(key)
            stages.setdefault(name, []).append((int(out[1]), int(out[2])))
            return out[0]

        return run

    return {"ours": timed("ours", adaptive), "ours_fixed": timed("ours_fixed", fixed)}


# --- blackjax -----------------------------------------------------------------------------------------------


def blackjax_method(blackjax, target: Target, args, stages: dict):
    """blackjax's adaptive tempered SMC with HMC, tuned between stages from the population.

    This is the loop of ``blackjax.inner_kernel_tuning`` written out, because its ``mcmc_parameter_update_fn``
    sees the new SMC state but not the previous parameters, which an acceptance-driven step update needs:
    each stage builds ``adaptive_tempered_smc`` with the current parameters, steps it, then sets the inverse
    mass matrix to the particles' variances and scales each particle's step size by its acceptance rate with
    blackjax's ``update_scale_from_acceptance_rate``."""
    from blackjax.smc.tuning.from_kernel_info import update_scale_from_acceptance_rate

    n, d = args.particles, target.dim
    kernel = blackjax.hmc.build_kernel()

    def smc_with(step_size, inverse_mass):
        # leading axis N: one value per particle; leading axis 1: shared by all particles
        params = dict(step_size=step_size, inverse_mass_matrix=inverse_mass[None],
                      num_integration_steps=jnp.full((1,), args.leapfrog))
        return blackjax.adaptive_tempered_smc(
            target.log_prior, target.log_likelihood, kernel, blackjax.hmc.init, params,
            blackjax.smc.resampling.systematic, args.ess_target, num_mcmc_steps=args.mcmc_steps,
        )

    @jax.jit
    def bj(key):
        k0, k1 = jax.random.split(key)
        z0 = target.sample_prior(k0, n)
        step0, inv_mass0 = jnp.full((n,), d**-0.25), jnp.var(z0, axis=0)
        carry = (smc_with(step0, inv_mass0).init(z0), step0, inv_mass0, jnp.zeros(()), jnp.zeros((), jnp.int32))

        def cond(c):
            return (c[0].tempering_param < 1.0) & (c[4] < args.max_stages)

        def body(c):
            state, step, inv_mass, log_Z, i = c
            state, info = smc_with(step, inv_mass).step(jax.random.fold_in(k1, i), state)
            # update_info.acceptance_rate is [N, num_mcmc_steps]; particles were resampled before the moves,
            # so row i is the chain that now holds particle i
            acc = jnp.mean(info.update_info.acceptance_rate, axis=-1)
            step = update_scale_from_acceptance_rate(step, acc, HMC_ACCEPTANCE)
            return state, step, jnp.var(state.particles, axis=0), log_Z + info.log_likelihood_increment, i + 1

        c = jax.lax.while_loop(cond, body, carry)
        return c[3], c[4]

    def run(key):
        lz, steps = bj(key)
        # density evaluations (with or without gradient) per stage and particle: ℓ for the ESS solver, the
        # HMC init (log density and gradient), moves × leapfrog, ℓ for the new weights
        stages.setdefault("blackjax", []).append((int(steps), int(steps) * n * (args.mcmc_steps * args.leapfrog + 3)))
        return lz

    return run


# --- importance sampling floors -----------------------------------------------------------------------------


def numpyro_is_method(target: Target, n: int):
    from numpyro.infer import Predictive
    from numpyro.infer.util import log_likelihood

    @jax.jit
    def run(key):
        draws = Predictive(target.numpyro_model, num_samples=n, return_sites=["z"])(key)
        ll = log_likelihood(target.numpyro_model, draws)["y"]
        return jax.nn.logsumexp(ll) - math.log(n)

    return run


def genjax_gaussian_method(genjax, target: Target, n: int):
    """genjax importance sampling from the prior on the conjugate Gaussian, y an observed site."""
    from benchmarks._tempered_targets import MU0, S0, TAU

    d = target.dim

    @genjax.gen
    def g_model():
        # Multivariate sites: genjax keeps per-element weights of vector-valued scalar distributions.
        z = genjax.multivariate_normal(MU0 * jnp.ones(d), S0**2 * jnp.eye(d)) @ "z"
        genjax.multivariate_normal(z, TAU**2 * jnp.eye(d)) @ "y"
        return z

    @jax.jit
    def run(key):
        pc = genjax.seed(lambda: genjax.init(g_model, (), genjax.const(n), {"y": target.data}))(key)
        return pc.log_marginal_likelihood()

    return run


# --- the run ------------------------------------------------------------------------------------------------


def _summarise(lz: np.ndarray, log_Z: float, t: float, counts) -> dict:
    """Errors of log Ẑ, the median time, and the mean stages and density evaluations over the runs."""
    err = lz - log_Z
    sd = float(err.std(ddof=1)) if len(err) > 1 else 0.0
    return dict(
        log_Z_err_mean=float(err.mean()),
        log_Z_err_se=sd / math.sqrt(len(err)),
        log_Z_err_sd=sd,
        log_Z_rmse=float(np.sqrt(np.mean(err**2))),
        # se of log(RMSE²) by the delta method, sd(e²)/(√R·mean(e²)): the ratio's error bar comes from these
        log_mse_se=float(np.std(err**2, ddof=1) / (math.sqrt(len(err)) * max(np.mean(err**2), 1e-30))),
        time_s=t,
        stages=None if counts[0][0] is None else float(np.mean([c[0] for c in counts])),
        evaluations=float(np.mean([c[1] for c in counts])),
    )


def run_target(target: Target, args, peers) -> dict:
    stages = {}
    methods = ours_methods(target, args, stages)
    if peers.get("blackjax") is not None:
        methods["blackjax"] = blackjax_method(peers["blackjax"], target, args, stages)
    methods["numpyro_is"] = numpyro_is_method(target, args.particles)
    if peers.get("genjax") is not None and target.name.startswith("gauss"):
        methods["genjax_is"] = genjax_gaussian_method(peers["genjax"], target, args.particles)
    keys = list(jax.random.split(jax.random.key(args.seed), args.repeats + 1))
    log_zs, times = _time_methods(methods, keys)
    is_counts = [(None, args.particles)]  # importance sampling: one evaluation per particle, no stages
    results = {name: _summarise(log_zs[name], target.log_Z, times[name], stages.get(name, is_counts)) for name in methods}
    ours = results["ours"]
    for name, r in results.items():
        if name != "ours":
            ratio = (r["log_Z_rmse"] ** 2 * r["time_s"]) / max(ours["log_Z_rmse"] ** 2 * ours["time_s"], 1e-30)
            # ~95% interval from the two RMSE² estimates' errors (times, medians of R runs, vary far less)
            half = 2.0 * math.hypot(r["log_mse_se"], ours["log_mse_se"])
            r["accuracy_per_second_ratio"] = ratio
            r["accuracy_per_second_ratio_ci95"] = [ratio * math.exp(-half), ratio * math.exp(half)]
            # the same with the density evaluations for the time: what a machine under load cannot blur
            r["accuracy_per_evaluation_ratio"] = (r["log_Z_rmse"] ** 2 * r["evaluations"]) / max(
                ours["log_Z_rmse"] ** 2 * ours["evaluations"], 1e-30)
    return dict(dim=target.dim, log_Z=target.log_Z, log_Z_ref_se=target.log_Z_se, methods=results)


def print_table(per_target: dict) -> None:
    head = (f"{'target':10s} {'method':11s} {'mean err ± se':>18s} {'RMSE':>8s} {'ms/run':>9s} {'stages':>6s} "
            f"{'evals':>8s} {'acc/s ratio [~95%]':>22s} {'acc/eval':>8s}")
    print(head)
    print("-" * len(head))
    for tname, res in per_target.items():
        for name, r in res["methods"].items():
            stages = "-" if r["stages"] is None else f"{r['stages']:.1f}"
            ratio = ""
            if "accuracy_per_second_ratio" in r:
                lo, hi = r["accuracy_per_second_ratio_ci95"]
                ratio = f"{r['accuracy_per_second_ratio']:.2f} [{lo:.2f}, {hi:.2f}]"
            per_eval = f"{r['accuracy_per_evaluation_ratio']:8.2f}" if "accuracy_per_evaluation_ratio" in r else ""
            print(f"{tname:10s} {name:11s} {r['log_Z_err_mean']:+9.4f} ± {r['log_Z_err_se']:6.4f} "
                  f"{r['log_Z_rmse']:8.4f} {r['time_s'] * 1e3:9.1f} {stages:>6s} {r['evaluations']:8.0f} "
                  f"{ratio:>22s} {per_eval}")
        if res["log_Z_ref_se"]:
            print(f"{'':10s} (log Z = {res['log_Z']:.4f} is a reference value, ± {res['log_Z_ref_se']:.4f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", help=f"gauss<D>, banana<D>, logistic (default: {' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--dim", type=int, nargs="+", help="replace the gauss<D> targets by these dimensions")
    parser.add_argument("--particles", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mcmc-steps", type=int, default=2)
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--ess-target", type=float, default=0.5)
    parser.add_argument("--max-stages", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="extra keyword for pplalign.tempered.run_tempered (JSON value), repeatable")
    parser.add_argument("--threads", type=int, default=1, help="XLA CPU threads (0: XLA's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    args = parser.parse_args(argv)
    pin_xla_cpu_threads(args.threads)
    if args.quick:
        args.particles, args.repeats, args.max_stages = 64, 3, 20
    args.targets = list(args.targets or (QUICK_TARGETS if args.quick else DEFAULT_TARGETS))
    if args.dim:
        args.targets = [t for t in args.targets if not t.startswith("gauss")] + [f"gauss{d}" for d in args.dim]
    if args.repeats < 2:
        raise ValueError(f"--repeats must be >= 2 (a standard error needs two runs); got {args.repeats}")

    peers = {}
    for name in ("blackjax", "genjax"):
        try:  # a bare GPU image may lack them: report the others
            peers[name] = __import__(name)
        except ImportError:
            peers[name] = None

    per_target = {name: run_target(make_target(name), args, peers) for name in args.targets}
    print_table(per_target)
    summary = dict(
        benchmark="peer_tempered",
        particles=args.particles,
        repeats=args.repeats,
        mcmc_steps=args.mcmc_steps,
        leapfrog=args.leapfrog,
        ess_target=args.ess_target,
        ours_options=dict(args.ours),
        backend=jax.default_backend(),
        accuracy_per_second_ratio={
            t: r["methods"]["blackjax"]["accuracy_per_second_ratio"] for t, r in per_target.items()
            if "blackjax" in r["methods"]
        },
        accuracy_per_evaluation_ratio={
            t: r["methods"]["blackjax"]["accuracy_per_evaluation_ratio"] for t, r in per_target.items()
            if "blackjax" in r["methods"]
        },
        targets=per_target,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
