"""Stage-by-stage comparison of our adaptive tempering schedule with blackjax's on one target.

For each stage k of one run (same target, N, ESS target, HMC family, moves and leapfrog steps as
``benchmarks.peer_tempered``) we print

  * λ_k and the increment δ_k = λ_k − λ_{k−1};
  * ``ess_applied``: the ESS of the incremental weights e^{δ_k ℓ(z_i)} *on the particles they are applied to*,
    as a fraction of N. This is what an "adaptive rule aimed at the ESS target" should hold at the target;
  * ``ess_solved``: the ESS the rule solved for, on the particles it looked at (for ours they are the same
    particles; blackjax solves on the particles *before* its resample-and-move, i.e. a cloud of π_{λ_{k−2}},
    and applies δ_k to the moved cloud of π_{λ_{k−1}}, where ℓ is more concentrated: its applied ESS is
    higher than the target and its steps are shorter);
  * the mean acceptance rate of the stage's moves, and their number per particle.

Then, over ``--repeats`` seeds: stages and log Ẑ − log Z (mean ± se, RMSE) of each sampler, so that a change
to the rule can be read off as schedule *and* accuracy. The last line is one JSON object.

    python -m benchmarks.tempered_schedule_compare [--target gauss5] [--particles 512] [--repeats 10]
        [--ours KEY=VALUE ...]   # extra run_tempered options, e.g. --ours ess_rule=\"lagged\"
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._tempered_targets import make_target
from benchmarks._threads import pin_xla_cpu_threads
from benchmarks.peer_tempered import HMC_ACCEPTANCE, _parse_option


def _ess_fraction(log_w) -> float:
    log_w = np.asarray(log_w, np.float64)
    log_w = log_w - log_w.max()
    w = np.exp(log_w)
    return float(w.sum() ** 2 / (w * w).sum() / len(w))


def ours_run(target, args):
    """One jitted run of ours returning log Ẑ and the per-stage record."""
    import pplalign
    from pplalign.tempered import run_tempered

    tilted = pplalign.tilt(target.prior_model, target.log_likelihood, 1.0)
    options = dict(mcmc="hmc", num_mcmc_steps=args.mcmc_steps, num_leapfrog=args.leapfrog,
                   ess_target=args.ess_target, max_stages=args.max_stages) | dict(args.ours)

    @jax.jit
    def run(key):
        p, info = run_tempered(key, tilted, args.particles, **options)
        return p.log_Z, p.ess, info

    def record(key):
        log_Z, ess, info = run(key)
        k = int(info.num_stages)
        lam = np.asarray(info.lambdas)[:k]
        ess = np.asarray(ess)[:k] / args.particles
        acc = np.asarray(info.acceptance)[:k]
        moves = np.asarray(info.num_moves)[:k]
        # ours solves on the cloud it reweights: applied = solved (p.ess is after reweighting, weights reset)
        rows = [dict(lam=float(lam[i]), delta=float(lam[i] - (lam[i - 1] if i else 0.0)), ess_applied=float(ess[i]),
                     ess_solved=float(ess[i]), acceptance=float(acc[i]), moves=int(moves[i])) for i in range(k)]
        return float(log_Z), rows

    return record


def blackjax_run(target, args):
    """blackjax's adaptive tempered SMC with the population tuning of ``peer_tempered``, stepped from Python
    so that each stage's pre-step cloud (what its solver sees) and post-step weights can be recorded."""
    import blackjax
    from blackjax.smc import adaptive_tempered
    from blackjax.smc.tuning.from_kernel_info import update_scale_from_acceptance_rate

    n, d = args.particles, target.dim
    loglik = jax.vmap(target.log_likelihood)
    # the kernel built once, its HMC parameters passed per stage (leading axis N: per particle, 1: shared)
    smc_kernel = adaptive_tempered.build_kernel(
        target.log_prior, target.log_likelihood, blackjax.hmc.build_kernel(), blackjax.hmc.init,
        blackjax.smc.resampling.systematic, args.ess_target,
    )

    @jax.jit
    def step(key, state, step_size, inv_mass):
        params = dict(step_size=step_size, inverse_mass_matrix=inv_mass[None],
                      num_integration_steps=jnp.full((1,), args.leapfrog))
        new, info = smc_kernel(key, state, args.mcmc_steps, params)
        return new, info.log_likelihood_increment, jnp.mean(info.update_info.acceptance_rate, axis=-1)

    def record(key):
        k0, k1 = jax.random.split(key)
        z0 = target.sample_prior(k0, n)
        step_size, inv_mass = jnp.full((n,), d**-0.25), jnp.var(z0, axis=0)
        state = adaptive_tempered.init(z0)
        log_Z, rows, lam_prev = 0.0, [], 0.0
        for i in range(args.max_stages):
            if float(state.tempering_param) >= 1.0:
                break
            pre = loglik(state.particles)
            state, inc, acc = step(jax.random.fold_in(k1, i), state, step_size, inv_mass)
            lam = float(state.tempering_param)
            delta = lam - lam_prev
            post = loglik(state.particles)
            rows.append(dict(lam=lam, delta=delta, ess_applied=_ess_fraction(delta * post),
                             ess_solved=_ess_fraction(delta * pre), acceptance=float(jnp.mean(acc)),
                             moves=args.mcmc_steps))
            step_size = update_scale_from_acceptance_rate(step_size, acc, HMC_ACCEPTANCE)
            inv_mass = jnp.var(state.particles, axis=0)
            log_Z += float(inc)
            lam_prev = lam
        return log_Z, rows

    return record


