"""pplalign's samplers on a Hugging Face architecture (issue 11): the in-house LM machinery — LMProgram, twist
heads, vmap_prompts, the twist-head trainer — runs unchanged on a loaded Qwen3 (GQA, q/k-norm, head_dim ≠ D/H)
and its estimates agree with the exact answer.

The exact testbed: T = 2 tokens after a prompt, the end tokens banned, reward r(x) = φ[x₀] + φ[x₁]. Then
Z = Σ_{x₀} p₀(x₀) e^{φ[x₀]} Σ_{x₁} p₀(x₁|x₀) e^{φ[x₁]} comes from one batched forward pass over the V
one-token continuations.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pplalign
from models.hf import load_pretrained
from models.lm.program import LMProgram, prompt_caches, vmap_prompts
from models.lm.twist_head import HeadTwist, TwistHead, fit_head

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
N, SEEDS = 256, 8


@pytest.fixture(scope="module")
def setup():
    model, tok = load_pretrained(FIXTURES / "qwen3")
    ref = np.load(FIXTURES / "qwen3" / "reference.npz")
    prompt = [int(i) for i in ref["prompt_ids"][:6]]
    program = LMProgram.from_prompt(model, prompt, 2, tokenizer=tok, banned=tok.eos_ids)
    phi = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, model.cfg.vocab_size), jnp.float32)
    return model, tok, prompt, program, phi


def _exact_log_z(model, program, prompt, phi):
    mask = np.asarray(program.logit_mask)
    v = model.cfg.vocab_size
    logp0 = jax.nn.log_softmax(np.asarray(program.init(None).logits))  # already masked
    seqs = np.concatenate([np.tile(prompt, (v, 1)), np.arange(v)[:, None]], axis=1)
    logits, _ = model(jnp.asarray(seqs))
    logp1 = jax.nn.log_softmax(logits[:, -1] + mask, axis=-1)
    inner = jax.nn.logsumexp(logp1 + phi[None, :], axis=-1)
    return float(jax.nn.logsumexp(logp0 + phi + jnp.where(jnp.isfinite(logp0), inner, 0.0)))


def _z_ratio_stats(run, exact):
    """Ẑ/Z over seeds: mean and its standard error (Ẑ is unbiased, so E[Ẑ/Z] = 1)."""
    log_z = np.array([float(run(jax.random.key(s)).log_Z) for s in range(SEEDS)])
    ratio = np.exp(log_z - exact)
    return ratio.mean(), ratio.std(ddof=1) / np.sqrt(SEEDS)


def test_bootstrap_and_twisted_smc_estimate_exact_z(setup):
    model, _, prompt, program, phi = setup
    reward = lambda x: phi[x].sum()
    target = pplalign.tilt(program, reward, 1.0)
    exact = _exact_log_z(model, program, prompt, phi)
    head = TwistHead(model.cfg.d_model, model.cfg.vocab_size, rngs=nnx.Rngs(0))
    head.out.kernel[...] = 0.3 * jax.random.normal(jax.random.key(1), head.out.kernel[...].shape)
    smc = jax.jit(lambda k, tw: pplalign.smc(k, target, N, twist=tw, ess_threshold=1.0))
    for twist in (None, HeadTwist(head)):
        mean, se = _z_ratio_stats(lambda k: smc(k, twist), exact)
        # 4 standard errors of the mean over SEEDS runs (and at least 2 %: a floor for a lucky small SE)
        assert abs(mean - 1) < max(4 * se, 0.02), (twist, mean, se)


def test_vmap_prompts_runs_one_particle_system_per_prompt(setup):
    """Two prompts of different lengths in one compiled call; each prompt's Ẑ is unbiased for its own Z."""
    model, tok, prompt, program, phi = setup
    prompts = [prompt, prompt[:4]]
    caches = prompt_caches(model, prompts, pad_to=6, pad_id=tok.pad_id)
    per_prompt = lambda k, p: pplalign.smc(k, pplalign.tilt(p, lambda x: phi[x].sum(), 1.0), N)  # compiled once
    log_z = np.array([np.asarray(vmap_prompts(per_prompt, program, caches, jax.random.key(s)).log_Z)
                      for s in range(SEEDS)])  # [SEEDS, 2]
    for i, pr in enumerate(prompts):
        own = LMProgram.from_prompt(model, pr, 2, tokenizer=tok, banned=tok.eos_ids)
        ratio = np.exp(log_z[:, i] - _exact_log_z(model, own, pr, phi))
        se = ratio.std(ddof=1) / np.sqrt(SEEDS)
        assert abs(ratio.mean() - 1) < max(4 * se, 0.02), (i, ratio.mean(), se)


