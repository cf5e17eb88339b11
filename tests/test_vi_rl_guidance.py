"""RL guidance on the exact testbed: the geometric mix of p₀ and the fine-tuned σ_β is exact at w = 1, off
σ_{β/w} otherwise (measured), and the SMC correction is exact: log Ẑ unbiased on the Z scale, TV shrinking.

Tolerances: R independent runs of Ẑ/Z have mean 1 with standard error s/√R; we allow 5 se. TV of the
weighted particle law to σ is averaged over runs; it must fall as N grows 16 → 256 (bias O(1/N), noise
O(1/√N)) and end below the mix's own TV at w = 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.markov_lm import TableReward, random_markov_lm
from models.markov_vi import PrefixTable, exact_posterior_logits
from pplalign.vi import rl_guidance as rg

R = 64


@pytest.fixture(scope="module")
def guided():
    lm = random_markov_lm(jax.random.key(30), 4, 4)
    reward = TableReward(1.5 * jax.random.normal(jax.random.key(31), (256,)), 4)
    beta = 1.0
    tuned = PrefixTable(exact_posterior_logits(lm, reward, beta), 4, 4)
    return lm, reward, beta, tuned


def _mix_tv(lm, reward, beta, tuned, w):
    law = jnp.exp(rg.mixed_law(lm, tuned, w, lm.all_sequences()))
    return float(pplalign.metrics.tv_distance(law, lm.posterior(reward, beta / w)))


def test_mix_distance(guided):
    lm, reward, beta, tuned = guided
    assert _mix_tv(lm, reward, beta, tuned, 1.0) < 1e-5  # w = 1: the fine-tuned model is σ_β
    assert _mix_tv(lm, reward, beta, tuned, 2.0) > 0.02  # ψ^w ≠ the twist of σ_{β/w}
    assert _mix_tv(lm, reward, beta, tuned, 0.5) > 0.002


def test_smc_correction_exact(guided):
    lm, reward, beta, tuned = guided
    w = 2.0
    sigma = lm.posterior(reward, beta / w)
    log_Z = lm.log_Z(reward, beta / w)
    tvs = {}
    for n in (16, 256):
        res = jax.jit(jax.vmap(lambda k: rg.guided_smc(k, lm, tuned, reward, beta, w, n)))(jax.random.split(jax.random.key(n), R))
        ratio = np.asarray(jnp.exp(res.log_Z - log_Z))
        assert abs(ratio.mean() - 1) <= 5 * ratio.std(ddof=1) / np.sqrt(R) + 1e-6, (n, ratio.mean())
        pmfs = jax.vmap(lambda s, lw: pplalign.metrics.empirical_pmf(lm.codes(s), 256, lw))(res.samples, res.log_weights)
        tvs[n] = float(jnp.mean(jax.vmap(lambda p: pplalign.metrics.tv_distance(p, sigma))(pmfs)))
    assert tvs[256] < 0.6 * tvs[16], tvs
    assert tvs[256] < _mix_tv(lm, reward, beta, tuned, w), tvs


def test_bad_inputs(guided):
    lm, reward, beta, tuned = guided
    with pytest.raises(ValueError, match="w must be > 0"):
        rg.guided_smc(jax.random.key(0), lm, tuned, reward, beta, 0.0, 8)
    with pytest.raises(ValueError, match="num_steps"):
        rg.GeometricMix(lm, PrefixTable(tuned.logits[:21], 3, 4), 1.0)
