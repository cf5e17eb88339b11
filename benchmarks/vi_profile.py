"""Profile of one VI fit step: genjax/ADEV through ``pplalign.vi.fit`` against numpyro SVI (issue 15).

The model, guide, optimiser and sizes are those of ``experiments.vi_peer_numpyro``. Three programs are traced:

* ``before`` — the fit as it was: the model's independent Normals written as genjax ``multivariate_normal``
  with a diagonal covariance (a Cholesky factorisation and triangular solves per draw), and the guarded scan
  that checks every step and selects every parameter and moment (``pplalign.vi.fit._run_chunk``);
* ``after`` — the model with :data:`pplalign.vi.adev.independent_normal` and the unguarded scan that
  ``fit`` runs now (``_run_chunk_fast``; the guarded one runs only on a chunk that fails its check);
* ``numpyro`` — ``svi.update`` in a ``lax.scan``, its losses stacked as ``fit`` stacks them.

For each it prints the ``jax.make_jaxpr`` equation count of one step (nested jaxprs flattened), the compiled
HLO instruction count of the whole scanned fit, the linear-algebra ops in the step, the per-step time
(median of alternated repeats of the whole compiled loop, compile excluded: ``benchmarks._timing``), and for
the public ``fit`` call the fixed cost of one call and its dispatches and host transfers.

    python -m benchmarks.vi_profile [--steps 1500] [--samples 4] [--repeats 9]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import json
import pstats
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jex_core

from benchmarks._timing import interleaved_medians
from experiments import vi_peer_numpyro as peer

# ``pplalign.vi.fit`` the attribute is the function; the module (with its compiled chunks) is imported by name
fit_module = importlib.import_module("pplalign.vi.fit")


def _sub_jaxprs(params):
    for v in params.values():
        for u in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(u, jex_core.ClosedJaxpr):
                yield u.jaxpr
            elif isinstance(u, jex_core.Jaxpr):
                yield u


def primitive_counts(jaxpr, counts=None) -> collections.Counter:
    """Primitive -> number of equations, nested jaxprs (jit, custom_jvp, scan bodies) flattened."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        subs = list(_sub_jaxprs(eqn.params))
        for sub in subs:
            primitive_counts(sub, counts)
        if not subs:
            counts[eqn.primitive.name] += 1
    return counts


