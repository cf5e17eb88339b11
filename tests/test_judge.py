"""The LM-as-judge reward (issue 17, item 2b) on the Hugging Face fixtures: policy gpt2, judge qwen2 (the same
byte-level BPE tokenizer of 400 ids), and the story model (another, word-level, tokenizer) for the mismatch."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.hf import load_pretrained
from models.lm.checkpoint import checkpoint_path
from models.lm.judge import JudgeReward
from models.lm.program import LMProgram

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
TEMPLATE = "Story: {prompt}{x}\nIs it about the sea? Answer:"
T = 4


@pytest.fixture(scope="module")
def setup():
    policy, tok = load_pretrained(FIXTURES / "gpt2")
    judge, judge_tok = load_pretrained(FIXTURES / "qwen2")
    program = LMProgram.from_prompt(policy, "The little fox", T, tokenizer=tok)
    reward = JudgeReward.build(judge, judge_tok, program, template=TEMPLATE, yes=" the", policy_tokenizer=tok)
    return policy, tok, judge, judge_tok, program, reward, jax.jit(jax.vmap(reward))  # compiled once, reused


@pytest.fixture(scope="module")
def stories():
    return load_pretrained(checkpoint_path("lm_stories_hf"))


def _full_forward(judge, judge_tok, x_ids):
    """log p_judge(' the' | the concatenated ids) from one full forward pass, no cache."""
    before, after = TEMPLATE.replace("{prompt}", "The little fox").split("{x}")
    ids = judge_tok.encode(before) + list(x_ids) + judge_tok.encode(after, add_special_tokens=False)
    logits, _ = judge(jnp.asarray([ids]))
    return float(jax.nn.log_softmax(logits[0, -1])[judge_tok.encode(" the", add_special_tokens=False)[0]])


def test_cached_judge_equals_a_full_forward(setup):
    """With x unfinished, ended early, and ended at once (empty x): the cached prefix + decode path gives the
    full forward's log-probability to 1e-5; the pads after an end token never reach the judge."""
    _, tok, judge, judge_tok, _, _, batched_reward = setup
    eos, pad = tok.eos_ids[0], tok.pad_id
    cases = [[258, 341, 259, 25], [258, 341, eos, pad], [eos, pad, pad, pad]]
    batched = batched_reward(jnp.asarray(cases))  # batched over particles, as the samplers call it
    for x, got in zip(cases, np.asarray(batched)):
        real = x[: x.index(eos)] if eos in x else x
        assert got == pytest.approx(_full_forward(judge, judge_tok, real), abs=1e-5)


def test_judge_steers_smc(setup):
    """bootstrap SMC with the judge as reward on the gpt2 fixture: finite log Ẑ ≤ 0 (r ≤ 0, so Z ≤ 1), every
    particle's reward in (−∞, 0]."""
    _, _, _, _, program, reward, batched_reward = setup
    parts = pplalign.smc(jax.random.key(0), pplalign.tilt(program, reward, 1.0), 8)
    r = np.asarray(batched_reward(jnp.asarray(parts.samples)))
    assert np.isfinite(float(parts.log_Z)) and float(parts.log_Z) <= 0.0
    assert np.all(np.isfinite(r)) and np.all(r <= 0.0)


def test_another_tokenizer_needs_explicit_retokenization(setup, stories):
    """The story model's word-level vocabulary (258) is not the gpt2 fixture's (400): refused, with the
    vocabularies compared when the policy's tokenizer is given and the sizes otherwise; an explicit
    ``retokenize`` (here a per-token table into the judge's ids) is accepted and scores like a full forward."""
    _, tok, _, _, program, _, _ = setup
    stories, stories_tok = stories
    kw = dict(template="{x} kind", yes=" happy", prompt="")
    with pytest.raises(ValueError, match="retokenize"):
        JudgeReward.build(stories, stories_tok, program, policy_tokenizer=tok, **kw)
    with pytest.raises(ValueError, match="retokenize"):
        JudgeReward.build(stories, stories_tok, program, **kw)
    table = jnp.arange(program.vocab_size) % 200 + 3  # some map of policy ids to judge words

    def retokenize(x):
        ends = jnp.any(x[:, None] == program.eos_ids[None, :], axis=1)
        return table[x], jnp.where(jnp.any(ends), jnp.argmax(ends), x.shape[0])

    judge = JudgeReward.build(stories, stories_tok, program, retokenize=retokenize, **kw)
    x = jnp.asarray([258, 341, tok.eos_ids[0], tok.pad_id])
    ids = stories_tok.encode("") + [int(table[258]), int(table[341])] + stories_tok.encode(" kind", add_special_tokens=False)
    logits, _ = stories(jnp.asarray([ids]))
    assert float(judge(x)) == pytest.approx(float(jax.nn.log_softmax(logits[0, -1])[judge.yes_id]), abs=1e-5)


def test_bad_templates(setup, stories):
    _, tok, judge, judge_tok, program, _, _ = setup
    with pytest.raises(ValueError, match="exactly once"):
        JudgeReward.build(judge, judge_tok, program, template="no slot", yes=" the")
    with pytest.raises(ValueError, match="one token"):
        JudgeReward.build(judge, judge_tok, program, template=TEMPLATE, yes=" Yes")
    with pytest.raises(ValueError, match="cannot encode"):
        JudgeReward.build(*stories, program, template="{x} zyzzyva", yes=" happy", prompt="",
                          retokenize=lambda x: (x, jnp.asarray(1)))
    with pytest.raises(ValueError, match="max_len"):
        JudgeReward.build(judge, judge_tok, program, template="{x}" + " the" * 300, yes=" the")