def test_twist_head_trains_on_an_hf_model(setup):
    """40 DPG steps of the twist-head trainer on the loaded model learn the exact first-step twist
    log ψ*₀(x₀) = φ[x₀] + log Σ_{x₁} p₀(x₁|x₀) e^{φ[x₁]}: p₀-weighted correlation > 0.5 over the vocabulary
    (0.73 measured; the untrained head is constant, and a head fed the wrong hidden state learns nothing)."""
    model, _, prompt, program, phi = setup
    head = TwistHead(model.cfg.d_model, model.cfg.vocab_size, rngs=nnx.Rngs(0))
    head, losses = fit_head(jax.random.key(0), program, head, lambda x: phi[x].sum(), 1.0, steps=40, batch=64,
                            lr=5e-2)
    assert np.all(np.isfinite(np.asarray(losses)))
    v = model.cfg.vocab_size
    seqs = np.concatenate([np.tile(prompt, (v, 1)), np.arange(v)[:, None]], axis=1)
    logp1 = jax.nn.log_softmax(model(jnp.asarray(seqs))[0][:, -1] + program.logit_mask, axis=-1)
    exact = np.asarray(phi + jax.nn.logsumexp(logp1 + phi[None, :], axis=-1))
    learned = np.asarray(HeadTwist(head).candidates(program.init(None), 0))
    p0 = np.asarray(jax.nn.softmax(program.init(None).logits))
    keep = p0 > 0
    cov = np.cov(learned[keep], exact[keep], aweights=p0[keep])
    assert cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]) > 0.5


def test_rewards_use_the_programs_pad_token(setup):
    """After an end token an HF program pads with its own pad id (399 here); a token-score reward built for the
    program skips those pads, and the in-house reward models, which pad with 0, refuse such a program."""
    from models.lm.checkpoint import load_model
    from models.lm.potentials import TokenScores
    from models.lm.rewards import ClassifierReward

    model, tok, prompt, _, phi = setup
    program = LMProgram.from_prompt(model, prompt, 3, tokenizer=tok)
    scores = TokenScores.for_program(program, phi)
    x = jnp.asarray([5, tok.eos_ids[0], tok.pad_id])
    assert float(scores(x)) == pytest.approx(float(phi[5] + phi[tok.eos_ids[0]]))
    clf, _ = load_model("lm_story_classifier")
    with pytest.raises(ValueError, match="pads with 399"):
        ClassifierReward.for_program(clf, program, head=(0, 3), label=2)


def test_program_without_tokenizer_uses_the_checkpoints_ids():
    """A program built from ids alone still ends on the checkpoint's own end tokens (from its generation
    config), and embedding rows beyond the tokenizer are never drawn."""
    model, tok = load_pretrained(FIXTURES / "llama")
    program = LMProgram.from_prompt(model, [396, 5, 6], 3)
    assert sorted(np.asarray(program.eos_ids).tolist()) == sorted(tok.eos_ids) and program.pad_id == tok.pad_id
    bare, _ = load_pretrained(FIXTURES / "llama", tokenizer=False)
    assert LMProgram.from_prompt(bare, [396, 5, 6], 3).pad_id == tok.pad_id

    class Smaller:  # a tokenizer covering only the first 390 rows of the embedding
        eos_ids, pad_id, bos_id, vocab_size = tok.eos_ids, tok.pad_id, tok.bos_id, 390
    program = LMProgram.from_prompt(model, [5, 6], 3, tokenizer=Smaller())
    mask = np.asarray(program.logit_mask)
    assert np.all(np.isneginf(mask[390:])) and np.all(np.isfinite(mask[:390][[5, 6, 100]]))


def test_many_prompts_without_tokenizer_use_the_checkpoints_end_ids():
    """smc_many_prompts on an HF model with id prompts and no tokenizer ends on the checkpoint's own end ids
    (with force_eos every sequence ends with one), not on the in-house <eos> = 2."""
    from models.lm.program import smc_many_prompts

    model, tok = load_pretrained(FIXTURES / "llama")
    out = smc_many_prompts(jax.random.key(0), model, [[396, 5, 6], [396, 7]], 3, lambda x: jnp.zeros(()), 8,
                           cutoff="force_eos")
    for p in out:
        tokens = np.asarray(p.samples)
        assert all(any(t in tok.eos_ids for t in row) for row in tokens), tokens
        assert float(p.log_Z) > -np.inf
