"""Mutation check of the core (DESIGN §10): apply deliberate bugs one at a time and confirm the suite fails.

Each mutation is (name, file, exact old text, new text, tests). The script copies the repository (the files
``git ls-files`` lists, tracked or untracked-but-not-ignored, as they are in the working tree) into a temporary
directory, applies one mutation there, runs the named tests against the copy (``PYTHONPATH`` and the working
directory point at the copy, and the script checks that the copy's ``pplalign`` is the one imported, not the
editable install), restores the file and moves on. The working tree is never touched.

A mutation whose old text is not found exactly once in the current code is an error (the code moved on: fix
the pattern). The tests named for a mutation must be files of the default suite (``tests/test_*.py``, which
``scripts/test.sh`` runs), optionally narrowed to node ids (``file::test``) to keep the check fast; first they
run once unmutated on the copy, and must pass without skips there, so that "caught" means "caught by a failing
test of the default suite".

    .venv/bin/python scripts/mutation_check.py               # every mutation; exit 1 if any is missed
    .venv/bin/python scripts/mutation_check.py --list        # names, files and tests
    .venv/bin/python scripts/mutation_check.py --only NAME   # one (repeatable, or comma-separated)
    .venv/bin/python scripts/mutation_check.py --patterns    # only check that every pattern applies once
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = (
    "pplalign/smc.py",
    "pplalign/resampling.py",
    "pplalign/csmc.py",
    "pplalign/search/dts.py",
    "pplalign/vi/estimators.py",
    "pplalign/vi/objectives.py",
    "pplalign/twists.py",
    "pplalign/search/astar.py",
    "pplalign/search/rebase.py",
    "pplalign/vi/dpo.py",
    "models/diffusers/scheduler.py",
    "pplalign/tempered.py",
    "pplalign/mcmc.py",
)
TIMEOUT_S = 900  # per mutation; a mutation that hangs the tests counts as caught (the suite would not pass)


class Mutation(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


SMC = "tests/test_smc.py"
ADAPTIVE = SMC + "::test_adaptive_twisted_smc_carries_weights_and_is_unbiased"
ADAPTIVE_OPT, ADAPTIVE_P0 = ADAPTIVE + "[optimal]", ADAPTIVE + "[p0]"
STEP = SMC + "::test_smc_step_carries_weights_when_not_resampling_and_resets_when_resampling"
RESAMPLING = "tests/test_resampling.py"
VI = "tests/test_vi_estimators.py"
DTS = "tests/test_dts_core.py"
TWISTS = "tests/test_twists_losses.py"

MUTATIONS = [
    Mutation(
        "smc_drop_carried_weights",
        "pplalign/smc.py",
        "        return states, log_w, log_psi, smc_state.log_Z, identity\n",
        "        return states, jnp.zeros_like(log_w), log_psi, smc_state.log_Z, identity\n",
        (STEP,),
        "a step that does not resample resets the weights (DESIGN §8, an FK-steering bug)",
    ),
    Mutation(
        "smc_drop_carried_weights_adaptive",
        "pplalign/smc.py",
        "        return states, log_w, log_psi, smc_state.log_Z, identity\n",
        "        return states, jnp.zeros_like(log_w), log_psi, smc_state.log_Z, identity\n",
        (ADAPTIVE_OPT,),
        "the same bug, caught statistically: adaptive twisted SMC's Ẑ is then biased",
    ),
    Mutation(
        "smc_drop_psi_prev",
        "pplalign/smc.py",
        "    log_g = log_g + log_psi - log_psi_prev\n",
        "    log_g = log_g + log_psi\n",
        (ADAPTIVE_P0,),
        "the incremental weight forgets ψ_{t−1} (p₀ proposals: the raw step score instead of the ratio)",
    ),
    Mutation(
        "smc_drop_psi_prev_optimal",
        "pplalign/smc.py",
        "        log_g = log_norm - log_psi_prev\n",
        "        log_g = log_norm\n",
        (SMC + "::test_exact_twist_gives_exact_log_Z_at_every_seed",),
        "the same in the locally optimal proposal's weight Σ p₀ψ_t / ψ_{t−1}",
    ),
    Mutation(
        "smc_optimal_last_step_correction",
        "pplalign/smc.py",
        "            log_g = log_g + r - log_psi\n",
        "            log_g = log_g + r\n",
        (ADAPTIVE_OPT,),
        "the last step proposes from the twist's candidate scores and forgets to divide by them",
    ),
    Mutation(
        "smc_no_log_N_in_log_Z",
        "pplalign/smc.py",
        "    log_Z = state.log_Z + _log_mean_exp(state.log_weights)\n",
        "    log_Z = state.log_Z + jax.nn.logsumexp(state.log_weights)\n",
        (SMC + "::test_exact_twist_gives_exact_log_Z_at_every_seed",),
        "log Ẑ adds log Σ w instead of log mean w at the end",
    ),
    Mutation(
        "smc_resample_keeps_old_psi",
        "pplalign/smc.py",
        "            log_psi[idx],\n",
        "            log_psi,\n",
        (ADAPTIVE_OPT,),
        "resampling gathers the states but not their ψ_{t−1} (an ancestor mix-up)",
    ),
    Mutation(
        "smc_ancestor_off_by_one",
        "pplalign/smc.py",
        "        idx = resampling(resample_key, log_w, n).astype(jnp.int32)\n",
        "        idx = ((resampling(resample_key, log_w, n) + 1) % n).astype(jnp.int32)\n",
        (ADAPTIVE_OPT,),
        "an off-by-one in the ancestor indices (invisible when the weights are uniform, as in the bootstrap)",
    ),
    Mutation(
        "smc_ignore_optimal_proposal_flag",
        "pplalign/smc.py",
        "    if optimal and twist is not None and q is None and _is_categorical(p):\n",
        "    if twist is not None and q is None and _is_categorical(p):\n",
        (SMC + "::test_optimal_proposal_flag_selects_the_proposal",),
        "optimal_proposal=False silently takes the locally optimal proposal",
    ),
    Mutation(
        "resampling_biased_systematic",
        "pplalign/resampling.py",
        "    u = (jnp.arange(num) + jax.random.uniform(key, ())) / num\n",
        "    u = (jnp.arange(num) + 0.5 * jax.random.uniform(key, ())) / num\n",
        (RESAMPLING + "::test_resampler_is_unbiased_and_valid",),
        "systematic resampling with its offset drawn from [0, ½) instead of [0, 1)",
    ),
    Mutation(
        "resampling_inverse_cdf_not_clipped",
        "pplalign/resampling.py",
        "    return jnp.clip(idx, 0, last_positive).astype(jnp.int32)\n",
        "    return idx.astype(jnp.int32)\n",
        (RESAMPLING + "::test_inverse_cdf_clips_at_float32_boundary",),
        "inverse-CDF indices not clipped: N, or a trailing zero-weight particle, at the float32 boundary",
    ),
    Mutation(
        "resampling_stratified_off_by_one",
        "pplalign/resampling.py",
        "    u = (jnp.arange(num) + jax.random.uniform(key, (num,))) / num\n",
        "    u = (jnp.arange(1, num + 1) + jax.random.uniform(key, (num,))) / num\n",
        (RESAMPLING + "::test_resampler_is_unbiased_and_valid",),
        "stratified strata shifted by one",
    ),
    Mutation(
        "resampling_residual_full_weights",
        "pplalign/resampling.py",
        "    res = jnp.clip(scaled - counts, 0.0)\n",
        "    res = scaled\n",
        (RESAMPLING + "::test_resampler_is_unbiased_and_valid",),
        "residual resampling draws the remainder from the full weights, not the residuals",
    ),
    Mutation(
        "csmc_reference_ignored",
        "pplalign/csmc.py",
        "        reference,\n        mesh,\n        bool(optimal_proposal),\n",
        "        None,\n        mesh,\n        bool(optimal_proposal),\n",
        (SMC + "::test_csmc_pins_reference_and_bounds_log_Z",),
        "CSMC runs plain SMC (nothing pinned)",
    ),
    Mutation(
        "csmc_ancestor_not_pinned",
        "pplalign/smc.py",
        "            idx = idx.at[0].set(0)\n",
        "            idx = idx\n",
        (SMC + "::test_csmc_pins_reference_and_bounds_log_Z",),
        "conditional resampling does not keep ancestor 0 for the pinned particle",
    ),
    Mutation(
        "vi_reinforce_mean_no_correction",
        "pplalign/vi/estimators.py",
        "        return jnp.broadcast_to(jnp.mean(fs), fs.shape), jnp.asarray(n / (n - 1))\n",
        "        return jnp.broadcast_to(jnp.mean(fs), fs.shape), jnp.asarray(1.0)\n",
        (VI + "::test_reinforce_mean_equals_leave_one_out", VI + "::test_reinforce_mean_unbiased_at_two_samples"),
        "the batch-mean baseline without its n/(n−1) factor (a (1 − 1/n) gradient bias)",
    ),
    Mutation(
        "vi_loo_baseline_includes_self",
        "pplalign/vi/estimators.py",
        "    return (total - fs) / (n - 1), jnp.asarray(1.0)  # leave-one-out\n",
        "    return total / n, jnp.asarray(1.0)  # leave-one-out\n",
        (VI + "::test_reinforce_mean_equals_leave_one_out", VI + "::test_elbo_gradient_unbiased"),
        "the leave-one-out baseline includes the sample itself",
    ),
    Mutation(
        "vi_enum_gradient_stopped",
        "pplalign/vi/estimators.py",
        "        terms = jnp.where(q > 0, q * fx, 0.0)",
        "        terms = jnp.where(q > 0, jax.lax.stop_gradient(q) * fx, 0.0)",
        (VI + "::test_elbo_gradient_unbiased",),
        "the exact (enumeration) estimator drops the gradient through q",
    ),
    Mutation(
        "vi_swap_kl_directions",
        "pplalign/vi/objectives.py",
        '        "kl_q_sigma": safe(q, lq - ls),\n        "kl_sigma_q": safe(s, ls - lq),\n',
        '        "kl_q_sigma": safe(s, ls - lq),\n        "kl_sigma_q": safe(q, lq - ls),\n',
        (VI + "::test_kl_rl_equals_beta_times_elbo",),
        "exact_summary reports KL(σ‖q) as KL(q‖σ) and back",
    ),
    Mutation(
        "vi_kl_rl_penalty_sign",
        "pplalign/vi/objectives.py",
        '            return terms["reward"] - b * (family.log_prob(p, x) - terms["log_p0"])\n',
        '            return terms["reward"] + b * (family.log_prob(p, x) - terms["log_p0"])\n',
        (VI + "::test_kl_rl_equals_beta_times_elbo",),
        "the KL-regularised RL objective rewards the KL instead of penalising it",
    ),
    Mutation(
        "dts_drop_roulette_factor_backup",
        "pplalign/search/dts.py",
        "        mean = jnp.logaddexp(others, child_value) - jnp.log(m) - jnp.where(log_p > -jnp.inf, log_p, 0.0)\n",
        "        mean = jnp.logaddexp(others, child_value) - jnp.log(m)\n",
        (DTS + "::test_twisted_dts_root_value_is_unbiased_and_backup_exact",),
        "the backup forgets the survivor's 1/p of Russian roulette",
    ),
    Mutation(
        "dts_drop_roulette_factor_leaf",
        "pplalign/search/dts.py",
        "jnp.where(alive & is_leaf, leaf_value - log_p, -jnp.inf)",
        "jnp.where(alive & is_leaf, leaf_value, -jnp.inf)",
        (DTS + "::test_twisted_dts_root_value_is_unbiased_and_backup_exact",),
        "a surviving leaf's value forgets its 1/p",
    ),
    Mutation(
        "dts_backup_sum_not_mean",
        "pplalign/search/dts.py",
        "        mean = lse - jnp.log(jnp.maximum(tree.num_children[n], 1).astype(f32)) - tree.log_survival[n]\n",
        "        mean = lse - tree.log_survival[n]\n",
        (DTS + "::test_twisted_dts_root_value_is_unbiased_and_backup_exact",),
        "the twisted rollout's values sum their children instead of averaging (no 1/m_n)",
    ),
    Mutation(
        "dts_consistent_reads_values",
        "pplalign/search/dts.py",
        "        return tree_lib.gumbel_over_children(tree, node, key, lambda c: tree.heuristic[c])\n",
        "        return tree_lib.gumbel_over_children(tree, node, key, lambda c: tree.log_value[c])\n",
        (DTS + "::test_consistent_dts_root_value_is_unbiased_for_Z",),
        "the consistent variant selects on the tree's values (DTS as published: biased)",
    ),
    Mutation(
        "twists_ctl_sign",
        "pplalign/twists.py",
        "    return -pos + jnp.sum(jnp.where(any_valid, log_z_t, 0.0))\n",
        "    return pos + jnp.sum(jnp.where(any_valid, log_z_t, 0.0))\n",
        (TWISTS + "::test_gradient_vanishes_at_the_exact_twist",),
        "the contrastive twist loss with the positive term's sign flipped",
    ),
    Mutation(
        "twists_trace_last_correction",
        "pplalign/twists.py",
        "    log_g_l = log_g_l + log_phi - lp_last",
        "    log_g_l = log_g_l + log_phi",
        (TWISTS + "::test_trace_weights",),
        "the replayed weights forget the final φ/ψ_{T−1} correction",
    ),
    Mutation(
        "astar_pops_largest_f",
        "pplalign/search/astar.py",
        "        i = jnp.argmin(f).astype(jnp.int32)\n",
        "        i = jnp.argmax(jnp.where(jnp.isfinite(f), f, -jnp.inf)).astype(jnp.int32)\n",
        ("tests/test_reasoning_search.py::test_astar_pops_in_nondecreasing_f",),
        "A*-decoding pops the worst partial solution instead of the least g + h",
    ),
    Mutation(
        "rebase_floor_rounding",
        "pplalign/search/rebase.py",
        "    edges = jnp.floor(jnp.asarray(total, jnp.float32) * cum + 0.5).astype(jnp.int32)\n",
        "    edges = jnp.floor(jnp.asarray(total, jnp.float32) * cum * 0.999).astype(jnp.int32)\n",
        ("tests/test_reasoning_search.py::test_rebase_allocation_sums_to_width_and_follows_softmax",),
        "REBASE's allocation truncates, so the children no longer sum to the width",
    ),
    Mutation(
        "dpo_no_beta",
        "pplalign/vi/dpo.py",
        "    return beta * ((pc - rc) - (pr - rr))\n",
        "    return (pc - rc) - (pr - rr)\n",
        ("tests/test_mcts_dpo.py::test_dpo_optimum_matches_the_closed_form_on_two_options",),
        "the DPO logit forgets its temperature β",
    ),
    Mutation(
        "ddim_no_eta",
        "models/diffusers/scheduler.py",
        "        std = np.float32(eta) * ((one - ab_prev) / (one - ab) * (one - ab / ab_prev)) ** 0.5\n",
        "        std = ((one - ab_prev) / (one - ab) * (one - ab / ab_prev)) ** 0.5\n",
        ("tests/test_diffusers_scheduler.py::test_every_configuration_steps_as_diffusers",),
        "DDIM's noise scale ignores η (every DDIM run becomes η = 1)",
    ),
    Mutation(
        "tempered_ess_solver_wrong_direction",
        "pplalign/tempered.py",
        "        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)\n",
        "        return jnp.where(good, lo, mid), jnp.where(good, mid, hi)\n",
        ("tests/test_tempered_schedule.py::test_first_increment_matches_closed_form",),
        "the λ bisection moves the wrong way (blackjax #914's sign error: tempering stalls or overshoots)",
    ),
    Mutation(
        "waste_free_keeps_only_starts",
        "pplalign/mcmc.py",
        "        lambda s, c: jnp.concatenate([s[None], c]).reshape((-1,) + s.shape[1:]), starts, chain\n",
        "        lambda s, c: jnp.concatenate([s[None]] * (c.shape[0] + 1)).reshape((-1,) + s.shape[1:]), starts, chain\n",
        ("tests/test_tempered_schedule.py::test_waste_free_keeps_every_chain_state",),
        "waste-free moves drop the chain states and keep M copies of the resampled starts",
    ),
]


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def _copy_repo(dest: str) -> None:
    for rel in _tracked_files():
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)


def check_patterns(root: str, mutations) -> list[str]:
    """Errors: a mutation of a non-core file, an old text not found exactly once, a test outside the suite."""
    errors = []
    names = [m.name for m in mutations]
    if len(set(names)) != len(names):
        errors.append("duplicate mutation names")
    for m in mutations:
        if m.file not in CORE:
            errors.append(f"{m.name}: {m.file} is not a core module")
            continue
        text = open(os.path.join(root, m.file)).read()
        count = text.count(m.old)
        if count != 1:
            errors.append(f"{m.name}: old text found {count} times in {m.file} (must be exactly once): {m.old!r}")
        if m.old == m.new:
            errors.append(f"{m.name}: old and new text are the same")
        for test in m.tests:
            path = test.split("::")[0]
            if not re.fullmatch(r"tests/test_[A-Za-z0-9_]+\.py", path) or not os.path.isfile(os.path.join(root, path)):
                errors.append(f"{m.name}: {test} is not a test file of the default suite (tests/test_*.py)")
    return errors


def _env(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = copy + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0", MPLBACKEND="Agg")
    return env


def _verify_import(copy: str) -> None:
    """The copy's pplalign (and models) must be the ones imported, not the editable install's."""
    code = "import pplalign, models; print(pplalign.__file__); print(models.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(copy), capture_output=True, text=True, check=True)
    paths = out.stdout.split()
    real = os.path.realpath(copy)
    for p in paths:
        if not os.path.realpath(p).startswith(real + os.sep):
            raise SystemExit(f"mutation_check: the copy at {copy} imports {p}, not its own package; refusing to run")


def _pytest(copy: str, tests, timeout: int) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.time() - start
    except subprocess.TimeoutExpired as err:
        return -1, f"timed out after {timeout}s\n{err.stdout or ''}", time.time() - start


def _summary_line(output: str) -> str:
    lines = [l for l in output.strip().splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", l)]
    return lines[-1].strip("= ") if lines else output.strip().splitlines()[-1] if output.strip() else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", action="append", default=[], help="run only these mutations (repeat, or comma-separate)")
    ap.add_argument("--patterns", action="store_true", help="only check that every pattern applies to the current code")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = ap.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        wanted = {n for item in args.only for n in item.split(",") if n}
        unknown = wanted - {m.name for m in MUTATIONS}
        if unknown:
            raise SystemExit(f"unknown mutation(s): {sorted(unknown)}; see --list")
        mutations = [m for m in MUTATIONS if m.name in wanted]
    if args.list:
        for m in mutations:
            print(f"{m.name:36s} {m.file:28s} {' '.join(m.tests)}\n{'':36s} {m.why}")
        print(f"{len(mutations)} mutations")
        return 0
    errors = check_patterns(ROOT, mutations)
    if errors:
        print("mutation_check: patterns that do not apply to the current code:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 2
    if args.patterns:
        print(f"all {len(mutations)} patterns apply exactly once")
        return 0

    t0 = time.time()
    copy = tempfile.mkdtemp(prefix="pplalign_mutation_")
    try:
        _copy_repo(copy)
        _verify_import(copy)
        print(f"copy of the repository at {copy} (its own pplalign is imported)", flush=True)
        if not args.no_baseline:
            tests = sorted({t for m in mutations for t in m.tests})
            rc, out, secs = _pytest(copy, tests, TIMEOUT_S * 2)
            summary = _summary_line(out)
            print(f"baseline (unmutated, {len(tests)} test targets): {summary} [{secs:.0f}s]", flush=True)
            if rc != 0 or "skipped" in summary:
                print(out[-4000:], file=sys.stderr)
                print("mutation_check: the selected tests must pass, without skips, on the unmutated code", file=sys.stderr)
                return 2
        rows = []
        for m in mutations:
            path = os.path.join(copy, m.file)
            original = open(path).read()
            open(path, "w").write(original.replace(m.old, m.new, 1))
            try:
                rc, out, secs = _pytest(copy, m.tests, TIMEOUT_S)
            finally:
                open(path, "w").write(original)
            if rc == -1:
                status = "caught (timeout)"
            elif rc == 1:
                status = "caught"
            elif rc == 0:
                status = "MISSED"
            else:  # 2: collection/import error, 3/4: internal or usage error, 5: no tests collected
                status = f"ERROR rc={rc}"
            rows.append((m.name, status, secs))
            detail = _summary_line(out)
            print(f"{m.name:36s} {status:16s} {secs:6.0f}s  {detail}", flush=True)
            if status.startswith("ERROR"):
                print(out[-3000:], file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    total = time.time() - t0
    print("\n| mutation | result | seconds |\n|---|---|---|")
    for name, status, secs in rows:
        print(f"| {name} | {status} | {secs:.0f} |")
    bad = [r for r in rows if not r[1].startswith("caught")]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} caught; total {total:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
