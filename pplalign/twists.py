"""Twist-learning losses for twisted SMC (Zhao et al. 2024, "Probabilistic inference in language models via
twisted SMC", §4), plus a generic trajectory replay and an optax training loop.

Setting. σ(x) ∝ p₀(x) φ(x) with φ = exp(r/β) over sequences x = x_0..x_{T-1}. A twist ψ_t(x_{≤t}) > 0 defines
the intermediate targets π_t^ψ(x_{≤t}) ∝ p₀(x_{≤t}) ψ_t(x_{≤t}). The optimal twist is

    ψ*_t(x_{≤t}) = E_{p₀}[φ(x) | x_{≤t}],   ψ*_{T-1} = φ,   ψ*_t = Σ_k p₀(k | x_{≤t}) ψ*_{t+1}(x_{≤t}, k),

with which π_t^{ψ*} = σ(x_{≤t}) (the marginal of σ) and every twisted-SMC weight equals Z.

Interface. Each loss takes arrays of log ψ (however produced: a table, an MLP, a twist head on a transformer)
and is differentiable in them; weights are treated as constants. Shapes: B sequences, T steps, K candidate
values per step. ``log_psi`` [B, T] is log ψ_t(x_{≤t}); ``cand_log_psi`` [B, T, K] is log ψ_t(x_{<t}, k) for
every k; ``log_p0`` [B, T, K] is log p₀(k | x_{<t}); ``tokens`` [B, T]; ``log_phi`` [B] = r(x)/β; ``mask``
[B, T] is 1 where step t exists (0 after an end of sequence); ``*log_weights`` [B] are optional
self-normalised sample weights (e.g. SMC output used as approximate σ samples). Sums run over t.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from ._filter_jit import filter_jit

__all__ = [
    "ctl_loss",
    "sixo_loss",
    "dpg_loss",
    "soft_rl_loss",
    "fudge_loss",
    "Trace",
    "trace",
    "trace_batch",
    "METHODS",
    "method_loss",
    "sample_proposal",
    "make_loss_fn",
    "fit",
    "DEFAULT_OPTIMIZER",
    "save_checkpoint",
    "load_checkpoint",
]

sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------------------------------------
# helpers
def _mask(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    return jnp.ones(x.shape[:2], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)


def _sample_weights(n: int, log_weights: Optional[jax.Array]) -> jax.Array:
    """Self-normalised, constant weights [n]; uniform when None."""
    if log_weights is None:
        return jnp.full((n,), 1.0 / n, jnp.float32)
    w = jax.nn.softmax(sg(jnp.asarray(log_weights, jnp.float32)))
    return jnp.where(jnp.isnan(w), 0.0, w)


def _weighted_step_mean(values: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ_t of the weighted batch mean of values [B, T] over the sequences where step t exists."""
    w = weights[:, None] * mask
    norm = jnp.sum(w, axis=0)
    per_t = jnp.sum(w * values, axis=0) / jnp.where(norm > 0, norm, 1.0)
    return jnp.sum(jnp.where(norm > 0, per_t, 0.0))


def _check_rank(name: str, x: jax.Array, rank: int) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}; got shape {x.shape}")
    return x


