"""Issue 6, experiment (a): DTS against importance sampling and FK-SMC on the exact Gaussian-mixture diffusion.

Testbed (``models.gmm_diffusion.two_mode_problem``): an 8-component ring mixture (radius 6, std 0.5) under a
T-step VP diffusion, reward r(x) = −γ‖x − c‖² with c midway between components 0 and 1, β = 0.5: the tilted
target σ ∝ p_data·exp(r/β) has two modes of mass ½ each and log Z ≈ −7.6 (sharp: IS's weights are peaked).
Everything is exact: σ's samples, log Z, and the soft value log ψ_s(x) = log E[exp(r(x_0)/β) | x_s].

Methods, at equal NFE (transition evaluations):
  is            importance sampling from p₀ (best-of-N's distributional counterpart);
  fk_smc        pplalign.smc with the FK potential ψ_t = exp(r(E[x_0|x_t])/β) (reward of the denoised mean;
                the last potential is the reward itself, so the target stays exact);
  smc_oracle    pplalign.smc with the exact soft value as twist (bootstrap proposal);
  dts           DTS as published (Boltzmann selection on tree values, progressive widening);
  dts_uniform        consistent DTS whose growth never reads the values (uniform selection);
  dts_consistent_fk  the same guided by the FK potential (Boltzmann on r(E[x_0|x_c])/β);
  dts_twisted_fk     variant "twisted": Boltzmann on the FK potential plus Russian roulette on it (unbiased);
  dts_twisted_oracle the same with the exact soft value as its twist (a diagnostic: the best a twist can do
                     for this growth rule);
  tds           the twisted diffusion sampler (pplalign.guidance.tds: gradient-guided proposal on r(x̂_0)/β and
                that twist; 2 NFE per particle-step); tds_gp: the same with the Gaussian-posterior twist below;
  smc_gp        pplalign.smc with the Gaussian-posterior twist (pplalign.potentials.GaussianPosteriorTwist: the
                reward smoothed over N(x̂_0, v_s I), v_s from the data variance; no oracle knowledge);
  dts_twisted_gp     variant "twisted" with that twist, level-calibrated by an independent 128-particle pilot
                     (pplalign.search.calibrate_twist; its N·T NFE are counted). This is the consistent DTS of the
                     headline keys: unbiased (value-blind growth), guided by a twist one can actually build.
Each method returns ``n_eval`` equally weighted samples (IS/SMC: multinomial resampling of the weighted
particles; DTS: draws from the tree, no NFE); metrics: energy distance to ``n_eval`` exact samples (the floor is
the energy distance between two exact sets of that size), the TV between mode (component) weights, and
E‖x − c‖². A DTS tree is grown once per seed and read at every budget (it is anytime).
The headline keys are computed for ``dts_twisted_gp`` (``tilt_bias["dts_consistent"]`` is its tilt bias); the
uniform-selection ``dts_uniform`` is reported alongside (``*_others``).

Full mode: 3 seeds per budget for every method (IS/SMC: independent runs; DTS: independent trees), reported as
mean ± sd; the headline ratios use the seed means, and "first matches" interpolates log NFE linearly in log
energy distance between budgets. ``dts_twisted_gp`` runs to 10⁶ NFE, the other trees to 10⁵ (CPU time).

Prints a table, then one JSON line last: nfe_ratio_vs_is, nfe_ratio_vs_smc, floor_ratio, tilt_bias (see the
issue).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pplalign
from models.gmm_diffusion import two_mode_problem
from pplalign import metrics, search
from pplalign.guidance import tds
from pplalign.potentials import GaussianPosteriorTwist
from pplalign.search import DTSConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenoisedRewardTwist:
    """FK-steering potential log ψ_t = r(E[x_0 | x_t])/β: the reward of the denoised mean (Singhal et al. 2025)."""

    model: object
    reward: object
    beta: jax.Array

    def __call__(self, state, t):
        return self.reward(self.model.denoise(state.x, state.time)) / self.beta


def build(num_steps: int):
    model, reward, beta = two_mode_problem(num_steps=num_steps, radius=6.0, std=0.5, gamma=1.0, beta=0.5)
    target = pplalign.tilt(model, reward, beta)
    exact = model.exact_tilted_target(reward.center, reward.gamma, beta)
    return model, reward, beta, target, exact


def gaussian_posterior_twist(model, reward, beta):
    """(twist, data_variance): :class:`GaussianPosteriorTwist` with what a user knows, the training data's
    per-coordinate variance (here estimated from 10⁴ data draws)."""
    data_variance = float(np.mean(np.var(np.asarray(model.sample_data(jax.random.PRNGKey(1), 10_000)), axis=0)))
    return GaussianPosteriorTwist.create(model, reward, beta, data_variance=data_variance), data_variance


def mode_tv(x, exact) -> float:
    """TV between the exact component weights of σ and the empirical weights of the samples' most likely
    component under σ."""
    x = jnp.asarray(x)
    d = x.shape[-1]
    sq = jnp.sum((x[:, None, :] - exact.means[None]) ** 2, -1)
    logp = exact.log_weights - 0.5 * d * jnp.log(exact.variances) - 0.5 * sq / exact.variances
    labels = jnp.argmax(logp, axis=-1)
    emp = jnp.zeros(exact.log_weights.shape[0]).at[labels].add(1.0 / x.shape[0])
    return float(metrics.tv_distance(emp, jnp.exp(exact.log_weights)))


def evaluate(x, x_exact, exact, center) -> dict:
    x = np.asarray(x)
    return {
        "energy": float(metrics.energy_distance(x, x_exact)),
        "mode_tv": mode_tv(x, exact),
        "sq_dist": float(np.mean(np.sum((x - np.asarray(center)) ** 2, -1))),
    }


def resample(key, p, n):
    idx = jax.random.categorical(key, p.log_weights, shape=(n,))
    return np.asarray(p.samples)[np.asarray(idx)]


# ---------------------------------------------------------------------------------------------------------
# DTS grown once per seed (vmapped over seeds) and read at every budget
# ---------------------------------------------------------------------------------------------------------


def grow_dts(target, config, twist, keys, budgets, capacity, n_eval, x_exact_sets, exact, center, progress=True, pilot=None, pilot_keys=None):
    """Grow one tree per key until every budget is passed; evaluate samples at each budget.

    ``pilot``: a number of particles: each tree's twist is first level-calibrated by its own pilot
    (:func:`pplalign.search.calibrate_twist`) run with ``pilot_keys[s]``, a key independent of the tree's (the
    tree's iterations use ``fold_in(keys[s], k)``); the pilot's NFE count toward the budgets and the reported NFE.

    Seeds run one after the other, not vmapped: under ``vmap`` a ``while_loop`` with a batched predicate
    selects between old and new carry on every trip, which costs O(capacity) per trip for a big tree."""
    num_steps = target.num_steps
    run_with = jax.jit(lambda k, tr, n, tw: search.run_loop(k, tr, target, n, config, tw))
    sample = jax.jit(lambda k, tr: search.sample_leaves(k, tr, num_steps, n_eval, False))
    rows, trees = [], []
    for s, key in enumerate(keys):
        extra, seed_twist = 0, twist
        if pilot is not None:
            seed_twist = search.calibrate_twist(pilot_keys[s], target, twist, pilot)
            extra = int(seed_twist.pilot_nfe)
        tree = search.init(target, capacity)
        rate = float(num_steps) / 2.0  # NFE per iteration, refined as we go
        iters = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=int(budgets[-1]), desc=f"DTS {config.variant}{'+twist' if twist is not None else ''} seed {s}", leave=False)
        for budget in budgets:
            if budget <= extra:  # the pilot alone spends this budget: no tree to read yet
                continue
            while int(tree.nfe) + extra < budget and not bool(tree.full):
                chunk = int(np.clip((budget - extra - int(tree.nfe)) / rate, 20, 20_000))
                tree = run_with(key, tree, jnp.asarray(chunk, jnp.int32), seed_twist)
                iters += chunk
                rate = max(1.0, int(tree.nfe) / iters)
                if bar is not None:
                    bar.n = int(min(int(tree.nfe), budgets[-1]))
                    bar.refresh()
            leaves = sample(jax.random.fold_in(key, 7), tree)
            xs = np.asarray(tree.states.x[leaves])
            row = evaluate(xs, x_exact_sets[s], exact, center)
            row.update(nfe=int(tree.nfe) + extra, seed=s, budget=int(budget), log_Z=float(tree.log_value[0]))
            rows.append(row)
        if bar is not None:
            bar.close()
        trees.append(tree if s == 0 else None)
    return rows, trees[0]


def value_errors(model, reward, beta, tree, num_steps: int) -> dict:
    """Bias and spread of the tree's log Ŵ against the exact log ψ_s(x) at each level, over all nodes and over
    well-visited nodes (≥ 50 visits); also the Z-scale ratio mean Ŵ/ψ over every live node (a node whose subtree
    the roulette emptied has Ŵ = 0: it counts in the Z-scale mean and in ``zero_fraction``, not on the log scale)."""
    n = int(tree.num_nodes)
    level = np.asarray(tree.level[:n])
    visits = np.asarray(tree.visits[:n])
    # a node's own estimate of ψ: log Ŵ, without the 1/p roulette factor of variant "twisted" (killed nodes out)
    survival = np.asarray(tree.log_survival[:n])
    logw = np.where(survival > -np.inf, np.asarray(tree.log_value[:n]) + np.where(survival > -np.inf, survival, 0.0), -np.inf)
    x = tree.states.x[:n]
    s = tree.states.time[:n]
    exact = np.asarray(jax.jit(jax.vmap(lambda xx, ss: model.log_soft_value(xx, ss, reward, beta)))(x, s))
    out = {}
    for lv in sorted(set(level.tolist())):
        if lv < 1 or lv > num_steps:
            continue
        live = survival > -np.inf
        for tag, mask in (("all", (level == lv) & live), ("visited50", (level == lv) & live & (visits >= 50))):
            if mask.sum() < 2:
                continue
            diff_all = logw[mask] - exact[mask]
            diff = diff_all[np.isfinite(diff_all)]
            if diff.size < 2:
                continue
            out.setdefault(tag, {})[int(lv)] = {
                "count": int(diff_all.size),
                "bias_log": float(diff.mean()),
                "std_log": float(diff.std()),
                "z_ratio_minus_1": float(np.exp(diff_all).mean() - 1.0),
                "zero_fraction": float(1.0 - diff.size / diff_all.size),
            }
    return out


# ---------------------------------------------------------------------------------------------------------


def first_match(rows, method, reference: float):
    """Smallest NFE at which ``method``'s mean energy distance is ≤ ``reference`` (log-linear interpolation
    between budgets); None if never."""
    pts = summarise(rows)[method]
    prev = None
    for nfe, e in pts:
        if e <= reference:
            if prev is None:
                return nfe
            (n0, e0) = prev
            # interpolate log NFE linearly in log energy
            f = (math.log(reference) - math.log(e0)) / (math.log(e) - math.log(e0)) if e != e0 else 1.0
            return float(math.exp(math.log(n0) + f * (math.log(nfe) - math.log(n0))))
        prev = (nfe, e)
    return None


def summarise(rows):
    out = {}
    for method in sorted({r["method"] for r in rows}):
        budgets = sorted({r["budget"] for r in rows if r["method"] == method})
        pts = []
        for b in budgets:
            rs = [r for r in rows if r["method"] == method and r["budget"] == b]
            pts.append((float(np.mean([r["nfe"] for r in rs])), float(np.mean([r["energy"] for r in rs]))))
        out[method] = pts
    return out


def table_of(rows, methods, key="energy"):
    """{method: [(budget, mean NFE, mean, sd over seeds), ...]}."""
    out = {}
    for m in methods:
        pts = []
        for b in sorted({r["budget"] for r in rows if r["method"] == m}):
            rs = [r for r in rows if r["method"] == m and r["budget"] == b]
            vals = [r[key] for r in rs]
            pts.append((b, float(np.mean([r["nfe"] for r in rs])), float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0))
        out[m] = pts
    return out


def print_table(rows, methods, floor, exact_sq):
    """Energy distance (and E‖x − c‖² − exact) as mean ± sd over seeds, per budget and method."""
    budgets = sorted({r["budget"] for r in rows})
    for key, what in (("energy", f"energy distance to σ (floor {floor:.4f})"), ("sq_dist", f"E‖x − c‖² − exact ({exact_sq:.3f})")):
        print(f"{what}: mean ± sd over seeds")
        print("| NFE | " + " | ".join(methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        for b in budgets:
            cells = []
            for m in methods:
                vals = [r[key] - (exact_sq if key == "sq_dist" else 0.0) for r in rows if r["method"] == m and r["budget"] == b]
                cells.append(f"{np.mean(vals):.4g} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.2g}" if vals else "")
            print(f"| {b:.0e} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def mean_at(rows, method, budget, key):
    rs = [r[key] for r in rows if r["method"] == method and r["budget"] == budget]
    return float(np.mean(rs)) if rs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/dts_gmm")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--dts-max-budget", type=int, default=None, help="stop the DTS trees at this NFE (CPU time)")
    ap.add_argument("--dts-seeds", type=int, default=None, help="DTS trees per variant (default: --seeds)")
    ap.add_argument("--methods", default=None, help="comma-separated subset to run now (others are read from the cache)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    if args.quick:  # CI: tiny, just exercises every code path
        num_steps, n_eval, seeds = 10, 200, args.seeds or 1
        budgets = [1_000, 3_000]
        smc_budgets = budgets
        ref_budget = 1_000
    else:
        num_steps, n_eval, seeds = 20, 1000, args.seeds or 3
        budgets = [1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000]
        smc_budgets = [1_000, 10_000, 100_000, 1_000_000]  # each N compiles anew: keep the grid coarse
        ref_budget = 100_000
    model, reward, beta, target, exact = build(num_steps)
    center = np.asarray(reward.center)
    key = jax.random.PRNGKey(2025)
    k_exact, k_is, k_smc, k_dts = jax.random.split(key, 4)
    k_pilot = jax.random.PRNGKey(31337)  # the calibration pilots' keys: a root of their own, apart from the trees'

    x_exact = [np.asarray(model.sample_tilted(jax.random.fold_in(k_exact, 2 * s), n_eval, reward.center, reward.gamma, beta)) for s in range(seeds)]
    x_exact2 = [np.asarray(model.sample_tilted(jax.random.fold_in(k_exact, 2 * s + 1), n_eval, reward.center, reward.gamma, beta)) for s in range(seeds)]
    floor = float(np.mean([metrics.energy_distance(a, b) for a, b in zip(x_exact, x_exact2)]))
    exact_sq = float(np.sum(np.exp(exact.log_weights) * (np.sum((np.asarray(exact.means) - center) ** 2, -1) + 2 * np.asarray(exact.variances))))

    # Each method's rows are cached in OUT/cache/<method>.json, so an interrupted run resumes and methods can run
    # as separate processes (--methods); the summary is computed once every method is cached.
    cache_dir = os.path.join(args.out, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    wanted = None if args.methods is None else set(args.methods.split(","))
    cache_tag = {"num_steps": num_steps, "n_eval": n_eval, "seeds": seeds, "quick": bool(args.quick)}

    specs = {}  # method -> what defines it (sampler, twist, budgets, pilot); a cache of another spec is rerun

    def cached(name):
        path = os.path.join(cache_dir, f"{name}.json")
        if os.path.exists(path):
            data = json.load(open(path))
            if data.get("tag") == cache_tag and data.get("spec") == specs.get(name):
                return data
        return None

    def store(name, rows_, extra=None):
        json.dump({"tag": cache_tag, "spec": specs.get(name), "rows": rows_, "extra": extra}, open(os.path.join(cache_dir, f"{name}.json"), "w"))

    rows = []
    fk = DenoisedRewardTwist(model, reward, jnp.float32(beta))
    oracle = model.soft_value_twist(reward, beta)
    gp, data_variance = gaussian_posterior_twist(model, reward, beta)
    smc_methods = {
        "is": lambda k, n: pplalign.importance_sampling(k, target, n),
        "fk_smc": lambda k, n: pplalign.smc(k, target, n, twist=fk),
        "smc_oracle": lambda k, n: pplalign.smc(k, target, n, twist=oracle),
        "smc_gp": lambda k, n: pplalign.smc(k, target, n, twist=gp),
        "tds": lambda k, n: tds(k, target, n),
        "tds_gp": lambda k, n: tds(k, target, n, twist=gp),
    }
    twist_names = {"is": "none", "fk_smc": "DenoisedRewardTwist", "smc_oracle": "SoftValueTwist",
                   "smc_gp": f"GaussianPosteriorTwist(data_variance={data_variance:.4f})", "tds": "tds-default",
                   "tds_gp": f"tds-GaussianPosteriorTwist(data_variance={data_variance:.4f})"}
    if args.quick:  # CI: one compile per sampler code path; these repeat paths already taken
        for name in ("smc_oracle", "smc_gp", "tds_gp"):
            smc_methods.pop(name)
    for m_idx, (name, fn) in enumerate(smc_methods.items()):
        specs[name] = f"{'importance_sampling' if name == 'is' else 'smc'}|twist={twist_names[name]}|budgets={smc_budgets}|index={m_idx}"
        per_particle = 2 * num_steps if name.startswith("tds") else num_steps  # TDS: a gradient per step
        hit = cached(name)
        if hit is not None:
            rows.extend(hit["rows"])
            continue
        if wanted is not None and name not in wanted:
            continue
        new_rows = []
        for b in smc_budgets:
            n = max(1, b // per_particle)
            for s in range(seeds):
                kk = jax.random.fold_in(jax.random.fold_in(k_is, m_idx), s * 100003 + b)
                p = fn(kk, n)
                xs = resample(jax.random.fold_in(kk, 1), p, n_eval)
                row = evaluate(xs, x_exact[s], exact, center)
                row.update(method=name, budget=b, nfe=int(p.nfe), seed=s, log_Z=float(p.log_Z), ess=float(metrics.ess(p.log_weights)))
                new_rows.append(row)
        store(name, new_rows)
        rows.extend(new_rows)
        print(f"[{time.time() - t_start:6.1f}s] {name} done", flush=True)

    small = budgets[-1] if args.quick else 100_000
    consistent = "dts_twisted_gp"  # the consistent DTS of the headline keys
    pilot_particles = 32 if args.quick else 128
    dts_runs = {  # name: (config, twist, largest budget)
        "dts": (DTSConfig("published"), None, small),
        "dts_uniform": (DTSConfig("consistent"), None, small),
        consistent: (DTSConfig("twisted"), gp, budgets[-1]),
        "dts_consistent_fk": (DTSConfig("consistent"), fk, small),
        "dts_twisted_fk": (DTSConfig("twisted"), fk, small),  # over-splits: each iteration fills its node budget
        "dts_twisted_oracle": (DTSConfig("twisted"), oracle, small),
    }
    values = {}
    keys = jax.random.split(k_dts, seeds)[: (args.dts_seeds or seeds)]
    if args.quick:
        for name in ("dts_consistent_fk", "dts_twisted_fk", "dts_twisted_oracle"):
            dts_runs.pop(name)
    for name, (config, twist, largest) in dts_runs.items():
        dts_budgets = [b for b in budgets if b <= largest and (args.dts_max_budget is None or b <= args.dts_max_budget)]
        capacity = int(dts_budgets[-1] * 1.25) + 10 * (num_steps + 1)
        pilot = pilot_particles if name == consistent else None
        twist_name = type(twist).__name__ if twist is not None else "none"
        specs[name] = f"{config}|twist={twist_name}|budgets={dts_budgets}|pilot={pilot}|pilot_root=31337"
        hit = cached(name)
        if hit is not None:
            rows.extend(hit["rows"])
            values[name] = hit["extra"]
            continue
        if wanted is not None and name not in wanted:
            continue
        rs, trees = grow_dts(target, config, twist, keys, dts_budgets, capacity, n_eval, x_exact, exact, center, progress=not args.quick,
                             pilot=pilot, pilot_keys=jax.random.split(k_pilot, len(keys)))
        for r in rs:
            r["method"] = name
        rows.extend(rs)
        values[name] = value_errors(model, reward, beta, trees, num_steps)
        values[name]["root_log_value_minus_log_Z"] = [float(r["log_Z"] - exact.log_Z) for r in rs if r["budget"] == dts_budgets[-1]]
        store(name, rs, values[name])
        del trees
        print(f"[{time.time() - t_start:6.1f}s] {name} done", flush=True)

    missing = [m for m in list(smc_methods) + list(dts_runs) if cached(m) is None]
    if missing:
        print(json.dumps({"incomplete": True, "missing": missing}))
        return
    # --- headline numbers -----------------------------------------------------------------------------------
    top = max(r["budget"] for r in rows if r["method"] == consistent)
    top_of = lambda m: max((r["budget"] for r in rows if r["method"] == m), default=None)  # each at its own largest budget
    ref_is = mean_at(rows, "is", ref_budget, "energy")
    ref_smc = mean_at(rows, "fk_smc", ref_budget, "energy")
    match_is = first_match(rows, consistent, ref_is)
    match_smc = first_match(rows, consistent, ref_smc)
    ratio = lambda m: (ref_budget / m) if m else 0.0
    all_methods = list(smc_methods) + list(dts_runs)
    table = table_of(rows, all_methods)
    summary = {
        "nfe_ratio_vs_is": ratio(match_is),
        "nfe_ratio_vs_smc": ratio(match_smc),
        "floor_ratio": mean_at(rows, consistent, top, "energy") / floor,
        "tilt_bias": {
            "dts": mean_at(rows, "dts", top_of("dts"), "sq_dist") - exact_sq,
            "dts_consistent": mean_at(rows, consistent, top, "sq_dist") - exact_sq,
        },
        "consistent_method": consistent,
        "tilt_bias_others": {m: mean_at(rows, m, top_of(m), "sq_dist") - exact_sq for m in ("dts_uniform", "dts_consistent_fk", "dts_twisted_fk", "dts_twisted_oracle") if m in dts_runs},
        "nfe_ratio_vs_is_others": {m: ratio(first_match(rows, m, ref_is)) for m in dts_runs},
        "floor_ratio_others": {m: [top_of(m), mean_at(rows, m, top_of(m), "energy") / floor] for m in dts_runs},
        "floor": floor,
        "reference_budget": ref_budget,
        "reference_energy": {"is": ref_is, "fk_smc": ref_smc},
        "data_variance": data_variance,
        "largest_budget": top,
        "exact_sq_dist": exact_sq,
        "exact_log_Z": float(exact.log_Z),
        "seeds": seeds,
        "energy_mean_sd": {m: [[b, round(n), round(e, 5), round(sd, 5)] for b, n, e, sd in pts] for m, pts in table.items()},
        "seconds": round(time.time() - t_start, 1),
        "quick": bool(args.quick),
    }
    print_table(rows, all_methods, floor, exact_sq)
    with open(os.path.join(args.out, "dts_gmm.json"), "w") as f:
        json.dump({"summary": summary, "rows": rows, "value_errors": values, "num_steps": num_steps, "n_eval": n_eval, "seeds": seeds}, f, indent=1)
    plot(rows, floor, exact_sq, args.out, values)
    print(json.dumps(summary))


def plot(rows, floor, exact_sq, out, values):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"is": "C0o-", "fk_smc": "C1s-", "smc_oracle": "C2^-", "smc_gp": "C8^--", "tds": "k<--", "tds_gp": "m<:", "dts": "C3v-", "dts_uniform": "C4D-", "dts_consistent_fk": "C5P-", "dts_twisted_fk": "C6X-", "dts_twisted_oracle": "C7*-", "dts_twisted_gp": "C9D-"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for metric, ax, ylabel in (("energy", axes[0], "energy distance to σ"), ("mode_tv", axes[1], "mode-weight TV"), ("sq_dist", axes[2], "E‖x − c‖²")):
        for method, style in styles.items():
            budgets = sorted({r["budget"] for r in rows if r["method"] == method})
            if not budgets:
                continue
            nfe = [np.mean([r["nfe"] for r in rows if r["method"] == method and r["budget"] == b]) for b in budgets]
            vals = [[r[metric] for r in rows if r["method"] == method and r["budget"] == b] for b in budgets]
            sd = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(nfe, [np.mean(v) for v in vals], yerr=sd, fmt=style, label=method, ms=4, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(ylabel)
        if metric == "energy":
            ax.set_yscale("log")
            ax.axhline(floor, color="k", ls="--", lw=1, label="exact-vs-exact floor")
        if metric == "sq_dist":
            ax.axhline(exact_sq, color="k", ls="--", lw=1, label="exact")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dts_gmm.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("dts", "C3v-"), ("dts_uniform", "C4D-"), ("dts_consistent_fk", "C5P-"), ("dts_twisted_fk", "C6X-"), ("dts_twisted_oracle", "C7*-"), ("dts_twisted_gp", "C9D-")):
        errs = values.get(method, {}).get("all", {})
        if errs:
            lv = sorted(errs)
            ax.errorbar(lv, [errs[l]["bias_log"] for l in lv], yerr=[errs[l]["std_log"] for l in lv], fmt=style, label=method, ms=4, capsize=2)
    ax.axhline(0, color="k", lw=1)
    ax.set_xlabel("tree level (1 = x_T)")
    ax.set_ylabel("log Ŵ − log ψ (mean ± sd over nodes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dts_gmm_values.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
