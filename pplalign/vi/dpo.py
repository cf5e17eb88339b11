"""Direct preference optimisation (DPO; Rafailov et al. 2023), at the level of reasoning steps as in MCTS-DPO
(Xie et al. 2024).

The KL-regularised RL problem max_π E_π[r] − β·KL(π‖π_ref) has the optimum π*(y|x) = π_ref(y|x)·exp(r(x,y)/β)/Z(x)
(the tilted target of this project), so the reward is a function of the optimal policy,

    r(x, y) = β·log π*(y|x)/π_ref(y|x) + β·log Z(x).

Under the Bradley–Terry model of preferences, P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), Z(x) cancels and the
maximum likelihood of observed pairs (x, y_w, y_l) becomes a loss on the policy alone:

    L(π) = −E_{(x, y_w, y_l)} log σ(h),    h = β·[log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)],

with gradient ∇L = −β·E[σ(−h)·(∇log π(y_w|x) − ∇log π(y_l|x))]: pairs the policy already orders well (h ≫ 0)
stop pulling. Step level (Xie et al. 2024): x is the problem with the solution's prefix x_{<t}, y_w and y_l two
candidate next *steps* whose MCTS values differ, and log π(y|x) = Σ_{s ∈ step} log π(x_s | x_{<s}) sums the
policy's token log-probabilities over the step only.

Optimum on a two-option problem. If every pair compares options a and b and a wins a fraction q of them, the
population loss −q log σ(h) − (1 − q) log σ(−h) is minimised where σ(h) = q, i.e.

    β·[log π(a)/π_ref(a) − log π(b)/π_ref(b)] = logit(q),     π(a)/π(b) = π_ref(a)/π_ref(b) · (q/(1−q))^{1/β},

the tilted policy π_ref·exp(r/β) with r(a) − r(b) = logit(q) (``tests/test_mcts_dpo.py`` checks this).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["dpo_loss", "dpo_logits", "masked_log_prob"]


def _check_beta(beta) -> None:
    if not isinstance(beta, jax.core.Tracer) and not float(beta) > 0:
        raise ValueError(f"the DPO temperature beta must be > 0; got {beta}")


def dpo_logits(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta) -> jax.Array:
    """h = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))], one per pair: the Bradley–Terry
    logit of the implicit rewards (h > 0: the policy prefers the chosen step more than the reference does)."""
    _check_beta(beta)
    arrays = [jnp.asarray(a) for a in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"the four log-prob arrays must have one shape; got {[a.shape for a in arrays]}")
    pc, pr, rc, rr = arrays
    return beta * ((pc - rc) - (pr - rr))


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta,
             weights: Optional[jax.Array] = None) -> jax.Array:
    """The DPO loss −Σ_m w_m log σ(h_m) / Σ_m w_m (:func:`dpo_logits`; weights default to 1). The reference
    log-probs are constants (a stop-gradient is applied), so only the policy's arguments carry gradients."""
    h = dpo_logits(policy_chosen, policy_rejected, jax.lax.stop_gradient(reference_chosen),
                   jax.lax.stop_gradient(reference_rejected), beta)
    nll = jax.nn.softplus(-h)  # −log σ(h), stable for large |h|
    if weights is None:
        return jnp.mean(nll)
    weights = jnp.asarray(weights, nll.dtype)
    if weights.shape != nll.shape:
        raise ValueError(f"weights must have the pairs' shape {nll.shape}; got {weights.shape}")
    return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1e-12)


def masked_log_prob(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """[...] Σ_s mask_s·log softmax(logits_s)[targets_s] over the last axis of positions: the log-probability
    of the masked tokens (a step) given everything before them. logits [..., S, V]; targets, mask [..., S]."""
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"logits {logits.shape}, targets {targets.shape} and mask {mask.shape} do not match")
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, lp, 0.0), axis=-1)