# --------------------------------------------------------------------------------------------------------
# losses
def ctl_loss(
    log_psi_pos: jax.Array,
    log_psi_neg: jax.Array,
    neg_log_ratio: jax.Array,
    *,
    pos_log_weights: Optional[jax.Array] = None,
    pos_mask: Optional[jax.Array] = None,
    neg_mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Contrastive twist learning (Zhao et al. 2024, §4.1, eq. 12).

    Objective: L(ψ) = Σ_t KL(σ(x_{≤t}) ‖ π_t^ψ(x_{≤t})), π_t^ψ ∝ p₀ ψ_t. Since
    KL = E_σ[log σ_t − log p₀] − E_σ[log ψ_t] + log Z_t^ψ with Z_t^ψ = Σ p₀ ψ_t, its gradient is

        ∇L = Σ_t ( −E_{σ}[∇ log ψ_t(x_{≤t})] + E_{π_t^ψ}[∇ log ψ_t(x_{≤t})] ).

    Positives ``log_psi_pos`` [B, T] are σ samples (optionally weighted by ``pos_log_weights``). Negatives
    ``log_psi_neg`` [N, T] are samples of a proposal q with ``neg_log_ratio`` [N, T] = log p₀(x_{≤t}) −
    log q(x_{≤t}) (cumulative over steps; 0 for samples of p₀); they are reweighted to π_t^ψ by
    w_{t,i} ∝ exp(neg_log_ratio + log ψ_t), and log Z_t^ψ is estimated by log-mean-exp of those weights.

    Returned value: Σ_t [ −Ê_σ log ψ_t + log Ẑ_t^ψ ] = L(ψ) − Σ_t E_σ[log σ_t/p₀] (a ψ-independent constant)
    up to the (downward) bias of log Ẑ_t; its gradient is the CTL gradient above with self-normalised
    negative weights (q is held fixed: the ratio is a constant).
    """
    log_psi_pos = _check_rank("log_psi_pos", log_psi_pos, 2)
    log_psi_neg = _check_rank("log_psi_neg", log_psi_neg, 2)
    if jnp.shape(neg_log_ratio) != log_psi_neg.shape:
        raise ValueError(f"neg_log_ratio must have the shape of log_psi_neg {log_psi_neg.shape}; got {jnp.shape(neg_log_ratio)}")
    pm, nm = _mask(log_psi_pos, pos_mask), _mask(log_psi_neg, neg_mask)
    pos = _weighted_step_mean(log_psi_pos, _sample_weights(log_psi_pos.shape[0], pos_log_weights), pm)
    logits = jnp.where(nm > 0, sg(jnp.asarray(neg_log_ratio, jnp.float32)) + log_psi_neg, -jnp.inf)
    count = jnp.sum(nm, axis=0)
    any_valid = count > 0
    safe_logits = jnp.where(any_valid[None, :], logits, 0.0)
    log_z_t = jax.nn.logsumexp(safe_logits, axis=0) - jnp.log(jnp.where(any_valid, count, 1.0))
    return -pos + jnp.sum(jnp.where(any_valid, log_z_t, 0.0))


def sixo_loss(
    log_psi_pos: jax.Array,
    log_psi_neg: jax.Array,
    *,
    pos_log_weights: Optional[jax.Array] = None,
    neg_log_weights: Optional[jax.Array] = None,
    pos_mask: Optional[jax.Array] = None,
    neg_mask: Optional[jax.Array] = None,
) -> jax.Array:
    """SIXO: twists by density-ratio estimation (Lawson et al. 2022; Zhao et al. 2024, §4.3 baseline).

    At each t, logistic classification with logit ℓ = log ψ_t(x_{≤t}) of prefixes of σ (label 1, ``log_psi_pos``)
    against prefixes of p₀ (label 0, ``log_psi_neg``):

        L = −Σ_t ( E_σ[log s(ℓ)] + E_{p₀}[log s(−ℓ)] ),   s = sigmoid,
        ∇L = −Σ_t ( E_σ[(1 − s(ℓ)) ∇ℓ] − E_{p₀}[s(ℓ) ∇ℓ] ).

    The Bayes-optimal logit is log σ_t(x_{≤t})/p₀(x_{≤t}) = log ψ*_t − log Z: the optimal twist up to a constant,
    which does not change twisted-SMC proposals or normalised weights.
    """
    log_psi_pos = _check_rank("log_psi_pos", log_psi_pos, 2)
    log_psi_neg = _check_rank("log_psi_neg", log_psi_neg, 2)
    pos = _weighted_step_mean(
        jax.nn.log_sigmoid(log_psi_pos), _sample_weights(log_psi_pos.shape[0], pos_log_weights), _mask(log_psi_pos, pos_mask)
    )
    neg = _weighted_step_mean(
        jax.nn.log_sigmoid(-log_psi_neg), _sample_weights(log_psi_neg.shape[0], neg_log_weights), _mask(log_psi_neg, neg_mask)
    )
    return -(pos + neg)


def _proposal_log_probs(cand_log_psi: jax.Array, log_p0: jax.Array) -> jax.Array:
    """log q_t(k) = log p₀(k|·) + log ψ_t(·, k) − log Σ_k' p₀ ψ_t: the locally optimal twisted proposal."""
    joint = log_p0 + cand_log_psi
    return joint - jax.nn.logsumexp(joint, axis=-1, keepdims=True)


def dpg_loss(
    cand_log_psi: jax.Array,
    log_p0: jax.Array,
    tokens: jax.Array,
    *,
    log_weights: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Forward-KL (DPG-style, Khalifa et al. 2021) twist loss on the twisted proposal.

    q^ψ(x) = ∏_t q_t(x_t | x_{<t}),  q_t(k) ∝ p₀(k | x_{<t}) ψ_t(x_{<t}, k). Objective and gradient:

        L = KL(σ ‖ q^ψ) + const = −E_σ[Σ_t log q_t(x_t)],
        ∇L = −E_σ[Σ_t (∇ log ψ_t(x_{≤t}) − E_{q_t}[∇ log ψ_t(x_{<t}, ·)])].

    ``tokens`` [B, T] are σ samples (exact, or samples of q weighted by ``log_weights`` = log p₀φ/q as in DPG's
    importance-weighted form). Minimum: q^ψ = σ, reached iff ψ_t ∝ ψ*_t for every prefix x_{<t}; its value is the
    entropy of σ (exactly 0 gradient at ψ*).
    """
    cand_log_psi = _check_rank("cand_log_psi", cand_log_psi, 3)
    if jnp.shape(log_p0) != cand_log_psi.shape:
        raise ValueError(f"log_p0 must have the shape of cand_log_psi {cand_log_psi.shape}; got {jnp.shape(log_p0)}")
    log_q = _proposal_log_probs(cand_log_psi, jnp.asarray(log_p0, jnp.float32))
    tokens = jnp.asarray(tokens, jnp.int32)
    taken = jnp.take_along_axis(log_q, tokens[..., None], axis=-1)[..., 0]
    return -_weighted_step_mean(taken, _sample_weights(taken.shape[0], log_weights), _mask(taken, mask))


def soft_rl_loss(
    log_psi: jax.Array,
    cand_log_psi: jax.Array,
    log_p0: jax.Array,
    log_phi: jax.Array,
    *,
    log_weights: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Soft-RL twist loss: soft Bellman (soft Q-learning) regression of log ψ (Zhao et al. 2024, RL baseline;
    Mudgal et al. 2024 "controlled decoding").

    With V_t = log ψ_t, the soft Bellman equation of the KL-regularised problem is
    V_t(x_{≤t}) = log Σ_k p₀(k | x_{≤t}) exp V_{t+1}(x_{≤t}, k), V_{T-1} = r/β. The loss regresses each V_t on
    its one-step backup, held constant (a semi-gradient, as in Q-learning):

        L = ½ Σ_t E[(log ψ_t(x_{≤t}) − y_t)²],   y_t = sg[logsumexp_k(log_p0[t+1, k] + cand_log_psi[t+1, k])],

    and y_t = log φ at the last existing step (where ``mask[t+1]`` is 0 or t = T−1);
    ∇L = Σ_t E[(log ψ_t − y_t) ∇ log ψ_t]. The sampling law of the sequences only sets where the equation is
    enforced (p₀, q or σ samples all work). Its unique fixed point is ψ* (loss and gradient exactly 0).
    """
    log_psi = _check_rank("log_psi", log_psi, 2)
    cand_log_psi = _check_rank("cand_log_psi", cand_log_psi, 3)
    m = _mask(log_psi, mask)
    backup = jax.nn.logsumexp(jnp.asarray(log_p0, jnp.float32) + cand_log_psi, axis=-1)  # [B, T]: value of x_{<t}
    next_exists = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1) > 0
    nxt = jnp.concatenate([backup[:, 1:], backup[:, :1]], axis=1)
    y = sg(jnp.where(next_exists, nxt, jnp.asarray(log_phi, jnp.float32)[:, None]))
    return _weighted_step_mean(0.5 * (log_psi - y) ** 2, _sample_weights(log_psi.shape[0], log_weights), m)


def fudge_loss(
    log_psi: jax.Array,
    log_phi: jax.Array,
    *,
    log_weights: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """FUDGE-style Monte Carlo value regression (Yang & Klein 2021): on sequences from p₀ (or from q with
    ``log_weights`` = log p₀/q), regress ψ_t(x_{≤t}) on the final potential φ(x) on the Z scale:

        L = Σ_t E_{p₀}[(ψ_t(x_{≤t}) − φ(x))²] / c²,   ∇L = Σ_t E[2 (ψ_t − φ) ψ_t ∇ log ψ_t] / c²,

    c = max φ in the batch (a constant that keeps exp finite). Minimiser: ψ_t = E_{p₀}[φ | x_{≤t}] = ψ*_t.
    """
    log_psi = _check_rank("log_psi", log_psi, 2)
    log_phi = jnp.asarray(log_phi, jnp.float32)
    c = sg(jnp.max(log_phi))
    diff = jnp.exp(log_psi - c) - jnp.exp(log_phi - c)[:, None]
    return _weighted_step_mean(diff**2, _sample_weights(log_psi.shape[0], log_weights), _mask(log_psi, mask))


# --------------------------------------------------------------------------------------------------------
# replaying a trajectory: every array the losses need, for any Sequential program with Categorical steps
class Trace(NamedTuple):
    """Per-step quantities of one trajectory under a twist (arrays over steps t = 0..T−1).

    log_psi [T]: the twist's log ψ_t(x_{≤t}); cand_log_psi [T, K]: log ψ_t(x_{<t}, k); log_p0 [T, K];
    tokens [T]; log_phi []: r(x)/β; log_q [T]: log q_t(x_t | x_{<t}) of the proposal ``pplalign.smc`` uses
    with this twist (at the last step a twist without ``candidates`` is replaced by the exact potential, as in
    smc); log_g [T]: smc's incremental weights, Σ_t log_g = log p₀(x)φ(x)/q(x).
    """

    log_psi: jax.Array
    cand_log_psi: jax.Array
    log_p0: jax.Array
    tokens: jax.Array
    log_phi: jax.Array
    log_q: jax.Array
    log_g: jax.Array


def _categorical_log_p(d: Any, t) -> jax.Array:
    if not isinstance(d, (dist.CategoricalLogits, dist.CategoricalProbs)):
        raise ValueError(f"twists.trace needs Categorical (finite-support) steps; step {t} gave {type(d).__name__}")
    return jax.nn.log_softmax(d.logits, axis=-1)


def _trace_step(target, twist, state, x, t, log_psi_prev, last: bool):
    base = target.base
    log_p0 = _categorical_log_p(base.transition(state, t), t)
    k = log_p0.shape[-1]
    if twist is None:
        cand = jnp.zeros((k,), jnp.float32)
    elif hasattr(twist, "candidates"):
        cand = jnp.asarray(twist.candidates(state, t), jnp.float32)
    else:
        cand = jax.vmap(lambda v: jnp.asarray(twist(base.update(state, v, t), t), jnp.float32))(jnp.arange(k))
    x = jnp.asarray(x, jnp.int32)
    new_state = base.update(state, x, t)
    # the scores smc's locally optimal proposal uses
    if twist is None:  # bootstrap: proposal p₀, weight φ at the end
        scores = jnp.zeros((k,), jnp.float32)
    elif last and not hasattr(twist, "candidates"):
        scores = jax.vmap(lambda v: target.log_potential(base.output(base.update(state, v, t))))(jnp.arange(k))
    else:
        scores = cand
    joint = log_p0 + scores
    log_norm = jax.nn.logsumexp(joint)
    log_q = joint[x] - log_norm
    log_g = log_norm - log_psi_prev
    log_psi_next = scores[x]
    return new_state, cand, log_p0, log_q, log_g, log_psi_next


def trace(target: Any, twist: Any, reference: jax.Array, key: Optional[jax.Array] = None) -> Trace:
    """Replay the trajectory ``reference`` ([T, ...]: the value drawn at every step) through ``target.base``
    and score it with ``twist`` (None: ψ ≡ 1, bootstrap). One particle; vmap for a batch (:func:`trace_batch`).

    The proposal and weights are those of ``pplalign.smc(target, twist=twist)`` (locally optimal proposal
    q_t ∝ p₀ ψ_t, ψ_{−1} ≡ 1, final correction φ/ψ_{T−1}); for ``twist=None``, q = p₀ and G = φ at the end.
    """
    base = target.base
    steps = target.num_steps
    state = base.init(jax.random.PRNGKey(0) if key is None else key)
    log_psi_prev = jnp.zeros((), jnp.float32)

    def body(carry, t):
        state, lp = carry
        x = jax.tree_util.tree_map(lambda r: r[t], reference)
        new_state, cand, log_p0, log_q, log_g, lp_next = _trace_step(target, twist, state, x, t, lp, last=False)
        return (new_state, lp_next), (cand, log_p0, log_q, log_g)

    (state, log_psi_prev), (cand, log_p0, log_q, log_g) = jax.lax.scan(
        body, (state, log_psi_prev), jnp.arange(steps - 1)
    )
    t_last = jnp.asarray(steps - 1)
    x_last = jax.tree_util.tree_map(lambda r: r[steps - 1], reference)
    final, cand_l, log_p0_l, log_q_l, log_g_l, lp_last = _trace_step(target, twist, state, x_last, t_last, log_psi_prev, True)
    log_phi = jnp.asarray(target.log_potential(base.output(final)), jnp.float32)
    log_g_l = log_g_l + log_phi - lp_last  # the final correction φ/ψ_{T−1} (φ/1 for bootstrap)
    cat = lambda a, b: jnp.concatenate([a, b[None]], axis=0)
    cand, log_p0 = cat(cand, cand_l), cat(log_p0, log_p0_l)
    tokens = jnp.asarray(reference, jnp.int32)
    log_psi = jnp.take_along_axis(cand, tokens[:, None], axis=-1)[:, 0]
    return Trace(log_psi, cand, log_p0, tokens, log_phi, cat(log_q, log_q_l), cat(log_g, log_g_l))


def _trace_batch(target: Any, twist: Any, references: jax.Array) -> Trace:
    return jax.vmap(lambda r: trace(target, twist, r))(references)


# Compiled once per (program, twist) type; arrays (twist parameters, the program's tables) are arguments,
# never closure constants. Inside a caller's jit/grad it simply inlines.
trace_batch = filter_jit(_trace_batch)
trace_batch.__doc__ = """:func:`trace` vmapped over a leading batch axis of ``references`` [B, T, ...]; compiled."""


# --------------------------------------------------------------------------------------------------------
# method = which samples + which loss
METHODS = ("ctl", "sixo", "dpg", "soft_rl", "fudge")


def sample_proposal(key: jax.Array, target: Any, twist: Any, num: int) -> jax.Array:
    """``num`` independent trajectories of the twisted proposal q^ψ (twisted SMC without resampling; p₀ when
    ``twist`` is None). Returns the programs' outputs (token sequences for a language model)."""
    from .smc import smc

    return smc(key, target, num, twist=twist, ess_threshold=0.0).samples


def method_loss(
    method: str,
    target: Any,
    twist: Any,
    sigma_refs: jax.Array,
    other_refs: Optional[jax.Array] = None,
    *,
    sigma_log_weights: Optional[jax.Array] = None,
) -> jax.Array:
    """The loss of ``method`` for ``twist`` on given samples (references: [B, T] values per step).

    ``sigma_refs``: samples of σ (ctl, sixo, dpg); ``other_refs``: for ctl samples of the twisted proposal
    q^ψ of the *current* twist, for sixo and fudge samples of p₀, for soft_rl any sequences (q^ψ samples
    on-policy). ``sigma_log_weights`` weights approximate σ samples (e.g. SMC output).
    """
    if method not in METHODS:
        raise ValueError(f"unknown twist-learning method {method!r}; choose one of {METHODS}")
    if method == "dpg":
        tr = trace_batch(target, twist, sigma_refs)
        return dpg_loss(tr.cand_log_psi, tr.log_p0, tr.tokens, log_weights=sigma_log_weights)
    if other_refs is None:
        raise ValueError(f"method {method!r} needs other_refs (samples of q or p₀)")
    if method == "ctl":
        pos = trace_batch(target, twist, sigma_refs)
        neg = trace_batch(target, twist, other_refs)
        # log p₀(x_{≤t}) − log q(x_{≤t}), cumulative; ctl_loss holds it constant (q is the sampling law)
        taken_p0 = jnp.take_along_axis(neg.log_p0, neg.tokens[..., None], axis=-1)[..., 0]
        ratio = jnp.cumsum(taken_p0 - neg.log_q, axis=1)
        return ctl_loss(pos.log_psi, neg.log_psi, ratio, pos_log_weights=sigma_log_weights)
    if method == "sixo":
        pos = trace_batch(target, twist, sigma_refs)
        neg = trace_batch(target, twist, other_refs)
        return sixo_loss(pos.log_psi, neg.log_psi, pos_log_weights=sigma_log_weights)
    tr = trace_batch(target, twist, other_refs)
    if method == "soft_rl":
        return soft_rl_loss(tr.log_psi, tr.cand_log_psi, tr.log_p0, tr.log_phi)
    return fudge_loss(tr.log_psi, tr.log_phi)


def make_loss_fn(
    method: str,
    target: Any,
    sample_sigma: Callable[[jax.Array, int], Any],
    *,
    batch_size: int = 64,
    num_negatives: int = 64,
) -> Callable[[Any, jax.Array], jax.Array]:
    """``loss_fn(twist, key)`` drawing a fresh batch each call: ``sample_sigma(key, n)`` gives σ samples
    (exact on a testbed, or ``(refs, log_weights)`` from SMC); negatives come from the current twist's
    proposal (ctl, soft_rl) or from p₀ (sixo, fudge)."""
    if method not in METHODS:
        raise ValueError(f"unknown twist-learning method {method!r}; choose one of {METHODS}")

    def loss_fn(twist, key):
        k_pos, k_neg = jax.random.split(key)
        pos = sample_sigma(k_pos, batch_size)
        pos, pos_lw = pos if isinstance(pos, tuple) else (pos, None)
        other = None
        if method in ("ctl", "soft_rl"):
            other = sample_proposal(k_neg, target, sg(twist), num_negatives)
        elif method in ("sixo", "fudge"):
            other = sample_proposal(k_neg, target, None, num_negatives)
        return method_loss(method, target, twist, pos, other, sigma_log_weights=pos_lw)

    return loss_fn


# --------------------------------------------------------------------------------------------------------
# training: optax, one compiled step, tqdm, .npz checkpoints that resume
def save_checkpoint(path: str, tree: Any, step: int, history: np.ndarray) -> None:
    """Write the leaves of ``tree`` (parameters and optimiser state), the step and the loss history; atomic."""
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    tmp = path + ".tmp.npz"
    np.savez(tmp, step=np.asarray(step), history=np.asarray(history, np.float32), **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str, like: Any) -> tuple[Any, int, np.ndarray]:
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``like``; a clear
    ValueError if the shapes do not match."""
    data = np.load(path)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    n = sum(1 for k in data.files if k.startswith("leaf_"))
    if n != len(leaves):
        raise ValueError(f"checkpoint {path} has {n} arrays; the model and optimiser state have {len(leaves)}")
    new = []
    for i, leaf in enumerate(leaves):
        arr = data[f"leaf_{i}"]
        if arr.shape != np.shape(leaf):
            raise ValueError(f"checkpoint {path}: array {i} has shape {arr.shape}, expected {np.shape(leaf)}")
        new.append(jnp.asarray(arr, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, new), int(data["step"]), np.asarray(data["history"])


DEFAULT_OPTIMIZER = optax.adam(1e-2)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(loss_fn, optimizer, params, opt_state, key, step):
    """One optimiser step; compiled once per (loss_fn, optimizer) pair and reused across :func:`fit` calls."""
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, step))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def fit(
    loss_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    key: jax.Array,
    num_steps: int,
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    description: str = "twist",
) -> tuple[Any, np.ndarray]:
    """Minimise ``loss_fn(params, key)`` with optax; one compiled step, step s uses ``fold_in(key, s)`` so an
    interrupted run resumed from ``checkpoint`` (an ``.npz`` path) continues exactly where it stopped.

    ``params`` is any pytree with array leaves (a twist model). Returns (params, loss history [num_steps]).
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0; got {num_steps}")
    optimizer = DEFAULT_OPTIMIZER if optimizer is None else optimizer
    opt_state = optimizer.init(params)
    start, history = 0, np.zeros((0,), np.float32)
    if checkpoint is not None and os.path.exists(checkpoint):
        (params, opt_state), start, history = load_checkpoint(checkpoint, (params, opt_state))
    train_step = functools.partial(_train_step, loss_fn, optimizer)

    losses = list(history[:start])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=description, leave=False)
    for step in range(start, num_steps):
        params, opt_state, loss = train_step(params, opt_state, key, jnp.asarray(step, jnp.int32))
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == num_steps):
            save_checkpoint(checkpoint, (params, opt_state), step + 1, np.asarray(losses))
    if bar is not None:
        bar.close()
    return params, np.asarray(losses, np.float32)
