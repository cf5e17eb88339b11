"""MCTS-DPO on the arithmetic chains (Xie et al. 2024): MCTS turns outcome rewards into step-level preference
pairs, DPO fine-tunes the policy on them, and the loop repeats with the improved policy.

One iteration i, on-policy:

1. **collect** — for fresh training problems, run :func:`pplalign.search.mcts.mcts` with the current policy
   π_i: a node is a solution prefix ending at a step's ``;`` (or the final ``A z <eos>``), its value blends
   the outcome of a rollout, r = 1[the rollout's final answer is right] (the training problems' labels, as
   MCTS-DPO uses the ground truth while collecting), with the shipped PRM's u = P(every step so far right)
   (``lm_arithmetic_prm``), v = (1 − w)·r + w·u;
2. **extract** sibling steps whose backed-up values differ by at least a margin
   (:func:`pplalign.search.mcts.step_preferences`): (prompt + prefix, better step, worse step);
3. **fine-tune** π with the DPO loss (:func:`pplalign.vi.dpo.dpo_loss`) on the step log-probs
   log π(step | prompt, prefix) = Σ_{s ∈ step} log π(x_s | x_{<s}), the reference π_ref = π_i (the policy
   that collected the pairs; ``reference="initial"`` keeps π_0), with AdamW; ``nll_weight`` > 0 adds the
   chosen steps' negative log-likelihood (the anchor of iterative RPO, Pang et al. 2024).

The offline variant collects every iteration's pairs once, up front, with the initial policy π_0 (the same
problems and the same number of pairs per iteration) and runs the same fine-tuning on them: the difference
between the two is only whose samples the pairs come from ("suboptimal on-policy data" against off-policy data).

:func:`evaluate` scores a policy on held-out problems (disjoint from every training problem) with the exact
check: greedy accuracy and the mean accuracy of independent samples.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from pplalign.search.mcts import MCTSConfig, check_values, mcts, step_preferences
from pplalign.vi.dpo import dpo_loss, masked_log_prob

from . import corpora
from .program import LMProgram, ancestral_sample, prompt_caches, vmap_prompts
from .rewards import ProcessRewardModel
from .tokenizer import EOS, PAD
from .transformer import Transformer

__all__ = ["LoopConfig", "PairData", "arithmetic_mcts_config", "search_problems", "pairs_from_trees",
           "pair_quality", "step_log_probs", "dpo_finetune", "evaluate", "training_problems", "run_loop", "MODES"]

T = corpora.SOLUTION_LEN
MODES = ("on_policy", "offline")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Settings of the iterated loop (see the module docstring)."""

    iterations: int = 3
    problems_per_iteration: int = 32
    mcts_iterations: int = 8
    num_children: int = 4
    prm_weight: float = 0.3
    c_explore: float = 1.0
    margin: float = 0.2
    dpo_beta: float = 0.1
    dpo_steps: int = 60
    batch_size: int = 32
    lr: float = 1e-4
    nll_weight: float = 0.0  # > 0: add the chosen steps' NLL per token (RPO's anchor); 0: plain DPO
    reference: str = "previous"  # or "initial"

    def validate(self) -> None:
        if self.reference not in ("previous", "initial"):
            raise ValueError(f"reference must be 'previous' or 'initial'; got {self.reference!r}")
        for name in ("iterations", "problems_per_iteration", "mcts_iterations", "num_children", "dpo_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not (self.dpo_beta > 0 and self.lr > 0 and self.margin >= 0 and self.nll_weight >= 0):
            raise ValueError("dpo_beta and lr must be > 0, margin and nll_weight >= 0")


def arithmetic_mcts_config(tok, cfg: LoopConfig) -> MCTSConfig:
    """Steps end at ``;``; the solution at ``<eos>``; rewards and the PRM probability lie in [0, 1]."""
    return MCTSConfig(delimiter=tok.encode(";", bos=False)[0], end_token=EOS, num_children=cfg.num_children,
                      num_iterations=cfg.mcts_iterations, selection="puct", c_explore=cfg.c_explore,
                      prm_weight=cfg.prm_weight, value_range=(0.0, 1.0))


def _answer_ids(tok, problems) -> np.ndarray:
    return np.asarray([tok.encode(str(p.answer), bos=False)[0] for p in problems], np.int32)


def _search_impl(keys, caches, base, prm_model, answers, a_id, config: MCTSConfig):
    def one(key, prompt, answer):
        program = dataclasses.replace(base, prompt=prompt)
        prm_fn = ProcessRewardModel.for_program(prm_model, program)
        # outcome: the solution ends "A <answer> <eos>" (the exact label of a training problem)
        reward = lambda x: ((x[T - 3] == a_id) & (x[T - 2] == answer) & (x[T - 1] == EOS)).astype(jnp.float32)
        prm = lambda state, t: jnp.exp(prm_fn.at(state.tokens, t))  # P(every step so far right)
        return mcts(key, program, reward, prm, config)

    return jax.vmap(one)(keys, caches, answers)


_search_jit = jax.jit(_search_impl, static_argnums=(6,))


def search_problems(key: jax.Array, lm: Transformer, prm_model: Transformer, tok, problems, config: MCTSConfig):
    """One MCTS per problem (vmapped), with the exact outcome reward of the problem's answer; a batched
    :class:`~pplalign.search.mcts.MCTSResult` (leading axis = problems), its values checked."""
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T)
    keys = jax.random.split(key, len(problems))
    a_id = tok.encode("A", bos=False)[0]
    result = _search_jit(keys, caches, base, prm_model, jnp.asarray(_answer_ids(tok, problems)), a_id, config)
    for i in range(len(problems)):
        check_values(jax.tree_util.tree_map(lambda a: a[i], result.tree), config)
    return result


