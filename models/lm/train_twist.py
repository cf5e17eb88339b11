"""Story tasks for twisted SMC, exact target samples by rejection, and the twist-head training script.

Tasks (the shipped story LM ``lm_stories`` is p₀; Zhao et al. 2024, §7 "toxicity" and "infilling"):

* ``toxic`` — σ(x) ∝ p₀(x | "Anna went to the") · p(toxic | x), x = 12 tokens: r(x) = log p(toxic | x) from
  the shipped story classifier, β = 1 (the class-conditional posterior; Z = P(toxic) ≈ 0.12 under p₀).
* ``infill`` — σ(x) ∝ p₀(x | "Anna went to the") · p₀("dragon" | prompt, x), x = 8 tokens without ``<eos>``:
  r(x) = log p₀(c | prompt, x) for the continuation c = "dragon", β = 1, the posterior of the middle given the
  end (Z = p₀(c at position 9) ≈ e^{-5.5}).
* ``positive`` — σ_β(x) ∝ p₀(x | "Anna went to the") · p(positive | x)^{1/β}, x = 16 tokens, the target of
  ``experiments/vi_transformer.py``.

In every task r ≤ 0, so ``exp(r/β) ≤ 1`` and :func:`rejection_sample` draws *exact* σ samples: x ~ p₀, kept
with probability exp(r(x)/β). Its acceptance probability is Z, so the mean of exp(r/β) over all draws is also
an unbiased Monte Carlo estimate of Z (returned with its standard error; the reference log Z of the experiments).

Training (``python -m models.lm.train_twist --task toxic --loss ctl --out DIR``): a linear :class:`TwistHead`
on the frozen LM's final hidden state, fitted by :func:`~models.lm.twist_head.fit_head` (fresh p₀ batches,
φ-weighted as σ samples), tqdm progress, an ``.npz`` training state every ``--save-every`` steps in
``DIR/train_state.npz``; a run interrupted and restarted with the same arguments resumes without losing or
repeating steps. The finished head is written with :func:`~models.lm.twist_head.save_head`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pplalign._filter_jit import filter_jit

from .program import _ancestral_impl
from .tokenizer import EOS

__all__ = ["StoryTask", "TASKS", "build_task", "rejection_sample", "train_head", "head_name"]


@dataclasses.dataclass(frozen=True)
class StoryTask:
    name: str
    prompt: str
    num_steps: int
    kind: str  # "classifier" or "infill"
    beta: float = 1.0
    head: tuple = (3, 2)  # classifier output group (sentiment [0, 3), toxicity [3, 5))
    label: int = 1
    continuation: str = ""


TASKS = {
    "toxic": StoryTask("toxic", "Anna went to the", 12, "classifier", head=(3, 2), label=1),
    "infill": StoryTask("infill", "Anna went to the", 8, "infill", continuation="dragon"),
    "positive": StoryTask("positive", "Anna went to the", 16, "classifier", head=(0, 3), label=2),
}


def head_name(task: str, loss: str, beta: Optional[float] = None) -> str:
    """Directory name of a shipped head: ``lm_story_twist_<task>_<loss>`` (``_b<β>`` when β ≠ the task's)."""
    suffix = "" if beta is None or beta == TASKS[task].beta else f"_b{beta:g}"
    return f"lm_story_twist_{task}_{loss}{suffix}"


def build_task(task: str | StoryTask, lm=None, tok=None, clf=None, *, num_steps: Optional[int] = None):
    """(program, reward, beta) of a task on the shipped (or given) story LM and classifier."""
    from .checkpoint import load_model
    from .program import LMProgram
    from .rewards import ClassifierReward, Infilling

    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown story task {task!r}; choose from {sorted(TASKS)}")
        task = TASKS[task]
    if lm is None:
        lm, tok = load_model("lm_stories")
    steps = num_steps or task.num_steps
    if task.kind == "classifier":
        if clf is None:
            clf, _ = load_model("lm_story_classifier")
        program = LMProgram.from_prompt(lm, task.prompt, steps, tokenizer=tok)
        reward = ClassifierReward.for_program(clf, program, head=task.head, label=task.label)
    elif task.kind == "infill":
        program = LMProgram.from_prompt(lm, task.prompt, steps, tokenizer=tok, banned=[EOS])
        reward = Infilling.for_program(program, tok.encode(task.continuation, bos=False))
    else:
        raise ValueError(f"task kind must be 'classifier' or 'infill'; got {task.kind!r}")
    return program, reward, float(task.beta)


def _draw_impl(key, program, reward, beta, num):
    tokens, _ = _ancestral_impl(key, program, num)
    return tokens, jax.vmap(reward)(tokens) / beta


_draw = filter_jit(_draw_impl)  # arrays traced; the reward's code and ``num`` are compile-time constants


def rejection_sample(key: jax.Array, program, reward, beta: float, num: int, *, batch: int = 512,
                     min_draws: int = 0, max_draws: int = 1_000_000):
    """``num`` exact samples of σ ∝ p₀·exp(r/β) by rejection from p₀, for rewards with r ≤ 0.

    Draw x ~ p₀ in batches of ``batch`` (batch i from ``fold_in(key, i)``) and keep x with probability
    exp(r(x)/β) ≤ 1: the kept draws are i.i.d. σ. At least ``min_draws`` draws are made. Returns
    ``(samples [num, T], info)`` with ``info = {"log_Z", "log_Z_se", "draws", "accept_rate"}``: log of the
    mean of exp(r/β) over every draw (unbiased for Z on its scale) and its delta-method standard error.
    Raises ``ValueError`` if some r(x)/β > 0 (rejection needs a bounded potential) or the budget runs out.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int; got {num!r}")
    kept, log_phis = [], []
    draws, i = 0, 0
    while sum(len(k) for k in kept) < num or draws < min_draws:
        if draws >= max_draws:
            raise ValueError(f"rejection sampling accepted {sum(len(k) for k in kept)} of {num} samples in {draws} "
                             f"draws (acceptance ≈ Z = {np.exp(np.concatenate(log_phis)).mean():.2e}); raise max_draws")
        k_draw, k_acc = jax.random.split(jax.random.fold_in(key, i))
        tokens, log_phi = _draw(k_draw, program, reward, jnp.asarray(beta, jnp.float32), batch)
        log_phi = np.asarray(log_phi)
        if not np.all(np.isfinite(log_phi) | (log_phi == -np.inf)) or np.any(log_phi > 1e-5):
            raise ValueError(f"rejection sampling needs r(x)/β ≤ 0 (finite or −inf); got max {np.nanmax(log_phi):.3g}")
        u = np.asarray(jax.random.uniform(k_acc, (batch,)))
        accept = np.log(u) < log_phi
        kept.append(np.asarray(tokens)[accept])
        log_phis.append(log_phi)
        draws += batch
        i += 1
    phi = np.exp(np.concatenate(log_phis).astype(np.float64))
    z = phi.mean()
    info = dict(log_Z=float(np.log(z)), log_Z_se=float(phi.std(ddof=1) / np.sqrt(phi.size) / z), draws=int(draws),
                accept_rate=float(sum(len(k) for k in kept) / draws))
    return jnp.asarray(np.concatenate(kept)[:num]), info


def train_head(task: str, loss: str, out: str | Path, *, steps: int = 300, batch: int = 128, lr: float = 1e-2,
               seed: int = 0, hidden: int = 0, beta: Optional[float] = None, save_every: int = 50,
               progress: bool = True, stop_after: Optional[int] = None):
    """Train a twist head for ``task`` with ``loss`` and write it to ``out`` (see the module docstring).

    ``stop_after`` stops after that many steps of this call (an interruption, for tests); the training state
    in ``out/train_state.npz`` is kept and the next call resumes from it. Returns (head, losses)."""
    from .twist_head import TwistHead, fit_head, save_head

    if task not in TASKS:
        raise ValueError(f"unknown story task {task!r}; choose from {sorted(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    program, reward, task_beta = build_task(task)
    beta = task_beta if beta is None else float(beta)
    head = TwistHead(program.model.cfg.d_model, program.vocab_size, hidden=hidden, rngs=nnx.Rngs(seed))
    state = out / "train_state.npz"
    todo = steps if stop_after is None else min(steps, _done_steps(state) + stop_after)
    t0 = time.time()
    head, losses = fit_head(jax.random.key(seed), program, head, reward, beta, method=loss, steps=todo, batch=batch,
                            lr=lr, progress=progress, checkpoint=str(state), checkpoint_every=save_every)
    if todo < steps:
        return head, losses
    k = max(1, min(20, len(losses) // 5))
    meta = dict(task=task, loss=loss, beta=beta, prompt=TASKS[task].prompt, num_steps=program.num_steps,
                lm="lm_stories", steps=steps, batch=batch, lr=lr, seed=seed,
                loss_first=float(np.mean(losses[:k])), loss_last=float(np.mean(losses[-k:])),
                train_seconds=round(time.time() - t0, 1))
    save_head(out, head, meta)
    state.unlink(missing_ok=True)
    return head, losses


def _done_steps(state: Path) -> int:
    if not state.exists():
        return 0
    with np.load(state) as data:
        return int(data["step"])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train a twist head for a story task (issue 4).")
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--loss", choices=("ctl", "sixo", "dpg", "soft_rl", "fudge"), required=True)
    ap.add_argument("--out", default=None, help="default: models/checkpoints/lm_story_twist_<task>_<loss>[_b<β>]")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--beta", type=float, default=None, help="default: the task's β")
    ap.add_argument("--hidden", type=int, default=0, help="MLP width (0: a linear head)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    a = ap.parse_args(argv)
    from .checkpoint import CHECKPOINT_ROOT

    out = a.out or CHECKPOINT_ROOT / head_name(a.task, a.loss, a.beta)
    _, losses = train_head(a.task, a.loss, out, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, hidden=a.hidden,
                           beta=a.beta, save_every=a.save_every)
    k = max(1, min(20, len(losses) // 5))
    print(json.dumps({"task": a.task, "loss": a.loss, "out": str(out), "loss_first": float(np.mean(losses[:k])),
                      "loss_last": float(np.mean(losses[-k:]))}))


if __name__ == "__main__":
    main()
