"""A twist head: log ψ_t for every next token in one pass, read off the LM's final hidden state.

For the prefix x_{<t} with final hidden state h_{t-1} (the state that also gives the next-token logits), the
head returns the vector [log ψ_t(x_{<t}, k)]_k over the vocabulary — a linear map or a one-hidden-layer MLP of
h (Zhao et al. 2024, §5: a twist head on the base model's representation). With it twisted SMC proposes from
the locally optimal q_t(k) ∝ p₀(k | x_{<t}) ψ_t(x_{<t}, k) at the cost of one extra D×V product per particle:
the network's forward pass is shared with the base model (the hidden state is already in the LM state).

``HeadTwist`` adapts a head to ``pplalign.smc``: ``candidates(state, t)`` from the state *before* step t, and
``__call__(state, t)`` (log ψ_t of the prefix ending at x_t, scored after ``update``) from the hidden state
that predicted x_t. Finished sequences keep the twist value they had when ``<eos>`` was drawn, so a finished
particle's incremental weight is 1.

Training: :func:`head_arrays` fills the arrays of ``pplalign.twists`` losses (``log_psi``, ``cand_log_psi``,
``log_p0``, ``mask``) for a batch of sequences with one forward pass of the LM and one of the head.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .program import LMState
from .tokenizer import EOS, PAD
from .transformer import Transformer

__all__ = ["TwistHead", "HeadTwist", "head_arrays"]


class TwistHead(nnx.Module):
    """h [.., D] → log ψ [.., V]. ``hidden=0``: linear; otherwise an MLP with one GELU layer.

    The output layer starts at zero, so an untrained head is ψ ≡ 1 (twisted SMC = bootstrap SMC)."""

    def __init__(self, d_model: int, vocab_size: int, *, hidden: int = 0, rngs: nnx.Rngs):
        self.hidden_layer = nnx.Linear(d_model, hidden, rngs=rngs) if hidden else None
        width = hidden or d_model
        self.out = nnx.Linear(width, vocab_size, rngs=rngs, kernel_init=nnx.initializers.zeros)

    def features(self, h):
        return jax.nn.gelu(self.hidden_layer(h)) if self.hidden_layer is not None else h

    def __call__(self, h):
        return self.out(self.features(h))

    def score(self, h, token):
        """log ψ for one token: a dot product, not the full vocabulary."""
        f = self.features(h)
        return f @ self.out.kernel[:, token] + self.out.bias[token]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadTwist:
    """A :class:`TwistHead` as a pplalign twist over an ``LMProgram``'s states."""

    head: TwistHead

    def candidates(self, state: LMState, t) -> jax.Array:
        frozen = self.head.score(state.prev_hidden, jnp.maximum(state.last, 0))
        return jnp.where(state.done, frozen, self.head(state.hidden))

    def __call__(self, state: LMState, t) -> jax.Array:
        return self.head.score(state.prev_hidden, jnp.maximum(state.last, 0))


def head_arrays(model: Transformer, head: TwistHead, prompt: jax.Array, tokens: jax.Array):
    """Arrays for ``pplalign.twists`` losses from one forward pass over prompt + continuation.

    Args: prompt [P] ids (``<bos>`` first, no padding), tokens [B, T] continuations (``<pad>`` after ``<eos>``).
    Returns: (log_psi [B, T], cand_log_psi [B, T, V], log_p0 [B, T, V], mask [B, T]); ``log_p0`` is
    stop-gradiented (the base model is frozen)."""
    b, steps = tokens.shape
    p = prompt.shape[0]
    full = jnp.concatenate([jnp.broadcast_to(prompt, (b, p)), tokens], axis=1)
    logits, hidden = model(full)
    h = jax.lax.stop_gradient(hidden[:, p - 1: p - 1 + steps])  # the state predicting x_t
    log_p0 = jax.lax.stop_gradient(jax.nn.log_softmax(logits[:, p - 1: p - 1 + steps], axis=-1))
    cand = head(h)
    log_psi = jnp.take_along_axis(cand, tokens[..., None], axis=-1)[..., 0]
    # step t exists if no <eos> was drawn before it
    ended = jnp.cumsum(tokens == EOS, axis=1) - (tokens == EOS)
    mask = (ended == 0).astype(jnp.float32)
    return log_psi, cand, log_p0, mask


def head_loss(method: str, model: Transformer, head: TwistHead, prompt: jax.Array, tokens: jax.Array,
              log_phi: jax.Array) -> jax.Array:
    """One twist-learning loss of ``pplalign.twists`` on a batch of p₀ samples ``tokens`` [B, T].

    σ-samples are the same p₀ samples self-normalised by exp(log φ) (importance weights p₀φ/p₀): CTL's
    positives, SIXO's positives, DPG's weighted samples; CTL's and SIXO's negatives are the p₀ samples.
    ``method`` ∈ {"ctl", "sixo", "dpg", "soft_rl", "fudge"}."""
    from pplalign import twists

    log_psi, cand, log_p0, mask = head_arrays(model, head, prompt, tokens)
    if method == "ctl":
        return twists.ctl_loss(log_psi, log_psi, jnp.zeros_like(log_psi), pos_log_weights=log_phi, pos_mask=mask, neg_mask=mask)
    if method == "sixo":
        return twists.sixo_loss(log_psi, log_psi, pos_log_weights=log_phi, pos_mask=mask, neg_mask=mask)
    if method == "dpg":
        return twists.dpg_loss(cand, log_p0, tokens, log_weights=log_phi, mask=mask)
    if method == "soft_rl":
        return twists.soft_rl_loss(log_psi, cand, log_p0, log_phi, mask=mask)
    if method == "fudge":
        return twists.fudge_loss(log_psi, log_phi, mask=mask)
    raise ValueError(f"unknown twist loss {method!r}; choose ctl, sixo, dpg, soft_rl or fudge")


def fit_head(key: jax.Array, program, head: TwistHead, reward, beta: float, *, method: str = "dpg",
             steps: int = 100, batch: int = 64, lr: float = 1e-2, progress: bool = False):
    """Train ``head`` (the LM frozen) on fresh p₀ samples each step; returns (head, losses [steps]).

    Args: program — an ``LMProgram`` with one prompt; reward — r(tokens [T]); beta — the tilt temperature."""
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    from .program import ancestral_sample

    prompt = program.prompt.tokens[: int(program.prompt.length)]
    graphdef, params = nnx.split(head, nnx.Param)
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    @jax.jit
    def update(params, opt_state, tokens):
        log_phi = jax.vmap(reward)(tokens) / beta
        loss_fn = lambda p: head_loss(method, program.model, nnx.merge(graphdef, p), prompt, tokens, log_phi)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for k in tqdm(range(steps), desc=f"twist head ({method})", disable=not progress):
        tokens, _ = ancestral_sample(jax.random.fold_in(key, k), program, batch)
        params, opt_state, loss = update(params, opt_state, tokens)
        losses.append(float(loss))
    return nnx.merge(graphdef, params), np.asarray(losses)