class PairData(NamedTuple):
    """M preference pairs as full sequences ``<bos>`` prompt prefix step (right-padded with ``<pad>``): the
    masks mark the step's tokens, whose log-probability DPO compares."""

    chosen: np.ndarray  # [M, S]
    chosen_mask: np.ndarray  # [M, S] bool
    rejected: np.ndarray  # [M, S]
    rejected_mask: np.ndarray  # [M, S] bool

    def __len__(self) -> int:
        return int(self.chosen.shape[0])


def _encode(prompt: list[int], row: np.ndarray, start: int, end: int, seq_len: int):
    ids = prompt + [int(i) for i in row[:end]]
    seq = np.full(seq_len, PAD, np.int32)
    seq[:len(ids)] = ids
    mask = np.zeros(seq_len, bool)
    mask[len(prompt) + start:len(prompt) + end] = True
    return seq, mask


def pairs_from_trees(result, problems, tok, margin: float, seq_len: int) -> PairData:
    """Step preference pairs of every tree of a batched MCTS result; a warning (once) when there are none."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # trees without pairs are common; warned once below
        for i, p in enumerate(problems):
            prefs = step_preferences(jax.tree_util.tree_map(lambda a: a[i], result.tree), margin)
            prompt = tok.encode(p.prompt)
            for m in range(len(prefs)):
                s = int(prefs.prefix_len[m])
                rows.append(_encode(prompt, prefs.chosen[m], s, int(prefs.chosen_end[m]), seq_len)
                            + _encode(prompt, prefs.rejected[m], s, int(prefs.rejected_end[m]), seq_len))
    if not rows:
        warnings.warn("no step preference pairs in these trees", UserWarning, stacklevel=2)
        z = np.zeros((0, seq_len), np.int32)
        return PairData(z, z.astype(bool), z, z.astype(bool))
    return PairData(*(np.stack([r[j] for r in rows]) for j in range(4)))


def pair_quality(result, problems, tok, margin: float) -> dict:
    """Evaluation only (the exact check, never used for training): the fraction of the pairs whose shared
    prefix is right and whose better step is right and worse step wrong ("informative"), the reverse
    ("reversed"), both wrong after a right prefix ("both_wrong"), or whose prefix is already wrong."""
    counts = dict(informative=0, reversed=0, both_wrong=0, wrong_prefix=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, p in enumerate(problems):
            prefs = step_preferences(jax.tree_util.tree_map(lambda a: a[i], result.tree), margin)
            for m in range(len(prefs)):
                ok_c = corpora.first_error(p, prefs.chosen[m], tok) >= prefs.chosen_end[m]
                ok_r = corpora.first_error(p, prefs.rejected[m], tok) >= prefs.rejected_end[m]
                if corpora.first_error(p, prefs.chosen[m], tok) < prefs.prefix_len[m]:
                    counts["wrong_prefix"] += 1
                else:
                    counts["informative" if ok_c and not ok_r else "reversed" if ok_r and not ok_c else "both_wrong"] += 1
    total = max(sum(counts.values()), 1)
    return {k: v / total for k, v in counts.items()}


def step_log_probs(model: Transformer, seqs: jax.Array, masks: jax.Array) -> jax.Array:
    """[M] log π(step | prompt, prefix): the model's token log-probs summed over the masked positions."""
    logits, _ = model(seqs)
    return masked_log_prob(logits[:, :-1], seqs[:, 1:], masks[:, 1:])


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))


