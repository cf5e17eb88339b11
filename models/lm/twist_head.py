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
from .tokenizer import EOS
from .transformer import Transformer

__all__ = ["TwistHead", "HeadTwist", "head_arrays", "head_loss", "fit_head", "save_head", "load_head"]


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


def head_arrays(model: Transformer, head: TwistHead, prompt: jax.Array, tokens: jax.Array, eos_ids=(EOS,)):
    """Arrays for ``pplalign.twists`` losses from one forward pass over prompt + continuation.

    Args: prompt [P] ids (no padding), tokens [B, T] continuations (pad after an end token), eos_ids the end
    tokens (``LMProgram.eos_ids``: a Hugging Face model's own).
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
    is_end = jnp.isin(tokens, jnp.asarray(eos_ids))
    ended = jnp.cumsum(is_end, axis=1) - is_end
    mask = (ended == 0).astype(jnp.float32)
    return log_psi, cand, log_p0, mask


def head_loss(method: str, model: Transformer, head: TwistHead, prompt: jax.Array, tokens: jax.Array,
              log_phi: jax.Array, eos_ids=(EOS,)) -> jax.Array:
    """One twist-learning loss of ``pplalign.twists`` on a batch of p₀ samples ``tokens`` [B, T].

    σ-samples are the same p₀ samples self-normalised by exp(log φ) (importance weights p₀φ/p₀): CTL's
    positives, SIXO's positives, DPG's weighted samples; CTL's and SIXO's negatives are the p₀ samples.
    ``method`` ∈ {"ctl", "sixo", "dpg", "soft_rl", "fudge"}."""
    from pplalign import twists

    log_psi, cand, log_p0, mask = head_arrays(model, head, prompt, tokens, eos_ids)
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
             steps: int = 100, batch: int = 64, lr: float = 1e-2, progress: bool = False,
             checkpoint: Optional[str] = None, checkpoint_every: int = 50):
    """Train ``head`` (the LM frozen) on fresh p₀ samples each step; returns (head, losses [steps]).

    Step s draws ``batch`` sequences x ~ p₀(· | prompt) with key ``fold_in(key, s)`` and minimises
    :func:`head_loss` with φ(x) = exp(r(x)/β), self-normalised over the batch as the σ-sample weights. The loop
    is ``pplalign.twists.fit`` (one compiled step, optax Adam, tqdm progress bar); with ``checkpoint`` (an
    ``.npz`` path) the head and optimiser state are saved every ``checkpoint_every`` steps and a call with the
    same arguments resumes from there and reaches the same parameters as an uninterrupted run.

    Args: program — an ``LMProgram`` with one prompt; reward — r(tokens [T]) → []; beta — the tilt temperature.
    """
    import optax

    from pplalign import twists

    from .program import _ancestral_impl

    if method not in ("ctl", "sixo", "dpg", "soft_rl", "fudge"):
        raise ValueError(f"unknown twist loss {method!r}; choose ctl, sixo, dpg, soft_rl or fudge")
    if not (isinstance(steps, int) and steps >= 0 and isinstance(batch, int) and batch >= 2):
        raise ValueError(f"steps must be an int >= 0 and batch an int >= 2; got steps={steps!r}, batch={batch!r}")
    if not float(beta) > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    prompt = program.prompt.tokens[: int(program.prompt.length)]
    graphdef, params = nnx.split(head, nnx.Param)

    def loss_fn(params, key):
        tokens, _ = _ancestral_impl(key, program, batch)
        log_phi = jax.vmap(reward)(tokens) / beta
        if log_phi.shape != (batch,):
            raise ValueError(f"the reward must return a scalar per sequence; got shape {log_phi.shape[1:]}")
        return head_loss(method, program.model, nnx.merge(graphdef, params), prompt, tokens, log_phi,
                         program.eos_ids)

    params, losses = twists.fit(loss_fn, params, key, steps, optimizer=optax.adam(lr), checkpoint=checkpoint,
                                checkpoint_every=checkpoint_every, progress=progress, description=f"twist head ({method})")
    return nnx.merge(graphdef, params), losses


def save_head(path, head: TwistHead, meta: dict) -> None:
    """Write ``head.npz`` (the parameters) and ``head.json`` (``d_model``, ``vocab_size``, ``hidden`` and
    whatever ``meta`` adds: task, loss, β, training log) into the directory ``path``."""
    import json
    from pathlib import Path

    import numpy as np

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    first = head.hidden_layer if head.hidden_layer is not None else head.out
    hidden = head.hidden_layer.kernel.shape[1] if head.hidden_layer is not None else 0
    info = dict(meta, d_model=int(first.kernel.shape[0]), vocab_size=int(head.out.kernel.shape[1]), hidden=int(hidden))
    flat = _flat_params(head)
    tmp = path / "head.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    tmp.replace(path / "head.npz")
    (path / "head.json").write_text(json.dumps(info, indent=1))


def _flat_params(head: TwistHead) -> dict:
    from .checkpoint import _flat_leaves

    return _flat_leaves(nnx.to_pure_dict(nnx.state(head, nnx.Param)))


def load_head(path, *, d_model: Optional[int] = None, vocab_size: Optional[int] = None):
    """(head, meta) from a directory written by :func:`save_head`, or a shipped head's name
    (``"lm_story_twist_toxic_ctl"``). ``d_model`` / ``vocab_size``: the LM the head will read; a head of other
    shapes, or a parameter file that does not match its own ``head.json``, raises ``ValueError``."""
    import json
    from pathlib import Path

    import numpy as np

    from .checkpoint import CHECKPOINT_ROOT, _check_shapes, flat_shapes

    path = Path(path)
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        path = CHECKPOINT_ROOT / str(path)
    if not (path / "head.json").exists() or not (path / "head.npz").exists():
        available = sorted(p.name for p in CHECKPOINT_ROOT.glob("lm_*") if (p / "head.json").exists())
        raise ValueError(f"{path} is not a twist-head checkpoint (needs head.json and head.npz); shipped: {available}")
    meta = json.loads((path / "head.json").read_text())
    for name, want in (("d_model", d_model), ("vocab_size", vocab_size)):
        if want is not None and meta[name] != want:
            raise ValueError(f"twist head {path.name} reads a {name} of {meta[name]}, but the LM has {want}: "
                             "the checkpoint does not match the model configuration")
    head = nnx.eval_shape(lambda: TwistHead(meta["d_model"], meta["vocab_size"], hidden=meta["hidden"], rngs=nnx.Rngs(0)))
    with np.load(path / "head.npz") as data:
        arrays = {k: data[k] for k in data.files}
    _check_shapes(flat_shapes(_flat_params(head)), {k: a.shape for k, a in arrays.items()}, str(path))
    state = nnx.state(head, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def fill(tree, prefix=""):
        return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else jnp.asarray(arrays[f"{prefix}{k}"])
                for k, v in tree.items()}

    nnx.replace_by_pure_dict(state, fill(pure))
    nnx.update(head, state)
    return head, meta
