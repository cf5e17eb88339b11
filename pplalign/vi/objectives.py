"""Variational objectives toward a tilted target σ(x) = p₀(x)·exp(r(x)/β)/Z, as losses for :func:`fit`.

Write p̃(x) = p₀(x)·exp(r(x)/β) (unnormalised σ) and w(x) = p̃(x)/q_θ(x).

* ELBO (reverse KL):     L(θ) = E_q[log w] = log Z − KL(q‖σ).
* IWAE (Burda et al. 2016): L_K = E[log (1/K) Σ_k w(x_k)], x_k ~ q iid; log Z ≥ L_K ≥ L.
* Rényi-α (Li & Turner 2016): L_α = 1/(1−α) · log E_q[w^{1−α}] (α → 1: ELBO; α = 0: log Z). With K draws
  its Monte Carlo form 1/(1−α) log (1/K) Σ_k w_k^{1−α} is a bound for α ≥ 0 (α = 0: IWAE); with
  ``estimator="enum"`` the exact L_α is used.
* forward KL / DPG (Khalifa et al. 2021; Go et al. 2023): KL(σ‖q) = E_σ[log σ − log q], minimised by
  the cross-entropy −E_σ[log q_θ(x)], whose σ-expectation is estimated by weighted samples: self-normalised
  importance sampling from q itself (on-policy DPG), from p₀ (the original DPG), from any pplalign sampler
  (e.g. twisted SMC particles), or exactly by enumeration.
* KL-regularised RL (Korbak et al. 2022): J(θ) = E_q[r] − β·KL(q‖p₀) = E_q[r − β log(q/p₀)]
  = β·E_q[log p₀ + r/β − log q] = β·ELBO(θ) — the ELBO toward the *unnormalised* p̃, i.e.
  β·(ELBO_σ + log Z) with the const β log Z, as J = β log Z − β·KL(q‖σ). So its maximiser is σ and its maximum
  is β log Z. β = 0 is pure reward maximisation E_q[r], whose maximiser is a point mass (entropy → 0).

Every objective returns an :class:`Objective`: ``objective(params, key) -> (loss, terms)`` where ``loss``
is the surrogate to *minimise* (its gradient is the chosen estimator's) and ``terms`` names the pieces
(reward, log p₀, log q, ...), so a non-finite loss can be traced to the term that caused it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..particles import Particles
from ..programs import Tilted, validate_beta
from . import estimators as est
from .families import sequence_log_prob, vocab_size_of

__all__ = [
    "Objective",
    "elbo",
    "iwae",
    "renyi",
    "forward_kl",
    "dpg",
    "kl_regularised_rl",
    "reward_maximisation",
    "check_support",
    "exact_summary",
]


class Objective:
    """A loss ``(params, key) -> (loss, terms)`` plus what :func:`fit` needs to check it."""

    def __init__(self, name: str, fn: Callable, family: Any, target: Any, direction: str):
        self.name = name
        self.fn = fn
        self.family = family
        self.target = target
        self.direction = direction  # "reverse": q must stay inside supp σ; "forward": q must cover supp σ

    def __call__(self, params: Any, key: jax.Array):
        return self.fn(params, key)

    def check(self, params: Any) -> None:
        """Runtime support check on a finite support (see :func:`check_support`)."""
        check_support(self.family, self.target, params=params, direction=self.direction)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


# --- the target's log density ------------------------------------------------------------------------

def _flat(x: Any) -> tuple[Any, tuple]:
    """Flatten any leading [n, K] axes of a batch of sequences to [n·K]; returns (flat, lead shape)."""
    leaf = jax.tree_util.tree_leaves(x)[0]
    lead = leaf.shape[:-1]  # events are vectors: a token sequence [T] or a point in R^d
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[len(lead):]), x)
    return flat, lead


def target_terms(target: Any, x: Any) -> dict:
    """{"log_p0": [n], "reward": [n]} for a batch x [n, ...] (or [n, K, ...])."""
    flat, lead = _flat(x)
    if isinstance(target, Tilted):
        log_p0 = sequence_log_prob(target.base, flat)
        reward = jax.vmap(target.reward)(flat)
    elif callable(target):
        log_p0 = jax.vmap(target)(flat)
        reward = jnp.zeros_like(log_p0)
    else:
        raise ValueError(
            f"target must be pplalign.tilt(base, reward, beta) or a log-density function x -> scalar; got {type(target).__name__}"
        )
    return {"log_p0": log_p0.reshape(lead), "reward": jnp.asarray(reward, jnp.float32).reshape(lead)}


def _beta(target: Any) -> jax.Array:
    return target.beta if isinstance(target, Tilted) else jnp.asarray(1.0)


def _log_tilde(target: Any, terms: dict, beta=None) -> jax.Array:
    b = _beta(target) if beta is None else beta
    return terms["log_p0"] + terms["reward"] / b


def _check_reparam(target: Any, xs: Any) -> None:
    if isinstance(target, Tilted):
        fns = {
            f"reward {getattr(target.reward, '__qualname__', type(target.reward).__name__)!r}": target.reward,
            "base log-density log p₀": lambda x: sequence_log_prob(target.base, x[None])[0],
        }
    else:
        fns = {"target log-density": target}
    est.check_reparam_differentiable(fns, xs)


# --- support ------------------------------------------------------------------------------------------

def check_support(family: Any, target: Any, *, params: Any = None, direction: str = "reverse") -> None:
    """Fail early when q's support and σ's do not fit.

    Structurally: a sequence family must have the target's number of steps and vocabulary. With ``params``
    and a finite support: for the forward KL (DPG) every x with σ(x) > 0 needs q(x) > 0 (else KL(σ‖q) = ∞);
    for the reverse KL every x with q(x) > 0 needs σ(x) > 0 (else the ELBO is −∞).
    """
    if isinstance(target, Tilted) and hasattr(family, "num_steps"):
        if family.num_steps != target.num_steps:
            raise ValueError(
                f"support mismatch: the variational family draws {family.num_steps} steps, the target has {target.num_steps}"
            )
        v_target = vocab_size_of(target.base)
        v_family = getattr(family, "vocab_size", None)
        if v_target is not None and v_family is not None and v_target != v_family:
            what = (
                f"q never proposes tokens {v_family}..{v_target - 1}, which σ can produce (KL(σ‖q) = ∞)"
                if v_family < v_target
                else f"q proposes tokens {v_target}..{v_family - 1}, outside σ's support (ELBO = −∞)"
            )
            raise ValueError(f"support mismatch: the family has {v_family} values per step, the target {v_target}: {what}")
    if params is None or not hasattr(family, "support") or not isinstance(target, Tilted):
        return
    try:
        xs = family.support()
    except ValueError:
        return
    lq = family.log_prob(params, xs)
    lt = _log_tilde(target, target_terms(target, xs))
    if direction == "forward":
        bad = jnp.isfinite(lt) & ~jnp.isfinite(lq)
        if bool(jnp.any(bad)):
            raise ValueError(
                f"support mismatch: q gives probability 0 to {int(jnp.sum(bad))} values that σ can produce "
                f"(e.g. {xs[int(jnp.argmax(bad))].tolist()}); KL(σ‖q) is infinite. Give q full support."
            )
    else:
        bad = jnp.isfinite(lq) & ~jnp.isfinite(lt)
        if bool(jnp.any(bad)):
            raise ValueError(
                f"support mismatch: q puts mass on {int(jnp.sum(bad))} values where σ is 0 "
                f"(e.g. {xs[int(jnp.argmax(bad))].tolist()}); the ELBO is −∞. Restrict q to σ's support."
            )


# --- objectives ---------------------------------------------------------------------------------------

def _prepare(family, target, estimator, num_samples):
    est.check_estimator(estimator)
    if isinstance(target, Tilted):
        validate_beta(target.beta)
    check_support(family, target)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")


def elbo(family: Any, target: Any, *, num_samples: int = 32, estimator: str = "reinforce_loo") -> Objective:
    """Loss −ELBO = −E_q[log p̃(x) − log q_θ(x)] = KL(q‖σ) − log Z."""
    _prepare(family, target, estimator, num_samples)
    checked = []

    def fn(params, key):
        def f(p, x):
            terms = target_terms(target, x)
            return _log_tilde(target, terms) - family.log_prob(p, x)

        if estimator == "reparam" and not checked and hasattr(family, "rsample"):
            _check_reparam(target, jax.lax.stop_gradient(family.rsample(params, key, 1)))
            checked.append(True)
        e = est.estimate(f, family, params, key, num_samples, estimator)
        terms = target_terms(target, e.samples)
        lq = family.log_prob(jax.lax.stop_gradient(params), e.samples)
        avg = lambda v: jnp.sum(jnp.where(e.weights > 0, e.weights * v, 0.0))
        aux = {"elbo": e.value, "log_p0": avg(terms["log_p0"]), "reward": avg(terms["reward"]), "log_q": avg(lq)}
        return -e.surrogate, jax.lax.stop_gradient(aux)

    return Objective("elbo", fn, family, target, "reverse")


def kl_regularised_rl(
    family: Any, target: Tilted, *, beta: Any = None, num_samples: int = 32, estimator: str = "sequence_reinforce"
) -> Objective:
    """Loss −J(θ), J = E_q[r(x)] − β·KL(q‖p₀) (Korbak et al. 2022), β from the target unless given.

    J = β·E_q[log p̃ − log q] = β·ELBO (toward the unnormalised p̃) = β log Z − β·KL(q‖σ): RL with a KL
    penalty is variational inference, and its optimum is σ. ``beta=0`` is pure reward maximisation.
    """
    if not isinstance(target, Tilted):
        raise ValueError("kl_regularised_rl needs target = pplalign.tilt(base, reward, beta) (a base and a reward)")
    b = target.beta if beta is None else jnp.asarray(beta, jnp.float32)
    if beta is not None and (not math.isfinite(float(beta)) or float(beta) < 0):
        raise ValueError(f"beta must be finite and >= 0 (0: pure reward maximisation); got {beta}")
    _prepare(family, target, estimator, num_samples)

    def fn(params, key):
        def f(p, x):
            terms = target_terms(target, x)
            return terms["reward"] - b * (family.log_prob(p, x) - terms["log_p0"])

        e = est.estimate(f, family, params, key, num_samples, estimator)
        terms = target_terms(target, e.samples)
        lq = family.log_prob(jax.lax.stop_gradient(params), e.samples)
        avg = lambda v: jnp.sum(jnp.where(e.weights > 0, e.weights * v, 0.0))
        aux = {"objective": e.value, "reward": avg(terms["reward"]), "kl_q_p0": avg(lq - terms["log_p0"])}
        return -e.surrogate, jax.lax.stop_gradient(aux)

    return Objective("kl_regularised_rl", fn, family, target, "reverse")


def reward_maximisation(family: Any, target: Tilted, *, num_samples: int = 32, estimator: str = "sequence_reinforce") -> Objective:
    """Loss −E_q[r]: the β = 0 end of :func:`kl_regularised_rl` (no KL anchor; the optimum is a point mass)."""
    return kl_regularised_rl(family, target, beta=0.0, num_samples=num_samples, estimator=estimator)


def renyi(
    family: Any, target: Any, alpha: float, *, num_particles: int = 8, num_samples: int = 8, estimator: str = "reinforce_loo"
) -> Objective:
    """Loss −L_α with L_α = 1/(1−α)·log E_q[w^{1−α}] (variational Rényi bound, Li & Turner 2016).

    Sampled: each of ``num_samples`` terms is 1/(1−α) log (1/K) Σ_k w_k^{1−α} over K = ``num_particles``
    draws. ``estimator="enum"``: the exact L_α and its exact gradient over the finite support.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha == 1.0:
        raise ValueError(f"alpha must be finite and != 1 (alpha → 1 is the ELBO: use vi.elbo); got {alpha}")
    if estimator == "sequence_reinforce":
        raise ValueError(
            "sequence_reinforce drops the pathwise term, which is unbiased only when f depends on θ through "
            "−c·log q (ELBO, KL-regularised RL); use 'reinforce_loo' for Rényi/IWAE bounds"
        )
    _prepare(family, target, estimator, num_samples)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1; got {num_particles!r}")
    one_minus = 1.0 - alpha

    def fn(params, key):
        if estimator == "enum":
            xs = family.support()
            lq = family.log_prob(params, xs)
            log_w = _log_tilde(target, target_terms(target, xs)) - lq
            inner = jnp.where(jnp.isfinite(lq), lq + one_minus * log_w, -jnp.inf)
            value = jax.nn.logsumexp(inner) / one_minus
            return -value, {"renyi": jax.lax.stop_gradient(value)}

        def f(p, x):
            flat, lead = _flat(x)
            log_w = _log_tilde(target, target_terms(target, flat)) - family.log_prob(p, flat)
            log_w = log_w.reshape(lead)
            return (jax.nn.logsumexp(one_minus * log_w, axis=-1) - math.log(num_particles)) / one_minus

        e = est.estimate(f, family, params, key, num_samples, estimator, group=num_particles)
        return -e.surrogate, {"renyi": e.value}

    return Objective(f"renyi_{alpha:g}", fn, family, target, "reverse")


