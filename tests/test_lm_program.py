"""The LM as a Sequential program: KV-cache resampling equals recomputation, EOS masks, many prompts,
SMC on the LM against the exact log Z by enumeration, twist head (issue 4)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pplalign
from models.lm.potentials import TokenScores
from models.lm.program import LMProgram, in_place_ancestors, prompt_caches, stay_in_place, vmap_prompts
from models.lm.tokenizer import BOS, EOS, PAD, Tokenizer
from models.lm.transformer import LMConfig, Transformer
from models.lm.twist_head import HeadTwist, TwistHead

CFG = LMConfig(12, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=24)
PROMPT = [BOS, 5, 7, 9]


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _replay(program, tokens, resample_at, rng, n, in_place=False):
    """Feed tokens [n, T] step by step, resampling with random ancestors at the given steps."""
    states = jax.vmap(program.init)(jax.random.split(jax.random.key(0), n))
    update = jax.jit(jax.vmap(program.update, in_axes=(0, 0, None)))
    reorder = jax.jit(program.reorder)
    for t in range(tokens.shape[1]):
        states = update(states, jnp.asarray(tokens[:, t]), t)
        if t in resample_at:
            anc = rng.integers(0, n, n).astype(np.int32)
            if in_place:  # every surviving parent keeps its slot: the in-place row-copy path
                anc = np.asarray(in_place_ancestors(jnp.asarray(anc)))
            states = reorder(states, jnp.asarray(anc), t)
            tokens = tokens[anc]
    return states, tokens


@pytest.mark.parametrize("mode,dtype,in_place", [("bucketed", jnp.float32, False), ("full", jnp.float32, False),
                                                 ("inplace", jnp.float32, True), ("inplace", jnp.float32, False),
                                                 ("inplace", jnp.bfloat16, True)])
def test_resampled_cache_equals_recomputation(model, mode, dtype, in_place):
    n, steps = 6, 11
    program = LMProgram.from_prompt(model, PROMPT, steps, bucket=4, reorder_mode=mode, cache_dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (n, steps))
    states, tokens = _replay(program, tokens, {0, 2, 3, 6, 9}, rng, n, in_place)
    np.testing.assert_array_equal(states.tokens, tokens)
    full = np.concatenate([np.tile(PROMPT, (n, 1)), tokens], axis=1)
    logits, hidden, kv = model(jnp.asarray(full), return_kv=True)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(states.logits[:, 3:], logits[:, -1, 3:], atol=tol)
    np.testing.assert_allclose(states.hidden, hidden[:, -1], atol=tol)
    np.testing.assert_allclose(states.kv.astype(jnp.float32), kv[:, :, :, len(PROMPT):], atol=tol)


def test_eos_absorbs_and_masks(model):
    biased = nnx.clone(model)
    biased.head.bias[...] = biased.head.bias[...].at[EOS].set(4.0)
    program = LMProgram.from_prompt(biased, PROMPT, 8)
    parts = pplalign.smc(jax.random.key(1), pplalign.tilt(program, lambda x: jnp.zeros(()), 1.0), 64, ess_threshold=0.0)
    toks = np.asarray(parts.samples)
    for row in toks:
        hits = np.flatnonzero(row == EOS)
        assert hits.size > 0  # the bias makes an early <eos> almost certain
        assert (row[hits[0] + 1:] == PAD).all() and (row[: hits[0]] > EOS).all()
    np.testing.assert_allclose(parts.log_weights, 0.0)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="longer than the cache"):
        LMProgram.from_prompt(model, PROMPT, CFG.max_len)
    with pytest.raises(ValueError, match="longer than the prompt cache"):
        prompt_caches(model, [PROMPT], pad_to=2)
    with pytest.raises(ValueError, match="cannot encode"):
        LMProgram.from_prompt(model, "hello there", 4, tokenizer=Tokenizer(["a", "b"]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        LMProgram.from_prompt(model, "a b", 4)


def _exact_log_z(model, program, reward, steps, prompt):
    """log Σ_x p₀(x) exp(r(x)) over every canonical sequence (<pad> after the first <eos>)."""
    words = [EOS] + list(range(3, CFG.vocab_size))
    seqs = set()
    for seq in itertools.product(words, repeat=steps):
        seq = list(seq)
        if EOS in seq:
            k = seq.index(EOS)
            seq = seq[: k + 1] + [PAD] * (steps - k - 1)
        seqs.add(tuple(seq))
    seqs = np.asarray(sorted(seqs), np.int32)
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits, _ = model(jnp.asarray(full))
    logp = jax.nn.log_softmax(logits[:, len(prompt) - 1:-1] + program.logit_mask, axis=-1)
    step_lp = jnp.take_along_axis(logp, jnp.asarray(seqs)[..., None], axis=-1)[..., 0]
    alive = np.cumsum(seqs == EOS, axis=1) - (seqs == EOS) == 0
    log_p0 = jnp.sum(jnp.where(alive, step_lp, 0.0), axis=1)
    np.testing.assert_allclose(jax.nn.logsumexp(log_p0), 0.0, atol=1e-4)  # a normalised p₀
    return float(jax.nn.logsumexp(log_p0 + jax.vmap(reward)(jnp.asarray(seqs))))


def test_smc_on_the_lm_estimates_the_exact_log_z(model):
    small = LMConfig(7, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=12)
    global CFG
    saved, CFG = CFG, small
    try:
        lm = Transformer(small, rngs=nnx.Rngs(3))
        steps = 4
        program = LMProgram.from_prompt(lm, [BOS, 4], steps, bucket=2)
        scores = TokenScores(0.7 * jax.random.normal(jax.random.key(5), (small.vocab_size,)))
        target = pplalign.tilt(program, scores, 1.0)
        exact = _exact_log_z(lm, program, scores, steps, [BOS, 4])
        n, seeds = 256, 6
        for kw in (dict(twist=scores, proposal=program.transition, ess_threshold=0.5), dict(twist=scores, ess_threshold=0.5)):
            est = np.asarray([pplalign.smc(jax.random.key(s), target, n, **kw).log_Z for s in range(seeds)])
            # log Ẑ is biased low by ≈ Var/2 = O(1/N); allow 4 standard errors of the mean plus that bias
            tol = 4 * est.std(ddof=1) / np.sqrt(seeds) + est.var() + 1e-3
            assert abs(est.mean() - exact) < tol, (kw.keys(), est, exact)
    finally:
        CFG = saved


def test_reorder_modes_give_identical_smc(model):
    scores = TokenScores(jax.random.normal(jax.random.key(2), (CFG.vocab_size,)))
    out = {}
    for mode in ("inplace", "full"):
        program = LMProgram.from_prompt(model, PROMPT, 10, bucket=4, reorder_mode=mode)
        out[mode] = pplalign.smc(jax.random.key(7), pplalign.tilt(program, scores, 1.0), 16, twist=scores,
                                 proposal=program.transition, ess_threshold=1.0,
                                 resampling=stay_in_place(pplalign.systematic))
    assert np.any(np.asarray(out["full"].ancestors) != np.arange(16))
    for mode in ("inplace",):
        np.testing.assert_array_equal(out[mode].samples, out["full"].samples)
        np.testing.assert_allclose(out[mode].log_Z, out["full"].log_Z, rtol=1e-5)


def test_in_place_ancestors_keep_the_multiset():
    rng = np.random.default_rng(0)
    fn = jax.jit(in_place_ancestors)
    for n in (1, 2, 9):
        for _ in range(10):
            anc = np.sort(rng.integers(0, n, n))
            new = np.asarray(fn(jnp.asarray(anc, jnp.int32)))
            assert sorted(new) == sorted(anc)
            assert all(new[i] == i for i in set(anc.tolist()))


def test_many_prompts_at_once(model):
    prompts = [[BOS, 5], [BOS, 6, 7, 8], [BOS, 9, 3]]
    caches = prompt_caches(model, prompts, pad_to=5)
    base = LMProgram.build(model, jax.tree_util.tree_map(lambda a: a[0], caches), 6)
    scores = TokenScores(jax.random.normal(jax.random.key(2), (CFG.vocab_size,)))
    beta = jnp.asarray(1.0)  # concrete, made outside the vmap (tilt checks it)
    fn = lambda k, prog: pplalign.smc(k, pplalign.tilt(prog, scores, beta), 8, twist=scores, proposal=prog.transition)
    res = vmap_prompts(fn, base, caches, jax.random.key(0))
    assert res.samples.shape == (3, 8, 6) and res.log_Z.shape == (3,)
    # padding a prompt does not change its program: the next-token logits agree with the unpadded prefill
    for i, p in enumerate(prompts):
        single = LMProgram.from_prompt(model, p, 6)
        np.testing.assert_allclose(single.init(None).logits, base.init(None).logits if i == 0 else
                                   LMProgram.build(model, jax.tree_util.tree_map(lambda a: a[i], caches), 6).init(None).logits,
                                   atol=1e-5)


def test_zero_twist_head_is_bootstrap(model):
    program = LMProgram.from_prompt(model, PROMPT, 6)
    head = TwistHead(CFG.d_model, CFG.vocab_size, rngs=nnx.Rngs(0))
    scores = TokenScores(jax.random.normal(jax.random.key(2), (CFG.vocab_size,)))
    parts = pplalign.smc(jax.random.key(3), pplalign.tilt(program, scores, 2.0), 32, twist=HeadTwist(head), ess_threshold=0.0)
    # ψ ≡ 1: the proposal is p₀ and each final weight is r(x)/β
    np.testing.assert_allclose(parts.log_weights, jax.vmap(scores)(parts.samples) / 2.0, atol=1e-5)
