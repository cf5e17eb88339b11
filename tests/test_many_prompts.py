"""Many prompts in one compiled call (issue 17, item 3): ``smc_many_prompts`` gives each prompt its own particle
system and returns its own Particles, log Ẑ and NFE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pplalign
from models.lm.potentials import TokenScores
from models.lm.program import LMProgram, smc_many_prompts
from models.lm.tokenizer import BOS, EOS
from models.lm.transformer import LMConfig, Transformer

CFG = LMConfig(12, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=16)
PROMPTS = [[BOS, 5], [BOS, 6, 7, 8], [BOS, 9, 3]]  # lengths 2, 4, 3; last tokens 5, 8, 3
PAD_TO, T, N = 4, 5, 16


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(1))


def test_each_prompt_equals_running_it_alone(model):
    """Prompt b of the batch = ``pplalign.smc`` on that prompt alone with key split(key, B)[b]: the same tokens
    and ancestors exactly, weights and log Ẑ to 1e-5 (not bit-for-bit: under the prompt vmap XLA batches the
    matmuls and may sum in another order, a few ulps on the logits)."""
    reward = TokenScores(jax.random.normal(jax.random.key(2), (CFG.vocab_size,)))
    key = jax.random.key(11)
    many = smc_many_prompts(key, model, PROMPTS, T, reward, N, pad_to=PAD_TO, twist=reward, ess_threshold=1.0)
    assert len(many) == len(PROMPTS)
    keys = jax.random.split(key, len(PROMPTS))
    for b, prompt in enumerate(PROMPTS):
        program = LMProgram.from_prompt(model, prompt, T, prompt_cache_len=PAD_TO)
        alone = pplalign.smc(keys[b], pplalign.tilt(program, reward, 1.0), N, twist=reward, ess_threshold=1.0)
        np.testing.assert_array_equal(many[b].samples, alone.samples)
        np.testing.assert_array_equal(many[b].ancestors, alone.ancestors)
        np.testing.assert_allclose(many[b].log_weights, alone.log_weights, atol=1e-5)
        np.testing.assert_allclose(many[b].log_Z, alone.log_Z, atol=1e-5)
        assert int(many[b].nfe) == N * T and np.isfinite(float(many[b].log_Z))
    assert np.any(np.asarray(many[0].ancestors) != np.arange(N))  # it did resample


def _own_token_reward(program):
    """r_b(x) = 8·#{t: x_t = the last token of prompt b}: each prompt pulls toward a token of its own."""
    last = program.prompt.tokens[program.prompt.length - 1]
    return TokenScores(8.0 * jax.nn.one_hot(last, CFG.vocab_size))


def test_particles_never_mix_across_prompts(model):
    """Rewards that differ wildly per prompt (each wants its prompt's last token, +8 nats a time), with the
    forced-end cut-off: each prompt's particles carry its own token at least 0.5 times per sequence on average and
    three times more often than any other prompt's (a particle resampled from another prompt would carry that
    prompt's token), and every one is complete."""
    many = smc_many_prompts(jax.random.key(0), model, PROMPTS, T, _own_token_reward, N, pad_to=PAD_TO,
                            per_prompt_reward=True, cutoff="force_eos", ess_threshold=1.0)
    own = [p[-1] for p in PROMPTS]
    for b, result in enumerate(many):
        x = np.asarray(result.samples)
        w = np.asarray(result.normalized_weights)
        count = lambda tok: float(np.sum(w * (x == tok).sum(axis=1)))  # σ̂-mean occurrences per sequence
        others = [count(o) for i, o in enumerate(own) if i != b]
        assert count(own[b]) >= 0.5 and count(own[b]) > 3 * max(others), (b, count(own[b]), others)
        assert (x == EOS).any(axis=1).all()
        assert np.isfinite(float(result.log_Z))


def test_bad_inputs(model):
    reward = TokenScores(jnp.zeros((CFG.vocab_size,)))
    with pytest.raises(ValueError, match="non-empty"):
        smc_many_prompts(jax.random.key(0), model, [], T, reward, N)
    with pytest.raises(ValueError, match="need a tokenizer"):
        smc_many_prompts(jax.random.key(0), model, ["a b"], T, reward, N)
    with pytest.raises(ValueError, match="beta"):
        smc_many_prompts(jax.random.key(0), model, PROMPTS, T, reward, N, beta=0.0)
    with pytest.raises(ValueError, match="num_particles"):
        smc_many_prompts(jax.random.key(0), model, PROMPTS, T, reward, 0)
