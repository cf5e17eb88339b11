"""Rewards on the shipped checkpoints, wrong-shape reward models, the arithmetic PRM's held-out AUC, and the
reasoning experiment's quick run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.lm import corpora, reasoning
from models.lm.checkpoint import load_model
from models.lm.program import LMProgram
from models.lm.rewards import ClassifierReward, Infilling, ProcessRewardModel, WordPresence
from models.lm.tokenizer import EOS, PAD

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stories():
    lm, tok = load_model("lm_stories")
    clf, _ = load_model("lm_story_classifier")
    return lm, tok, clf


def _pad(ids, steps):
    return jnp.asarray(ids + [PAD] * (steps - len(ids)), jnp.int32)


def test_classifier_reward_reads_sentiment_and_toxicity(stories):
    lm, tok, clf = stories
    program = LMProgram.from_prompt(lm, "Anna", 24, tokenizer=tok)
    pos = ClassifierReward.for_program(clf, program, head=(0, 3), label=2)
    toxic = ClassifierReward.for_program(clf, program, head=(3, 2), label=1)
    happy = _pad(tok.encode("felt delighted because the cake was lovely . Ben hugged the dog gladly .", bos=False, eos=True), 24)
    sad = _pad(tok.encode("felt miserable because the cake was rotten . Ben kicked the dog loudly .", bos=False, eos=True), 24)
    rude = _pad(tok.encode("said : you are a stupid idiot !", bos=False, eos=True), 24)
    assert float(pos(happy)) > float(pos(sad)) + 1.0
    assert float(toxic(rude)) > float(toxic(happy)) + 1.0
    np.testing.assert_allclose(jnp.exp(pos.log_probs(happy)).sum(), 1.0, atol=1e-5)


def test_wrong_shape_reward_models_are_rejected(stories):
    lm, tok, clf = stories
    program = LMProgram.from_prompt(lm, "Anna", 24, tokenizer=tok)
    with pytest.raises(ValueError, match="wrong shape"):
        ClassifierReward.for_program(clf, program, head=(3, 3), label=0)
    with pytest.raises(ValueError, match="wrong shape"):
        ProcessRewardModel.for_program(clf, program)
    with pytest.raises(ValueError, match="needs a models.lm Transformer"):
        ClassifierReward.for_program(lambda x: x, program, head=(0, 3), label=0)
    prm_model, _ = load_model("lm_arithmetic_prm")
    with pytest.raises(ValueError, match="vocabulary"):
        ClassifierReward.for_program(prm_model, program, head=(0, 2), label=0)


def test_word_presence_and_infilling(stories):
    lm, tok, _ = stories
    x = _pad(tok.encode("went to the park .", bos=False), 8)
    assert float(WordPresence.of(tok, ["park"], weight=2.0)(x)) == 2.0
    assert float(WordPresence.of(tok, ["dragon"], hard=True)(x)) == -np.inf
    program = LMProgram.from_prompt(lm, "Anna", 4, tokenizer=tok, banned=[EOS])
    fill = Infilling.for_program(program, tok.encode("in the morning .", bos=False))
    good = jnp.asarray(tok.encode("went to the park", bos=False))
    odd = jnp.asarray(tok.encode("cake cake cake cake", bos=False))
    assert float(fill(good)) > float(fill(odd)) + 1.0  # log p0(continuation | prompt, x)


@pytest.fixture(scope="module")
def arithmetic():
    lm, tok = load_model("lm_arithmetic")
    prm_model, _ = load_model("lm_arithmetic_prm")
    return lm, tok, prm_model


def test_corrupted_steps_are_found_by_the_exact_check():
    tok = corpora.arithmetic_tokenizer()
    rng = np.random.default_rng(5)
    for p in corpora.sample_problems(rng, 200):
        assert corpora.first_error(p, corpora.reference_ids(p, tok), tok) == corpora.SOLUTION_LEN
        words, bad = corpora.corrupt_steps(rng, p)
        ids = tok.encode(" ".join(words), bos=False, eos=True)
        assert corpora.first_error(p, ids, tok) == bad
        steps, _ = corpora.check_solution(p, ids, tok)
        assert not all(steps) or bad >= corpora.NUM_OPS * corpora.STEP_LEN  # a wrong step, or a wrong answer


def test_policy_is_weak_enough_for_search(arithmetic):
    lm, tok, _ = arithmetic
    problems = corpora.sample_problems(np.random.default_rng(11), 64)
    assert 0.2 <= reasoning.greedy_accuracy(lm, tok, problems) <= 0.8


def test_process_reward_separates_right_from_wrong_prefixes(arithmetic):
    """Held-out problems, the policy's own samples, scored at the step boundaries: a prefix is positive when
    all its steps are right (exact check). A verifier that cannot verify has AUC ≈ 0.5."""
    lm, tok, prm_model = arithmetic
    problems = corpora.sample_problems(np.random.default_rng(2024), 24)
    stats = reasoning.prm_auc(prm_model, lm, tok, problems, 8, jax.random.key(7))
    assert stats["positives"] >= 20 and stats["negatives"] >= 20, stats
    assert stats["auc"] > 0.9, stats
    # the ProcessRewardModel the samplers use gives the same values, and v drops at a corrupted step
    rng = np.random.default_rng(3)
    values = jax.jit(lambda prm, x: (prm.prefix_log_probs(x), prm(x)))
    wins = 0
    for p in problems[:6]:
        program = LMProgram.from_prompt(lm, p.prompt, corpora.SOLUTION_LEN, tokenizer=tok)
        prm = ProcessRewardModel.for_program(prm_model, program)
        right = jnp.asarray(corpora.reference_ids(p, tok))
        words, bad = corpora.corrupt_steps(rng, p)
        wrong = jnp.asarray(tok.encode(" ".join(words), bos=False, eos=True))
        (v_right, orm_right), (v_wrong, orm_wrong) = values(prm, right), values(prm, wrong)
        np.testing.assert_allclose(v_right, reasoning.prefix_scores(prm_model, tok, [p], np.asarray(right)[None, None])[0, 0],
                                   atol=1e-4)
        assert np.all(np.diff(np.asarray(v_wrong)) <= 1e-6)  # log P(all right so far) never increases
        assert float(v_wrong[bad]) < float(v_wrong[bad - 1]) - 1.0  # and it drops at the slip
        np.testing.assert_allclose(float(orm_wrong), float(v_wrong[-1]), atol=1e-5)
        wins += float(orm_right) > float(orm_wrong)
    assert wins >= 5


def test_scaling_rules():
    from experiments.reasoning_scaling import beam_resampler, best_of_majority, pick, vote

    assert vote([3, 5, 5, None]) == 5 and vote([3, 5, 5], [0.9, 0.05, 0.05]) == 3 and vote([None]) is None
    assert best_of_majority([1, 1, 1, 2, 2, 7], [0, 0, 0, 5, 0, 9]) == 2  # 7 has too few votes
    assert pick("best_of_n_prm", [4, 6], np.zeros(2), np.asarray([-3.0, -1.0])) == 6
    idx = np.asarray(beam_resampler(4)(None, jnp.asarray([0.0, 2.0, 1.0, -1.0, 0.5, 3.0, 0.0, 0.0]), 8))
    assert sorted(set(idx.tolist())) == [1, 5] and len(idx) == 8
    np.testing.assert_array_equal(beam_resampler(4)(None, jnp.zeros(8), 8), np.arange(8))
    for m in ("best_of_n_orm", "best_of_n_prm", "majority", "weighted_majority", "best_of_majority"):
        assert pick(m, [7], np.asarray([-5.0]), np.asarray([-9.0])) == 7  # one sample: every rule returns it


def test_reasoning_scaling_quick(tmp_path):
    # compiling dominates a quick run: XLA's cheaper backend optimisation cuts its CPU time by ~40 %
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    out = subprocess.run([sys.executable, "-m", "experiments.reasoning_scaling", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, XLA_FLAGS=flags.strip()))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    methods = {"greedy", "best_of_n_orm", "best_of_n_prm", "majority", "weighted_majority", "best_of_majority",
               "beam_search", "particle_filter"}
    assert set(result["accuracy"]) == methods
    T = corpora.SOLUTION_LEN
    for m in methods:  # NFE-matched: n·T transitions for every method at budget n (T for greedy)
        assert result["nfe"][m] == [T if m == "greedy" else n * T for n in result["budgets"]], m
        assert all(0.0 <= a <= 1.0 for a in result["accuracy"][m])
    assert result["accuracy"]["greedy"][0] == result["greedy_accuracy"]
    for m in ("best_of_n_orm", "best_of_n_prm", "majority", "weighted_majority", "best_of_majority"):
        # a pool method returns one of its n samples' answers: never above pass@n
        assert all(a <= p + 1e-12 for a, p in zip(result["accuracy"][m], result["pass_at_n"])), m
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "results.json").exists()


def test_verifier_finetune_resumes_exactly(tmp_path):
    """The PRM fine-tune runs on models.lm.train.fit: stopped midway and resumed from its state directory, it
    ends with the parameters and losses of an uninterrupted run."""
    from flax import nnx

    from models.lm.transformer import LMConfig, Transformer

    tok = corpora.arithmetic_tokenizer()
    cfg = LMConfig(tok.vocab_size, max_len=32, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    rng = np.random.default_rng(0)
    rows = [reasoning.label_prefixes(p, corpora.reference_ids(p, tok), corpora.SOLUTION_LEN, tok, 32)
            for p in corpora.sample_problems(rng, 8)]
    batches = reasoning.prm_batches(tuple(np.stack([r[j] for r in rows]) for j in range(3)))
    kw = dict(steps=4, batch_size=4, progress=False)
    straight, losses = reasoning.finetune_verifier(Transformer(cfg, rngs=nnx.Rngs(0)), batches, **kw)
    state = tmp_path / "state"
    _, first = reasoning.finetune_verifier(Transformer(cfg, rngs=nnx.Rngs(0)), batches, state_dir=state, stop_after=3, **kw)
    assert state.exists() and len(first) == 3
    resumed, second = reasoning.finetune_verifier(Transformer(cfg, rngs=nnx.Rngs(0)), batches, state_dir=state, **kw)
    assert len(second) == 1
    np.testing.assert_allclose(first + second, losses, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(straight, nnx.Param)), jax.tree_util.tree_leaves(nnx.state(resumed, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a finished run's state (kept until the caller exports) resumes as a no-op, and another run's state is refused
    _, none_left = reasoning.finetune_verifier(Transformer(cfg, rngs=nnx.Rngs(0)), batches, state_dir=state, **kw)
    assert none_left == []
    with pytest.raises(ValueError, match="another run"):
        reasoning.finetune_verifier(Transformer(cfg, rngs=nnx.Rngs(0)), batches, state_dir=state, steps=6, batch_size=4, progress=False)
