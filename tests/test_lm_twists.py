"""Twist head on the LM: losses of pplalign.twists decrease, and the learned head helps twisted SMC (issue 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pplalign
from models.lm.potentials import TokenScores
from models.lm.program import LMProgram
from models.lm.tokenizer import BOS
from models.lm.transformer import LMConfig, Transformer
from models.lm.twist_head import HeadTwist, TwistHead, fit_head

CFG = LMConfig(10, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=12)


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    program = LMProgram.from_prompt(model, [BOS, 4], 6)
    reward = TokenScores(1.5 * jax.random.normal(jax.random.key(1), (CFG.vocab_size,)))
    return program, reward


@pytest.mark.parametrize("method", ["dpg", "soft_rl"])
def test_head_losses_decrease_and_help_smc(setup, method):
    program, reward = setup
    head = TwistHead(CFG.d_model, CFG.vocab_size, rngs=nnx.Rngs(0))
    trained, losses = fit_head(jax.random.key(0), program, head, reward, 1.0, method=method, steps=60, batch=64, lr=3e-2)
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < losses[:10].mean() - 0.05, losses
    target = pplalign.tilt(program, reward, 1.0)
    seeds = range(6)
    boot = np.asarray([pplalign.smc(jax.random.key(s), target, 32, ess_threshold=0.0).log_Z for s in seeds])
    tw = np.asarray([pplalign.smc(jax.random.key(s), target, 32, twist=HeadTwist(trained), ess_threshold=0.0).log_Z
                     for s in seeds])
    # both estimate the same log Z; the learned twist reduces the spread of log Ẑ (importance sampling, 6 seeds)
    assert abs(boot.mean() - tw.mean()) < 4 * np.sqrt((boot.var() + tw.var()) / len(seeds)) + 0.05
    assert tw.std() < boot.std()
