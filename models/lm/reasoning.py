"""The arithmetic reasoning setup of the inference-time-scaling experiment (Puri et al. 2025): a deliberately
weak policy LM, a process reward model (PRM) trained on labelled prefixes, and the PRM's held-out AUC.

Policy. ``lm_arithmetic`` is a small transformer (d_model 32) trained only briefly on the chains of
:mod:`models.lm.corpora`, so that greedy decoding gets about half of the problems right and samples disagree:
there is room for search to help.

Process reward model. ``lm_arithmetic_prm`` is a per-token verifier: at generated position s it gives
c_s = P(x_s is right | prompt, x_{≤s}, every token before s right), and

    v(x_{≤t}) = log P(every step of x_{≤t} is right | prompt, x_{≤t}) = Σ_{s≤t} log c_s

by the chain rule (:class:`models.lm.rewards.ProcessRewardModel`). v is non-increasing (a wrong step stays
wrong) and v after the final token is an outcome reward (ORM): log P(the whole solution, answer included,
is right). It is parametrised as a next-token verifier, c_s = softmax(f(x_{<s}))[x_s]: after a right prefix
the right next token is unique, so "x_s is right" is the event "the right token is x_s", and a softmax over
the vocabulary is a classifier for it (:func:`models.lm.rewards.verifier_log_probs`). The network starts from
a *fully* trained arithmetic LM (d_model 64, a stronger model than the policy, as the PRMs of Puri et al. are
larger than the policies they guide) and is then fine-tuned with the binary cross-entropy
−[y log c + (1−y) log(1−c)] on labelled prefixes (:func:`finetune_verifier`), labelled *exactly* (the solution
of a chain is unique, :func:`corpora.first_error`):

* on-policy — samples of the policy LM on fresh problems; the label of token s is 1[s < first error], with
  weight only up to the first error (after it, c_s is not defined);
* synthetic — correct solutions and solutions with one slip made by :func:`corpora.corrupt_steps`.

(A 2-output prefix classifier trained on the same labels from the same start, 1000 steps, reached only AUC
0.87 on held-out prefixes: it never learned to check a step's result; the next-token form inherits that
computation from the LM.) The exact check makes labels and scores the experiment's answers; no inference
method calls it.

Step searches. :func:`step_tokens` gives the arithmetic chains' step delimiter (``;``) and end token
(``<eos>``) for :mod:`pplalign.search` (A*-decoding, REBASE, MCTS), and :class:`StepPRM` reads the PRM as their
``prm(state, t)``: v_t of the partial solution whose last token is x_t, one verifier call.

    python -m models.lm.reasoning --out-lm models/checkpoints/lm_arithmetic \\
        --out-prm models/checkpoints/lm_arithmetic_prm

trains both (a few minutes on two CPU cores) and prints the policy's greedy accuracy and the PRM's AUC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import corpora, train
from .checkpoint import load_model, save_model
from .program import LMProgram, ancestral_sample, prompt_caches, vmap_prompts
from .rewards import ProcessRewardModel, prefix_values, verifier_log_probs
from .tokenizer import EOS, PAD
from .transformer import LMConfig, Transformer

__all__ = ["POLICY_CONFIG", "PRM_CONFIG", "StepPRM", "step_tokens", "sample_solutions", "label_prefixes", "prm_batches", "verifier_loss",
           "finetune_verifier", "prefix_scores",
           "roc_auc", "prm_auc", "greedy_accuracy"]

T = corpora.SOLUTION_LEN
POLICY_CONFIG = dict(d_model=32, num_layers=2, num_heads=4, d_ff=128, max_len=32)
PRM_CONFIG = dict(d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=32)


def step_tokens(tok) -> dict:
    """``dict(delimiter=id of ";", end_token=<eos>)``: how the arithmetic solutions split into steps."""
    return dict(delimiter=tok.encode(";", bos=False)[0], end_token=EOS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepPRM:
    """``prm(state, t)`` for the step searches on an :class:`LMProgram`: v_t = log P(every step of x_{≤t} is
    right) from :class:`ProcessRewardModel` (≤ 0, non-increasing along a path: an A* path cost −v_t ≥ 0)."""

    prm: ProcessRewardModel

    @classmethod
    def for_program(cls, prm_model: Transformer, program: LMProgram) -> "StepPRM":
        return cls(ProcessRewardModel.for_program(prm_model, program))

    def __call__(self, state, t) -> jax.Array:
        return self.prm.at(state.tokens, t)


def _programs(lm: Transformer, tok, problems):
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    return LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T), caches


def sample_solutions(key: jax.Array, lm: Transformer, tok, problems, num: int, *, greedy: bool = False) -> np.ndarray:
    """[P, num, T] generated token ids, ``num`` policy samples (or the greedy one) per problem."""
    base, caches = _programs(lm, tok, problems)
    tokens, _ = vmap_prompts(lambda k, p: ancestral_sample(k, p, num, greedy=greedy), base, caches, key)
    return np.asarray(tokens)


def greedy_accuracy(lm: Transformer, tok, problems) -> float:
    """Fraction of problems whose greedy solution has the right final answer (exact check)."""
    tokens = sample_solutions(jax.random.key(0), lm, tok, problems, 1, greedy=True)[:, 0]
    return float(np.mean([corpora.check_solution(p, t, tok)[1] == p.answer for p, t in zip(problems, tokens)]))


def label_prefixes(problem, solution_ids, first_bad: int, tok, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [S], labels [S], weights [S]) for ``<bos>`` prompt solution, for the per-token verifier.

    The label at a generated position s is 1[x_s is right] and the weight is 1 only where the tokens before
    s are all right (s ≤ first error): the classifier learns c_s = P(x_s right | x_{<s} right, x_s), and
    log P(x_{≤t} all right) = Σ_{s≤t} log c_s by the chain rule."""
    prompt = tok.encode(problem.prompt)
    ids = (prompt + [int(i) for i in solution_ids])[:seq_len]
    tokens = np.full(seq_len, PAD, np.int32)
    tokens[:len(ids)] = ids
    pos = np.arange(seq_len) - len(prompt)  # generated position of each sequence position
    labels = (pos < first_bad).astype(np.int32)
    weights = ((pos >= 0) & (pos <= first_bad) & (tokens != PAD)).astype(np.float32)
    return tokens, labels, weights