def hlo_instruction_count(fn, *args) -> int:
    """Instructions in the optimised HLO module XLA compiles for ``fn(*args)``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"^\s*(?:ROOT )?%?[\w.\-]+ = ", text, re.M))


def legacy_objective(x, y, samples):
    """The objective as the experiment wrote it before: dense-covariance multivariate normals in the model."""
    from genjax import gen, multivariate_normal, normal
    from genjax.adev import multivariate_normal_diag_reparam, normal_reparam

    from pplalign.vi.adev import as_objective, elbo

    @gen
    def model(x):
        w = multivariate_normal(jnp.zeros(x.shape[1]), jnp.eye(x.shape[1])) @ "w"
        b = normal(0.0, 1.0) @ "b"
        multivariate_normal(x @ w + b, peer.NOISE**2 * jnp.eye(x.shape[0])) @ "y"

    @gen
    def guide(p):
        multivariate_normal_diag_reparam(p["loc_w"], jnp.exp(p["log_scale_w"])) @ "w"
        normal_reparam(p["loc_b"], jnp.exp(p["log_scale_b"])) @ "b"

    return as_objective(elbo(model, guide, {"y": y}, (x,)), num_samples=samples)


def programs(x, y, steps, samples, optimizer):
    """name -> (one-step function, its example arguments, whole compiled loop key -> outputs)."""
    p0 = peer.init_params(x.shape[1])
    s0 = optimizer.init(p0)
    idx = jnp.arange(steps, dtype=jnp.int32)
    out = {}

    legacy = legacy_objective(x, y, samples)
    names = ("adev_elbo",)
    carry = (p0, s0, jnp.asarray(-1, jnp.int32), jnp.asarray(-1, jnp.int32))
    out["before"] = (
        lambda key, c, i: fit_module._one_step(legacy, optimizer, names, key, c, i),
        (jax.random.key(0), carry, jnp.int32(0)),
        jax.jit(lambda key: fit_module._run_chunk(legacy, optimizer, names, key, p0, s0, idx)),
    )

    objective = peer.genjax_objective(x, y, samples)

    def after_step(key, c, i):
        p, s = c
        (loss, terms), g = jax.value_and_grad(objective, has_aux=True)(p, jax.random.fold_in(key, i))
        updates, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, updates), s), (loss, terms)

    out["after"] = (
        after_step,
        (jax.random.key(0), (p0, s0), jnp.int32(0)),
        jax.jit(lambda key: fit_module._run_chunk_fast(objective, optimizer, key, p0, s0, idx)),
    )

    svi = peer.numpyro_svi(x, y, samples, optimizer)
    state = svi.init(jax.random.key(0), x, y)

    @jax.jit
    def numpyro_loop(key):
        st = svi.init(key, x, y)
        return jax.lax.scan(lambda st, _: svi.update(st, x, y), st, None, length=steps)

    out["numpyro"] = (lambda st: svi.update(st, x, y), (state,), numpyro_loop)
    return out


def fit_call_cost(x, y, samples, optimizer, calls=30):
    """Fixed cost of one public ``fit`` call (two steps, compiled) against numpyro's jitted loop, and what
    one ``fit`` call dispatches: compiled executions, eager primitives, host transfers."""
    runs = peer.fitters(x, y, 2, samples, optimizer)
    cost = {}
    for name, run in runs.items():
        jax.block_until_ready(run(jax.random.key(0)))
        ts = []
        for i in range(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(run(jax.random.key(i)))
            ts.append(time.perf_counter() - t0)
        cost[f"fixed_ms_per_call_{name}"] = 1e3 * statistics.median(ts)
    compiled = collections.Counter()
    originals = {n: getattr(fit_module, n) for n in ("_run_chunk_fast", "_run_chunk", "_init_state")}

    def counting(name, fn):
        def wrapper(*a):
            compiled[name] += 1
            return fn(*a)

        return wrapper

    prof = cProfile.Profile()
    try:  # fit looks its compiled pieces up in its module at call time, so counting wrappers see every call
        for n, fn in originals.items():
            setattr(fit_module, n, counting(n, fn))
        prof.enable()
        jax.block_until_ready(runs["genjax"](jax.random.key(1)))
        prof.disable()
    finally:
        for n, fn in originals.items():
            setattr(fit_module, n, fn)
    stats = pstats.Stats(prof).stats
    calls_of = lambda fname: sum(v[1] for (_, _, fn), v in stats.items() if fn == fname)
    cost["fit_eager_primitive_dispatches"] = calls_of("apply_primitive")
    cost["fit_host_transfers"] = calls_of("device_get") + calls_of("__bool__") + calls_of("__float__")
    cost["fit_compiled_calls"] = dict(compiled)
    return cost


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    x, y = peer.make_data(jax.random.key(0), 50, 3)
    optimizer = optax.adam(optax.exponential_decay(0.05, args.steps, 0.02))
    progs = programs(x, y, args.steps, args.samples, optimizer)
    result = {"steps": args.steps, "samples": args.samples}
    for name, (step, step_args, _) in progs.items():
        counts = primitive_counts(jax.make_jaxpr(step)(*step_args).jaxpr)
        result[f"jaxpr_eqns_step_{name}"] = sum(counts.values())
        result[f"linalg_ops_step_{name}"] = sum(counts[p] for p in ("cholesky", "triangular_solve"))
        result[f"select_ops_step_{name}"] = counts["select_n"]
        result[f"hlo_instructions_step_{name}"] = hlo_instruction_count(step, *step_args)
        print(name, "step primitives:", dict(sorted(counts.items())))
    loops = {name: loop for name, (_, _, loop) in progs.items()}
    keys = jax.random.split(jax.random.key(7), args.repeats + 1)
    times = interleaved_medians(loops, lambda r: (keys[r],), repeats=args.repeats)
    for name, t in times.items():
        result[f"us_per_step_{name}"] = 1e6 * t / args.steps
    result.update(fit_call_cost(x, y, args.samples, optimizer))
    result["step_time_ratio_before"] = times["before"] / times["numpyro"]
    result["step_time_ratio_after"] = times["after"] / times["numpyro"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
