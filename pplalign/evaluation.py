"""How good is a twist? Bounds on log Z and KL divergences, as in Zhao et al. 2024, §5 and §7.

For a target σ ∝ p₀φ and a twist ψ (None: bootstrap), with q^ψ the twisted proposal used by ``pplalign.smc``:

- SMC lower bound: E[log Ẑ_SMC] ≤ log Z (Jensen on the unbiased Ẑ), averaged over independent seeds.
- CSMC upper bound: E[log Ẑ_CSMC] ≥ log Z when the pinned reference is an exact σ sample, averaged over
  seeds, each with its own σ sample. Both tighten as N grows and are exact (= log Z at every seed) for ψ*.
- With one particle they are E_q[log w] = log Z − KL(q‖σ) and E_σ[log w] = log Z + KL(σ‖q), w = p₀φ/q, so
  the KLs follow (``pplalign.metrics.kl_q_sigma`` / ``kl_sigma_q``); given every sequence (an enumerable
  testbed), :func:`exact_kl` computes them exactly from q^ψ's probabilities.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from . import metrics
from ._filter_jit import filter_jit
from .csmc import csmc
from .smc import smc
from .twists import trace_batch

__all__ = ["log_z_bounds", "kl_estimates", "exact_kl", "proposal_log_prob", "bounds_table"]


def _check_refs(sigma_refs: Any, needed: int) -> None:
    n = jax.tree_util.tree_leaves(sigma_refs)[0].shape[0]
    if n < needed:
        raise ValueError(f"need at least {needed} exact σ samples (one per seed); got {n}")


def log_z_bounds(
    key: jax.Array,
    target: Any,
    twist: Any,
    num_particles: int,
    sigma_refs: Any,
    *,
    num_seeds: int = 5,
    ess_threshold: float = 0.5,
) -> dict:
    """SMC lower and CSMC upper bounds on log Z with ``num_particles`` particles over ``num_seeds`` seeds.

    ``sigma_refs``: exact σ samples (leading axis ≥ num_seeds; each a reference [T, ...] of per-step values),
    one pins each CSMC run. Returns floats: ``lower``, ``upper`` (means over seeds), their standard errors
    ``lower_se``, ``upper_se``, the per-seed values ``lower_runs``, ``upper_runs``, and ``ess``, the mean over
    steps and seeds of the SMC's ESS/N.
    """
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1; got {num_seeds}")
    _check_refs(sigma_refs, num_seeds)
    # A Python loop over seeds (not vmap) reuses the one compiled sampler per (N, twist type) that every
    # other caller also uses; a vmapped sampler would compile a second, batched executable.
    k_low, k_up = jax.random.split(key)
    low, ess, up = [], [], []
    for i in range(num_seeds):
        p = smc(jax.random.fold_in(k_low, i), target, num_particles, twist=twist, ess_threshold=ess_threshold)
        low.append(p.log_Z)
        ess.append(jnp.mean(p.ess) / num_particles)
        ref = jax.tree_util.tree_map(lambda r: r[i], sigma_refs)
        up.append(csmc(jax.random.fold_in(k_up, i), target, num_particles, ref, twist=twist).log_Z)
    low, ess, up = jnp.stack(low), jnp.stack(ess), jnp.stack(up)
    lo_m, lo_se = metrics.bound(low)
    up_m, up_se = metrics.bound(up)
    return dict(
        num_particles=int(num_particles),
        lower=float(lo_m),
        lower_se=float(lo_se),
        upper=float(up_m),
        upper_se=float(up_se),
        lower_runs=[float(x) for x in low],
        upper_runs=[float(x) for x in up],
        ess=float(jnp.mean(ess)),
    )


def kl_estimates(key: jax.Array, target: Any, twist: Any, sigma_refs: Any, log_Z: Any, num_q: Optional[int] = None) -> dict:
    """Monte Carlo KL(q‖σ) and KL(σ‖q) of the twisted proposal from one-particle log-weights.

    KL(q‖σ) = log Z − E_q[log w] from ``num_q`` one-particle SMC runs; KL(σ‖q) = E_σ[log w] − log Z from
    one-particle CSMC runs pinned to ``sigma_refs``. Pass the exact log Z, or a bound: an upper bound of log Z
    makes the first an upper bound, a lower bound makes the second one. ``*_se`` are the standard errors.
    """
    n_sigma = jax.tree_util.tree_leaves(sigma_refs)[0].shape[0]
    num_q = n_sigma if num_q is None else num_q
    k_q, k_s = jax.random.split(key)
    log_w_q = jnp.stack(
        # one particle never resamples (ESS = 1 ≥ 0.5), so the default threshold reuses the bounds' executable
        [smc(jax.random.fold_in(k_q, i), target, 1, twist=twist).log_Z for i in range(num_q)]
    )
    log_w_s = jnp.stack(
        [
            csmc(jax.random.fold_in(k_s, i), target, 1, jax.tree_util.tree_map(lambda r: r[i], sigma_refs), twist=twist).log_Z
            for i in range(n_sigma)
        ]
    )
    se = lambda x: float(jnp.std(x, ddof=1) / jnp.sqrt(x.shape[0])) if x.shape[0] > 1 else 0.0
    return dict(
        kl_q_sigma=float(metrics.kl_q_sigma(log_w_q, log_Z)),
        kl_sigma_q=float(metrics.kl_sigma_q(log_w_s, log_Z)),
        kl_q_sigma_se=se(log_w_q),
        kl_sigma_q_se=se(log_w_s),
    )


def proposal_log_prob(target: Any, twist: Any, references: Any) -> jax.Array:
    """log q^ψ(x) = Σ_t log q_t(x_t | x_{<t}) of the twisted proposal ``pplalign.smc`` uses, for a batch of
    trajectories [M, T]."""
    return jnp.sum(trace_batch(target, twist, references).log_q, axis=-1)


_compiled_log_q = filter_jit(proposal_log_prob)


def exact_kl(target: Any, twist: Any, all_refs: Any, log_sigma: jax.Array, chunk: int = 4096) -> dict:
    """KL(q^ψ‖σ) and KL(σ‖q^ψ) exactly, given every trajectory ``all_refs`` [M, T] and the normalised
    log σ of each [M] (on the Markov testbed: ``lm.all_sequences()`` and ``log_softmax(lm.log_target(r, β))``).
    The trajectories must be all of the support: Σ exp(log σ) = 1 and Σ q = 1 are checked."""
    log_sigma = jnp.asarray(log_sigma, jnp.float32)
    m = log_sigma.shape[0]
    # target and twist go in as arguments (one executable per twist type, reused across twists), not as
    # closure constants: a jit closing over an all-zero MLP twist once returned NaN here (jax 0.11.2, CPU;
    # not reproduced since).
    parts = [
        _compiled_log_q(target, twist, jax.tree_util.tree_map(lambda a: a[i : i + chunk], all_refs))
        for i in range(0, m, chunk)
    ]
    log_q = jnp.concatenate(parts)
    total_q, total_s = float(jnp.exp(jax.nn.logsumexp(log_q))), float(jnp.exp(jax.nn.logsumexp(log_sigma)))
    if abs(total_q - 1) > 1e-3 or abs(total_s - 1) > 1e-3:
        raise ValueError(f"all_refs must enumerate the whole support: Σq = {total_q:.4f}, Σσ = {total_s:.4f}")
    q, s = jnp.exp(log_q), jnp.exp(log_sigma)
    kl_qs = jnp.sum(jnp.where(q > 0, q * (log_q - log_sigma), 0.0))
    kl_sq = jnp.sum(jnp.where(s > 0, s * (log_sigma - log_q), 0.0))
    return dict(kl_q_sigma=float(kl_qs), kl_sigma_q=float(kl_sq))


def bounds_table(results: dict, log_Z: Optional[float] = None, particle_counts: Optional[Sequence[int]] = None) -> str:
    """A plain-text table of ``{method: {"by_num_particles": {N: {lower, upper, ...}}, kl_...}}``: the bounds at
    each N (with their seed sd in parentheses where ``lower_sd``/``upper_sd`` are given), the ESS/N at the largest
    N where given, and the two KLs."""
    methods = list(results)
    if particle_counts is None:
        particle_counts = sorted({int(n) for m in methods for n in results[m]["by_num_particles"]})
    bound = lambda m, n: results[m]["by_num_particles"].get(str(n), results[m]["by_num_particles"].get(n))
    with_sd = all("lower_sd" in bound(m, n) for m in methods for n in particle_counts)
    with_ess = all("ess" in bound(m, particle_counts[-1]) for m in methods)
    width = 34 if with_sd else 24
    head = f"{'method':<10}" + "".join(f"{'N=' + str(n) + ' lower/upper' + (' (sd)' if with_sd else ''):>{width}}"
                                       for n in particle_counts)
    head += (f"{'ESS/N':>7}" if with_ess else "") + f"{'KL(σ‖q)':>10}{'KL(q‖σ)':>10}"
    lines = [] if log_Z is None else [f"exact log Z = {log_Z:.4f}"]
    lines.append(head)
    for m in methods:
        row = f"{m:<10}"
        for n in particle_counts:
            b = bound(m, n)
            if with_sd:
                row += f"{b['lower']:.3f} ({b['lower_sd']:.2f}) / {b['upper']:.3f} ({b['upper_sd']:.2f})".rjust(width)
            else:
                row += f"{b['lower']:>11.3f} / {b['upper']:<10.3f}"
        if with_ess:
            row += f"{bound(m, particle_counts[-1])['ess']:>7.2f}"
        row += f"{results[m].get('kl_sigma_q', float('nan')):>10.3f}{results[m].get('kl_q_sigma', float('nan')):>10.3f}"
        lines.append(row)
    return "\n".join(lines)