def _strip_pad(ids) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(PAD)] if PAD in ids else ids


def on_policy_examples(key: jax.Array, lm: Transformer, tok, rng: np.random.Generator, num_problems: int,
                       per_problem: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Policy samples on fresh problems, labelled by the exact check: (tokens, labels, weights), each [N, S]."""
    problems = corpora.sample_problems(rng, num_problems)
    samples = sample_solutions(key, lm, tok, problems, per_problem)
    rows = [label_prefixes(p, _strip_pad(s), corpora.first_error(p, s, tok), tok, seq_len)
            for p, ss in zip(problems, samples) for s in ss]
    return tuple(np.stack([r[j] for r in rows]) for j in range(3))


def prm_batches(on_policy: tuple[np.ndarray, np.ndarray, np.ndarray], *, synthetic_fraction: float = 0.5):
    """``batch(rng, b, s) -> train.Batch`` mixing rows of the fixed on-policy set with fresh synthetic ones (a
    quarter correct, the rest with one slip); a batch is a function of its rng only."""
    tok = corpora.arithmetic_tokenizer()
    pool = on_policy

    def batch(rng: np.random.Generator, b: int, s: int) -> train.Batch:
        n_syn = int(round(b * synthetic_fraction))
        idx = rng.integers(len(pool[0]), size=b - n_syn)
        rows = [tuple(a[idx, :s] for a in pool)]
        for p in corpora.sample_problems(rng, n_syn):
            if rng.random() < 0.25:
                words, bad = corpora.solution_text(p).split(), corpora.SOLUTION_LEN
            else:
                words, bad = corpora.corrupt_steps(rng, p)
            rows.append(tuple(a[None] for a in label_prefixes(p, tok.encode(" ".join(words), bos=False, eos=True),
                                                              bad, tok, s)))
        tokens, labels, weights = (np.concatenate([r[j] for r in rows]) for j in range(3))
        return train.Batch(tokens, labels, weights)

    return batch


def verifier_loss(model: Transformer, batch: train.Batch) -> jax.Array:
    """Binary cross-entropy of the per-token verifier on labelled prefixes,
    −Σ w_s [y_s log c_s + (1 − y_s) log(1 − c_s)] / Σ w_s, with c_s from :func:`verifier_log_probs`."""
    lc = jnp.minimum(verifier_log_probs(model, batch.tokens), -1e-7)
    nll = -(batch.targets * lc + (1 - batch.targets) * jnp.log(-jnp.expm1(lc)))
    return jnp.sum(nll * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)


def finetune_verifier(model: Transformer, batches, *, steps: int, batch_size: int = 64, lr: float = 3e-4,
                      seed: int = 0, progress: bool = True, state_dir=None, stop_after: Optional[int] = None,
                      run_config: Optional[dict] = None) -> tuple[Transformer, list[float]]:
    """AdamW (cosine-decayed ``lr``, no weight decay) on :func:`verifier_loss`; the batch at step k is
    ``batches(default_rng([seed, k]), ...)``. Runs on :func:`models.lm.train.fit`: with ``state_dir`` the
    training state is checkpointed there (every 100 steps and on ``stop_after``) and a later call resumes it;
    ``run_config`` (e.g. the data settings) must then match, else ``ValueError``."""
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.0))
    own_dir = state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="verifier_state_")) if own_dir else Path(state_dir)
    try:
        model, losses, _ = train.fit(model, verifier_loss, batches, state_dir, steps=steps, optimizer=opt,
                                     batch_size=batch_size, seed=seed, save_every=100, stop_after=stop_after,
                                     progress=progress, desc="train verifier",
                                     run_config={"lr": lr, "model": dataclasses.asdict(model.cfg), **(run_config or {})})
    finally:
        if own_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
    return model, losses


def prefix_scores(prm_model: Transformer, tok, problems, samples: np.ndarray) -> np.ndarray:
    """[P, n, T] PRM values v_t after every generated token of ``samples`` [P, n, T]
    (the same numbers as :meth:`ProcessRewardModel.prefix_log_probs`, for many problems in one pass)."""
    prompts = [tok.encode(p.prompt) for p in problems]
    width = max(len(p) for p in prompts)
    if width + T > prm_model.cfg.max_len:
        raise ValueError(f"prompt + solution ({width + T} tokens) exceed the PRM's max_len {prm_model.cfg.max_len}")
    P, n, _ = samples.shape
    seqs = np.full((P, n, width + T), PAD, np.int32)
    for i, pr in enumerate(prompts):
        seqs[i, :, :len(pr)] = pr
        seqs[i, :, len(pr):len(pr) + T] = samples[i]
    lengths = np.asarray([len(p) for p in prompts])
    lp = _prm_logp(prm_model, jnp.asarray(seqs.reshape(P * n, -1)))
    lp = np.asarray(lp).reshape(P, n, -1)
    idx = lengths[:, None, None] + np.arange(T)[None, None]  # position of generated token t
    at = np.take_along_axis(lp, np.broadcast_to(idx, (P, n, T)), axis=-1)
    return np.asarray(prefix_values(prm_model, jnp.asarray(at), jnp.asarray(samples)))


_prm_logp = jax.jit(verifier_log_probs)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties ½
    (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        raise ValueError("the AUC needs both positive and negative examples")
    return float(roc_auc_score(labels, np.asarray(scores, float)))


def prm_auc(prm_model: Transformer, lm: Transformer, tok, problems, per_problem: int, key: jax.Array) -> dict:
    """Held-out discrimination of the PRM on the policy's own samples, at the step boundaries: a prefix is
    positive when all its steps are right (exact check). Returns the AUC and the counts."""
    samples = sample_solutions(key, lm, tok, problems, per_problem)
    scores = prefix_scores(prm_model, tok, problems, samples)
    bounds = np.flatnonzero(corpora.step_boundaries())
    first = np.asarray([[corpora.first_error(p, s, tok) for s in ss] for p, ss in zip(problems, samples)])
    labels = first[..., None] > bounds[None, None]  # [P, n, B] all steps up to this boundary right
    vals = scores[..., bounds]
    return dict(auc=roc_auc(vals.ravel(), labels.ravel()), positives=int(labels.sum()),
                negatives=int((~labels).sum()),
                final_auc=roc_auc(vals[..., -1].ravel(), labels[..., -1].ravel()))


def main(argv=None):
    ap = argparse.ArgumentParser(description="train the weak arithmetic policy LM and its process reward model")
    ap.add_argument("--out-lm", default="models/checkpoints/lm_arithmetic")
    ap.add_argument("--out-prm", default="models/checkpoints/lm_arithmetic_prm")
    ap.add_argument("--lm-steps", type=int, default=800)
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--prm-steps", type=int, default=300)
    ap.add_argument("--on-policy-problems", type=int, default=2048)
    ap.add_argument("--skip-lm", action="store_true", help="keep the policy at --out-lm; train the PRM only")
    ap.add_argument("--teacher", default=None, help="an existing fully trained d_model-64 arithmetic LM to start "
                                                  "the PRM from (default: train one)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    vocab = corpora.arithmetic_tokenizer().vocab_size
    if not a.skip_lm:
        train.train("arithmetic", a.out_lm, steps=a.lm_steps, batch_size=32, lr=3e-3, seed=a.seed,
                    cfg=LMConfig(vocab, **POLICY_CONFIG))
    lm, tok = load_model(a.out_lm)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = a.teacher or Path(tmp) / "teacher"  # a fully trained arithmetic LM: the verifier starts from it
        if not a.teacher:
            train.train("arithmetic", teacher, steps=a.teacher_steps, batch_size=32, lr=3e-3, seed=a.seed,
                        cfg=LMConfig(vocab, **PRM_CONFIG))
        verifier, _ = load_model(teacher)
    data = on_policy_examples(jax.random.key(a.seed + 1), lm, tok, np.random.default_rng([a.seed, 1]),
                              a.on_policy_problems, 4, verifier.cfg.max_len)
    state_dir = Path(a.out_prm).resolve().parent / (Path(a.out_prm).name + ".train_state")  # resumable
    verifier, losses = finetune_verifier(verifier, prm_batches(data), steps=a.prm_steps, seed=a.seed, state_dir=state_dir,
                                         run_config={"teacher": str(a.teacher), "teacher_steps": a.teacher_steps,
                                                     "on_policy_problems": a.on_policy_problems, "lm": str(Path(a.out_lm).resolve())})
    save_model(a.out_prm, verifier, tok)
    shutil.rmtree(state_dir, ignore_errors=True)
    Path(a.out_prm, "train_log.json").write_text(json.dumps(dict(
        task="per-token verifier fine-tuned on labelled prefixes (models.lm.reasoning)", steps=a.prm_steps,
        batch_size=64, lr=3e-4, seed=a.seed, teacher_steps=a.teacher_steps, on_policy_problems=a.on_policy_problems,
        final_loss=float(np.mean(losses[-50:])) if losses else None)))
    prm_model, _ = load_model(a.out_prm)
    held_out = corpora.sample_problems(np.random.default_rng([a.seed, 99]), 128)
    report = dict(greedy_accuracy=greedy_accuracy(lm, tok, held_out),
                  **prm_auc(prm_model, lm, tok, held_out, 8, jax.random.key(a.seed + 99)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