def iwae(family: Any, target: Any, *, num_particles: int = 8, num_samples: int = 8, estimator: str = "reinforce_loo") -> Objective:
    """Loss −L_K, L_K = E[log (1/K) Σ_k w(x_k)] (Burda et al. 2016): the Rényi bound at α = 0."""
    if estimator == "enum":
        raise ValueError("the IWAE bound with K draws has no finite enumeration here; use renyi(alpha=0, estimator='enum') for log Z")
    obj = renyi(family, target, 0.0, num_particles=num_particles, num_samples=num_samples, estimator=estimator)
    inner = obj.fn

    def fn(params, key):
        loss, aux = inner(params, key)
        return loss, {"iwae": aux["renyi"]}

    return Objective(f"iwae_{num_particles}", fn, family, target, "reverse")


def forward_kl(
    family: Any, target: Any, *, sampler: Any = "q", num_samples: int = 64
) -> Objective:
    """Loss = cross-entropy −Σ_i ŵ_i log q_θ(x_i) ≈ KL(σ‖q) − H(σ) (distributional policy gradient).

    ``sampler`` says where the weighted σ-samples (x_i, ŵ_i) come from:
      "q":     x_i ~ q_θ (stop-gradient), ŵ ∝ p̃/q self-normalised (on-policy DPG; Go et al. 2023);
      "exact": every x in ``family.support()`` with ŵ = σ(x) (enumeration; exact gradient);
      a function key -> :class:`pplalign.Particles` (e.g. ``lambda k: pplalign.smc(k, target, 256, twist=ψ)``
      or ``pplalign.importance_sampling`` from p₀, the original DPG of Khalifa et al. 2021): its samples and
      normalised weights.
    Self-normalised estimates are consistent, biased at O(1/N).
    """
    if isinstance(target, Tilted):
        validate_beta(target.beta)
    check_support(family, target)
    if not (sampler in ("q", "exact") or callable(sampler)):
        raise ValueError(f"sampler must be 'q', 'exact' or a function key -> Particles; got {sampler!r}")

    def fn(params, key):
        if sampler == "exact":
            xs = family.support()
            w = jax.nn.softmax(_log_tilde(target, target_terms(target, xs)))
        elif sampler == "q":
            xs = jax.lax.stop_gradient(family.sample(params, key, num_samples))
            log_w = _log_tilde(target, target_terms(target, xs)) - family.log_prob(jax.lax.stop_gradient(params), xs)
            w = jax.nn.softmax(log_w)
        else:
            particles = sampler(key)
            if not isinstance(particles, Particles):
                raise ValueError(f"sampler must return pplalign.Particles; got {type(particles).__name__}")
            xs, w = particles.samples, particles.normalized_weights
        w = jax.lax.stop_gradient(w)
        lq = family.log_prob(params, xs)
        # q(x) = 0 where σ(x) > 0 makes KL(σ‖q) infinite: the loss becomes +inf and fit names "log_q".
        ce_terms = jnp.where(w > 0, -w * lq, 0.0)
        loss = jnp.sum(ce_terms)
        aux = {"cross_entropy": loss, "log_q": jnp.sum(jnp.where(w > 0, w * lq, 0.0)), "ess": 1.0 / jnp.sum(w * w)}
        return loss, jax.lax.stop_gradient(aux)

    return Objective("forward_kl", fn, family, target, "forward")


dpg = forward_kl


# --- exact answers on a finite support ------------------------------------------------------------------

def exact_summary(family: Any, params: Any, target: Tilted) -> dict:
    """KL(q‖σ), KL(σ‖q), H(q), H(σ), log Z, E_q[r], E_σ[r], KL(q‖p₀) by enumeration of ``family.support()``."""
    xs = family.support()
    lq = family.log_prob(params, xs)
    terms = target_terms(target, xs)
    lt = _log_tilde(target, terms)
    log_Z = jax.nn.logsumexp(lt)
    ls = lt - log_Z
    q, s = jnp.exp(lq), jnp.exp(ls)
    safe = lambda p, v: jnp.sum(jnp.where(p > 0, p * v, 0.0))
    return {
        "kl_q_sigma": safe(q, lq - ls),
        "kl_sigma_q": safe(s, ls - lq),
        "entropy_q": -safe(q, lq),
        "entropy_sigma": -safe(s, ls),
        "log_Z": log_Z,
        "reward_q": safe(q, terms["reward"]),
        "reward_sigma": safe(s, terms["reward"]),
        "kl_q_p0": safe(q, lq - terms["log_p0"]),
    }