@functools.partial(jax.jit, static_argnames=("graphdef", "lr", "beta", "nll_weight"))
def _dpo_update(params, opt_state, ref_params, batch: PairData, *, graphdef, lr: float, beta: float, nll_weight: float):
    def logps(p):
        m = nnx.merge(graphdef, p)
        return step_log_probs(m, batch.chosen, batch.chosen_mask), step_log_probs(m, batch.rejected, batch.rejected_mask)

    def loss_fn(p):
        chosen, rejected = logps(p)
        nll = -jnp.sum(chosen) / jnp.maximum(jnp.sum(batch.chosen_mask), 1)  # per chosen token
        return dpo_loss(chosen, rejected, ref_c, ref_r, beta) + nll_weight * nll

    ref_c, ref_r = logps(ref_params)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def dpo_finetune(model: Transformer, reference: Transformer, pairs: PairData, *, steps: int, beta: float,
                 batch_size: int = 32, lr: float = 1e-4, nll_weight: float = 0.0, seed: int = 0,
                 progress: bool = True) -> tuple[Transformer, list[float]]:
    """AdamW on the step-level DPO loss (plus ``nll_weight`` × the chosen steps' negative log-likelihood per
    token, the anchor of iterative RPO, Pang et al. 2024; 0: plain DPO) over minibatches of ``batch_size`` pairs drawn with replacement
    (``default_rng([seed, k])`` at step k; a fixed shape, so one compile serves every call). Returns
    (fine-tuned model, losses)."""
    if len(pairs) == 0:
        raise ValueError("dpo_finetune needs at least one preference pair")
    graphdef, params = nnx.split(model, nnx.Param)
    _, ref_params = nnx.split(reference, nnx.Param)
    opt_state = _optimizer(lr).init(params)
    losses = []
    for k in tqdm(range(steps), desc="DPO", disable=not progress, leave=False):
        idx = np.random.default_rng([seed, k]).integers(len(pairs), size=batch_size)
        batch = PairData(*(jnp.asarray(a[idx]) for a in pairs))
        params, opt_state, loss = _dpo_update(params, opt_state, ref_params, batch, graphdef=graphdef, lr=float(lr),
                                              beta=float(beta), nll_weight=float(nll_weight))
        losses.append(float(loss))
    return nnx.merge(graphdef, params), losses


def _draw(key, program, num: int, greedy: bool):
    return ancestral_sample(key, program, num, greedy=greedy)[0]


