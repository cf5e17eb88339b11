"""Train the project's small models on the generated corpora (optax, orbax checkpoints, exact resume).

    python -m models.lm.train --task stories --steps 1500 --out models/checkpoints/lm_stories

Tasks: ``stories`` and ``arithmetic`` (language models, next-token cross-entropy), ``story_classifier`` (the
reward model: sentiment (3 classes) and toxicity (2 classes) of the whole story, predicted at *every* prefix,
so one pass scores all prefixes — a FUDGE-style prefix classifier, Yang & Klein 2021) and ``prm`` (the process
reward model: at every prefix of a prompt + partial solution, the probability that no step so far is wrong).

Resuming: the batch at step k is a function of (seed, k) only, and the orbax manager in ``<out>/train_state``
keeps parameters, optimiser state and step, so a run interrupted at any point and started again with the same
arguments reaches bit-for-bit the parameters of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from . import corpora
from .checkpoint import save_model
from .tokenizer import PAD, Tokenizer
from .transformer import LMConfig, Transformer

__all__ = ["TASKS", "Task", "fit", "train", "default_config"]


class Batch(NamedTuple):
    tokens: np.ndarray  # [B, S]
    targets: np.ndarray  # [B, S] next token, or class label per head
    weights: np.ndarray  # [B, S] loss weight per position


class Task(NamedTuple):
    tokenizer: Tokenizer
    num_outputs: Optional[int]  # None: a language model
    heads: tuple  # class counts per head, for classifiers (sum = num_outputs)
    batch: Callable[[np.random.Generator, int, int], Batch]  # (rng, batch_size, seq_len)


def _lm_batch(texts: list[str], tok: Tokenizer, seq_len: int) -> Batch:
    ids = tok.encode_batch(texts, seq_len + 1)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    return Batch(tokens, targets, (targets != PAD).astype(np.float32))


def _stories_lm(rng, b, s):
    return _lm_batch(corpora.sample_stories(rng, b).texts, corpora.story_tokenizer(), s)


def _arith_lm(rng, b, s):
    probs = corpora.sample_problems(rng, b)
    return _lm_batch([p.prompt + " " + corpora.solution_text(p) for p in probs], corpora.arithmetic_tokenizer(), s)


def _story_classifier(rng, b, s):
    tok = corpora.story_tokenizer()
    data = corpora.sample_stories(rng, b)
    tokens = tok.encode_batch(data.texts, s)
    mask = (tokens != PAD).astype(np.float32)
    # later prefixes carry more evidence: weight the loss by position so the full story dominates
    weights = mask * (1.0 + np.arange(s)[None] / 8.0)
    targets = np.stack([np.broadcast_to(data.sentiment[:, None], (b, s)), np.broadcast_to(data.toxic[:, None], (b, s))], -1)
    return Batch(tokens, targets.astype(np.int32), weights)


def corrupt_solution(rng: np.random.Generator, problem) -> tuple[list[str], int]:
    """A solution with (probability ½) one wrong number, propagated as a language model's slip would be;
    returns the words of prompt + solution and the index of the first wrong word (len(words) if none)."""
    prompt = problem.prompt.split()
    words = corpora.solution_text(problem).split()
    first_bad = len(prompt) + len(words)
    if rng.random() < 0.5:
        # the wrong number is a step result (index 4 of a step), or the final answer
        k = int(rng.integers(corpora.NUM_OPS + 1))
        acc = problem.numbers[0]
        values = corpora.solve(problem)
        if k < corpora.NUM_OPS:
            wrong = int((values[k] + rng.integers(1, corpora.MAX_NUMBER)) % corpora.MAX_NUMBER)
            pos = k * corpora.STEP_LEN + 4
            words[pos] = str(wrong)
            acc = wrong
            propagate = rng.random() < 0.7
            for j in range(k + 1, corpora.NUM_OPS):
                op, b = problem.ops[j], problem.numbers[j + 1]
                new = (acc + b if op == "+" else acc - b) % corpora.MAX_NUMBER if propagate else values[j]
                if propagate:
                    words[j * corpora.STEP_LEN] = str(acc)
                words[j * corpora.STEP_LEN + 4] = str(new)
                acc = new
            if propagate:
                words[-1] = str(acc)
        else:
            pos = len(words) - 1
            words[pos] = str(int((values[-1] + rng.integers(1, corpora.MAX_NUMBER)) % corpora.MAX_NUMBER))
        first_bad = len(prompt) + pos
    return prompt + words, first_bad


def _prm(rng, b, s):
    tok = corpora.arithmetic_tokenizer()
    tokens = np.full((b, s), PAD, np.int32)
    targets = np.zeros((b, s, 1), np.int32)
    for i, p in enumerate(corpora.sample_problems(rng, b)):
        words, first_bad = corrupt_solution(rng, p)
        ids = tok.encode(" ".join(words))[:s]  # with <bos> first: word j sits at position j + 1
        tokens[i, : len(ids)] = ids
        targets[i, :, 0] = (np.arange(s) < first_bad + 1).astype(np.int32)
    weights = (tokens != PAD).astype(np.float32)
    return Batch(tokens, targets, weights)


TASKS = {
    "stories": Task(corpora.story_tokenizer(), None, (), _stories_lm),
    "arithmetic": Task(corpora.arithmetic_tokenizer(), None, (), _arith_lm),
    "story_classifier": Task(corpora.story_tokenizer(), 5, (3, 2), _story_classifier),
    "prm": Task(corpora.arithmetic_tokenizer(), 2, (2,), _prm),
}


def default_config(task: str) -> LMConfig:
    vocab = TASKS[task].tokenizer.vocab_size
    if task in ("stories", "story_classifier"):
        return LMConfig(vocab, d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=48)
    return LMConfig(vocab, d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=32)


def _loss(model: Transformer, batch: Batch, heads: tuple):
    logits, _ = model(batch.tokens)
    if not heads:
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
    else:
        nll, start = 0.0, 0
        for h, size in enumerate(heads):
            nll = nll + optax.softmax_cross_entropy_with_integer_labels(logits[..., start:start + size], batch.targets[..., h])
            start += size
    return jnp.sum(nll * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)


def fit(model: Transformer, loss_fn, batches, state_dir: str | Path, *, steps: int, optimizer,
        batch_size: int = 64, seed: int = 0, save_every: int = 200, stop_after: Optional[int] = None,
        progress: bool = True, desc: str = "train", run_config: Optional[dict] = None) -> tuple[Transformer, list[float], bool]:
    """Minimise ``loss_fn(model, batch)`` over the model's parameters with ``optimizer`` (an optax transform),
    the batch at step k being ``batches(default_rng([seed, k]), batch_size, model.cfg.max_len)``.

    The training state (parameters, optimizer state, step) is checkpointed with orbax to ``state_dir`` every
    ``save_every`` steps and when the call stops early; a later call with the same ``state_dir`` resumes from
    it and, the batches being a function of (seed, k), continues as if never stopped. ``stop_after`` stops
    after that many steps of this call (an interruption, for tests). Returns (model, this call's losses,
    finished). The state is kept after a finished run too: the caller deletes ``state_dir`` once it has
    exported the model, so that a crash in between loses nothing.

    ``run_config`` (JSON-able: steps, seed, batch size, data settings…) is written next to the state; a resume
    whose ``run_config`` differs raises ``ValueError`` instead of silently continuing another run."""
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = optimizer.init(params)
    state_dir = Path(state_dir).resolve()
    stamp = {"steps": int(steps), "batch_size": int(batch_size), "seed": int(seed), **(run_config or {})}
    stamp_path = state_dir / "run_config.json"
    if stamp_path.exists():
        saved = json.loads(stamp_path.read_text())
        if saved != json.loads(json.dumps(stamp)):
            raise ValueError(f"{state_dir} holds the training state of another run ({saved}, now {stamp}); "
                             "delete it or point state_dir elsewhere")
    step = 0
    manager = ocp.CheckpointManager(state_dir, options=ocp.CheckpointManagerOptions(max_to_keep=1))
    stamp_path.write_text(json.dumps(stamp))
    if manager.latest_step() is not None:
        template = {"params": params, "opt_state": opt_state, "step": np.asarray(0)}
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(template))
        params, opt_state, step = restored["params"], restored["opt_state"], int(restored["step"])

    @jax.jit
    def update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def save(k):
        if k in manager.all_steps():  # already saved (a resume of a finished run, or stop_after on a save step)
            return
        manager.save(k, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "step": np.asarray(k)}), force=True)
        manager.wait_until_finished()

    losses = []
    todo = steps - step if stop_after is None else min(steps - step, stop_after)
    bar = tqdm(range(step, step + todo), desc=desc, disable=not progress, initial=step, total=steps)
    for k in bar:
        batch = batches(np.random.default_rng([seed, k]), batch_size, model.cfg.max_len)
        params, opt_state, loss = update(params, opt_state, jax.tree_util.tree_map(jnp.asarray, batch))
        losses.append(float(loss))
        step = k + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if step % save_every == 0 and step < steps:
            save(step)
    save(step)
    manager.close()
    return nnx.merge(graphdef, params), losses, step >= steps


def train(task: str, out: str | Path, *, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
          cfg: Optional[LMConfig] = None, save_every: int = 200, stop_after: Optional[int] = None,
          progress: bool = True, init_from: Optional[str] = None) -> tuple[Transformer, list[float]]:
    """Train (or resume) and export the final model to ``out`` (config.json, tokenizer.json, params/).

    ``stop_after`` stops after that many steps *of this call* (to simulate an interruption in tests); the
    training state is checkpointed then, and the next call resumes from it."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    cfg = cfg or default_config(task)
    if cfg.vocab_size != spec.tokenizer.vocab_size:
        raise ValueError(f"cfg.vocab_size={cfg.vocab_size} but the {task} tokenizer has {spec.tokenizer.vocab_size}")
    out = Path(out).resolve()
    model = Transformer(cfg, rngs=nnx.Rngs(seed), num_outputs=spec.num_outputs)
    graphdef, params = nnx.split(model, nnx.Param)
    if init_from:  # start the trunk from a trained model (e.g. the PRM from the arithmetic LM); new head
        from .checkpoint import load_model

        source, _ = load_model(init_from)
        src = nnx.to_pure_dict(nnx.state(source, nnx.Param))
        dst = nnx.to_pure_dict(params)
        for name in dst:
            if name != "head":
                dst[name] = src[name]
        nnx.replace_by_pure_dict(params, dst)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, max(steps // 10, 1)), steps, lr / 20)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    model = nnx.merge(graphdef, params)
    model, losses, finished = fit(model, lambda m, batch: _loss(m, batch, spec.heads), spec.batch, out / "train_state",
                                  steps=steps, optimizer=opt, batch_size=batch_size, seed=seed, save_every=save_every,
                                  stop_after=stop_after, progress=progress, desc=f"train {task}",
                                  run_config={"task": task, "lr": lr, "cfg": dataclasses.asdict(cfg), "init_from": str(init_from)})
    if not finished:  # interrupted on purpose: the state is kept to resume
        return model, losses
    save_model(out, model, spec.tokenizer)
    shutil.rmtree(out / "train_state", ignore_errors=True)
    (out / "train_log.json").write_text(json.dumps({"task": task, "steps": steps, "batch_size": batch_size,
                                                     "lr": lr, "seed": seed, "final_loss": float(np.mean(losses[-50:])) if losses else None}))
    return model, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--init-from", default=None, help="checkpoint whose trunk initialises the model (not its head)")
    a = ap.parse_args(argv)
    _, losses = train(a.task, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, save_every=a.save_every,
                      init_from=a.init_from)
    print(json.dumps({"task": a.task, "final_loss": float(np.mean(losses[-50:])) if losses else None}))


if __name__ == "__main__":
    main()