def print_stages(name: str, rows: list) -> None:
    print(f"{name}: {len(rows)} stages")
    print(f"  {'k':>2s} {'lambda':>9s} {'delta':>9s} {'ESS applied/N':>13s} {'ESS solved/N':>12s} {'accept':>7s} "
          f"{'moves':>5s}")
    for k, r in enumerate(rows):
        print(f"  {k:2d} {r['lam']:9.5f} {r['delta']:9.5f} {r['ess_applied']:13.3f} {r['ess_solved']:12.3f} "
              f"{r['acceptance']:7.3f} {r['moves']:5d}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="gauss5")
    # the settings peer_tempered matches between the samplers, with its defaults
    for flag, kind, default in (("--particles", int, 512), ("--repeats", int, 10), ("--mcmc-steps", int, 2),
                                ("--leapfrog", int, 5), ("--ess-target", float, 0.5), ("--max-stages", int, 100),
                                ("--seed", int, 0)):
        parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--ours", type=_parse_option, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-blackjax", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    pin_xla_cpu_threads(args.threads)
    target = make_target(args.target)
    samplers = {"ours": ours_run(target, args)}
    if not args.no_blackjax:
        samplers["blackjax"] = blackjax_run(target, args)
    keys = jax.random.split(jax.random.key(args.seed), args.repeats)
    summary = {}
    for name, run in samplers.items():
        errs, stages, moves = [], [], []
        for r, key in enumerate(keys):
            log_Z, rows = run(key)
            if r == 0:
                print_stages(name, rows)
            errs.append(log_Z - target.log_Z)
            stages.append(len(rows))
            moves.append(sum(row["moves"] for row in rows))  # moves per particle over the run: the cost
        errs = np.asarray(errs)
        summary[name] = dict(
            stages_mean=float(np.mean(stages)),
            moves_mean=float(np.mean(moves)),
            ess_applied_mean=float(np.mean([row["ess_applied"] for row in rows[:-1]] or [np.nan])),
            log_Z_err_mean=float(errs.mean()),
            log_Z_err_se=float(errs.std(ddof=1) / math.sqrt(len(errs))),
            log_Z_rmse=float(np.sqrt(np.mean(errs**2))),
        )
    print(f"\n{'sampler':9s} {'stages':>6s} {'moves':>6s} {'mean err ± se':>18s} {'RMSE':>7s}   (over {args.repeats} seeds)")
    for name, s in summary.items():
        print(f"{name:9s} {s['stages_mean']:6.1f} {s['moves_mean']:6.1f} {s['log_Z_err_mean']:+9.4f} ± {s['log_Z_err_se']:6.4f} "
              f"{s['log_Z_rmse']:7.4f}")
    print(json.dumps(dict(benchmark="tempered_schedule_compare", target=args.target, particles=args.particles,
                          ess_target=args.ess_target, ours_options=dict(args.ours), samplers=summary)))
    return summary


if __name__ == "__main__":
    main()