@functools.lru_cache(maxsize=None)
def _sampler(num: int, greedy: bool):
    # one function object per (num, greedy): vmap_prompts compiles once per function, and the policy's new
    # weights after each DPO round reuse that compile
    return functools.partial(_draw, num=num, greedy=greedy)


def evaluate(lm: Transformer, tok, problems, key: jax.Array, num_samples: int = 8) -> dict:
    """Greedy accuracy and the mean accuracy of ``num_samples`` policy samples per problem (exact check)."""
    caches = prompt_caches(lm, [tok.encode(p.prompt) for p in problems])
    base = LMProgram.build(lm, jax.tree_util.tree_map(lambda a: a[0], caches), T)
    out = {}
    for name, num, greedy in (("greedy_accuracy", 1, True), ("sample_accuracy", num_samples, False)):
        samples = np.asarray(vmap_prompts(_sampler(num, greedy), base, caches, key))
        out[name] = float(np.mean([[corpora.check_solution(p, s, tok)[1] == p.answer for s in ss]
                                   for p, ss in zip(problems, samples)]))
    return out


def training_problems(rng: np.random.Generator, num: int, held_out) -> list:
    """``num`` problems none of which is a held-out one (compared by prompt)."""
    banned = {p.prompt for p in held_out}
    out = []
    while len(out) < num:
        out += [p for p in corpora.sample_problems(rng, num) if p.prompt not in banned]
    return out[:num]


def _collect(key, lm, prm_model, tok, problems, cfg: LoopConfig):
    result = search_problems(key, lm, prm_model, tok, problems, arithmetic_mcts_config(tok, cfg))
    pairs = pairs_from_trees(result, problems, tok, cfg.margin, lm.cfg.max_len)
    cost = dict(policy_tokens=int(np.sum(result.policy_tokens)), verifier_calls=int(np.sum(result.verifier_calls)),
                nfe=int(np.sum(result.nfe)), pair_quality=pair_quality(result, problems, tok, cfg.margin))
    return pairs, cost


def run_loop(key: jax.Array, lm: Transformer, prm_model: Transformer, tok, held_out, cfg: LoopConfig, mode: str, *,
             seed: int = 0, eval_samples: int = 8, progress: bool = True, eval_key: Optional[jax.Array] = None) -> dict:
    """The iterated loop (``mode`` "on_policy") or its offline variant ("offline"); returns the held-out
    accuracy before training and after every iteration, with the pairs and the search cost per iteration."""
    cfg.validate()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    eval_key = jax.random.key(seed + 12345) if eval_key is None else eval_key
    problems = [training_problems(np.random.default_rng([seed, 1, i]), cfg.problems_per_iteration, held_out)
                for i in range(cfg.iterations)]
    keys = [jax.random.fold_in(key, i) for i in range(cfg.iterations)]
    initial = lm
    offline = [_collect(keys[i], initial, prm_model, tok, problems[i], cfg) for i in range(cfg.iterations)] \
        if mode == "offline" else None
    history = [dict(iteration=0, **evaluate(lm, tok, held_out, eval_key, eval_samples))]
    for i in tqdm(range(cfg.iterations), desc=f"MCTS-DPO ({mode})", disable=not progress):
        pairs, cost = offline[i] if offline else _collect(keys[i], lm, prm_model, tok, problems[i], cfg)
        reference = lm if cfg.reference == "previous" else initial
        losses = []
        if len(pairs):
            lm, losses = dpo_finetune(lm, reference, pairs, steps=cfg.dpo_steps, beta=cfg.dpo_beta,
                                      batch_size=cfg.batch_size, lr=cfg.lr, nll_weight=cfg.nll_weight,
                                      seed=seed * 1000 + i, progress=progress)
        history.append(dict(iteration=i + 1, pairs=len(pairs), dpo_loss_first=losses[0] if losses else None,
                            dpo_loss_last=float(np.mean(losses[-10:])) if losses else None, **cost,
                            **evaluate(lm, tok, held_out, eval_key, eval_samples)))
    return dict(mode=mode, history=history, model=lm)
