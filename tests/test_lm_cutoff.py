"""The length cut-off of LMProgram (issue 17, item 4): the two semantics against enumeration.

Testbed: a random 1-layer transformer over 6 ids (<pad>, <bos>, <eos>, three words), prompt [<bos>, w], T = 3
steps. Drawable tokens are <eos> and the three words, so the canonical sequences (<pad> after the first <eos>)
are 3³ = 27 unfinished ones and 1 + 3 + 9 = 13 complete ones; p₀ of each comes from one full forward pass of
the network over prompt + x (independent of the program's KV-cache path and of its proposal).

    A ("truncate"):  σ_A(x) ∝ p₀(x_{0:3}) e^{r(x)},           Z_A = Σ_{all 40} p₀(x) e^{r(x)}
    B ("force_eos"): σ_B(x) ∝ p₀(x) 1[x complete] e^{r(x)},  Z_B = Σ_{13 complete} p₀(x) e^{r(x)}

with r(x) = Σ_t φ[x_t] (pads skipped), β = 1. Each estimate is checked over SEEDS seeds run in one vmap:
Ẑ is unbiased, so the mean of Ẑ/Z is within 4 standard errors of 1 (with a 2 % floor for a lucky small SE);
the weighted particles of all seeds, pooled, are within a TV bound of the exact posterior (see _tv_bound).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pplalign
from models.lm.potentials import TokenScores
from models.lm.program import CompleteOnly, LMProgram
from models.lm.tokenizer import BOS, EOS, PAD
from models.lm.transformer import LMConfig, Transformer

CFG = LMConfig(6, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
PROMPT, T, N, SEEDS = [BOS, 3], 3, 256, 8


@pytest.fixture(scope="module")
def bed():
    model = Transformer(CFG, rngs=nnx.Rngs(4))
    # an end within 3 steps has probability ≈ 0.4: both semantics differ clearly and the forced step matters
    model.head.bias[...] = model.head.bias[...].at[EOS].set(-2.0)
    reward = TokenScores(jnp.asarray([0.0, 0.0, 0.3, -0.6, 0.9, 0.1], jnp.float32))
    seqs = _canonical_sequences()
    log_p0 = _log_p0(model, seqs)
    r = np.asarray(jax.vmap(reward)(jnp.asarray(seqs)))
    complete = (seqs == EOS).any(axis=1)
    return dict(model=model, reward=reward, seqs=seqs, log_p0=log_p0, r=r, complete=complete)


def _canonical_sequences():
    out = set()
    for seq in itertools.product([EOS, 3, 4, 5], repeat=T):
        seq = list(seq)
        if EOS in seq:
            k = seq.index(EOS)
            seq = seq[: k + 1] + [PAD] * (T - k - 1)
        out.add(tuple(seq))
    return np.asarray(sorted(out), np.int32)


def _log_p0(model, seqs):
    """log p₀(x) of each canonical sequence: product of the next-token probabilities up to its end token."""
    log_p0 = _log_prob(model, seqs)
    np.testing.assert_allclose(np.logaddexp.reduce(log_p0), 0.0, atol=1e-5)  # p₀ over 40 sequences sums to 1
    return log_p0


def _log_prob(model, tokens):
    """log p₀ of token rows [B, K] after the prompt (whole sequences or prefixes), from a full forward pass."""
    full = np.concatenate([np.tile(PROMPT, (len(tokens), 1)), tokens], axis=1)
    logits, _ = model(jnp.asarray(full))
    banned = np.zeros(CFG.vocab_size, np.float32)
    banned[[PAD, BOS]] = -np.inf
    logp = jax.nn.log_softmax(logits[:, len(PROMPT) - 1:-1] + banned, axis=-1)
    step = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0])
    alive = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0  # steps up to and including the end token
    return np.where(alive, step, 0.0).sum(axis=1)


def _exact(bed, semantics):
    """(log Z, posterior over bed['seqs']) of semantics A or B."""
    log_t = bed["log_p0"] + bed["r"]
    if semantics == "B":
        log_t = np.where(bed["complete"], log_t, -np.inf)
    log_z = np.logaddexp.reduce(log_t)
    return float(log_z), np.exp(log_t - log_z)


def _runs(target, **kw):
    """SEEDS independent SMC runs in one compiled vmap."""
    keys = jax.random.split(jax.random.key(0), SEEDS)
    return jax.jit(jax.vmap(lambda k: pplalign.smc(k, target, N, **kw)))(keys)


def _pooled_pmf(bed, runs):
    """σ̂ over bed['seqs']: each seed's normalised weights, averaged over seeds."""
    index = {tuple(s): i for i, s in enumerate(bed["seqs"].tolist())}
    pmf = np.zeros(len(index))
    w = np.asarray(runs.normalized_weights)
    for s in range(SEEDS):
        for tokens, wi in zip(np.asarray(runs.samples[s]).tolist(), w[s]):
            pmf[index[tuple(tokens)]] += wi / SEEDS
    return pmf


def _tv_bound(p, n):
    """3 × the bound E[TV] ≤ ½ Σ_x √(p_x(1−p_x)/n) of an n-draw empirical pmf (Jensen on E|p̂_x − p_x|),
    with n = SEEDS·N/4: a design effect of 4 for the weighting and the resampling's correlations."""
    return 3 * 0.5 * np.sum(np.sqrt(p * (1 - p) / n))


def _agrees(bed, runs, semantics):
    """(Ẑ/Z within 4 SE of 1, TV within bound, details)."""
    log_z, post = _exact(bed, semantics)
    ratio = np.exp(np.asarray(runs.log_Z) - log_z)
    mean, se = ratio.mean(), ratio.std(ddof=1) / np.sqrt(SEEDS)
    tv = 0.5 * np.abs(_pooled_pmf(bed, runs) - post).sum()
    bound = _tv_bound(post, SEEDS * N / 4)
    return abs(mean - 1) < max(4 * se, 0.02), tv < bound, (mean, se, tv, bound)


def _program(bed, cutoff):
    return LMProgram.from_prompt(bed["model"], PROMPT, T, cutoff=cutoff, bucket=2)


def test_the_two_semantics_differ(bed):
    """The testbed separates them: Z_B/Z_A well below 1 and the posteriors far apart."""
    za, pa = _exact(bed, "A")
    zb, pb = _exact(bed, "B")
    assert zb - za < -0.5
    assert 0.5 * np.abs(pa - pb).sum() > 0.3


def test_truncate_is_the_prefix_law(bed):
    program = _program(bed, "truncate")
    runs = _runs(program.target(bed["reward"], 1.0))
    z_ok, tv_ok, info = _agrees(bed, runs, "A")
    assert z_ok and tv_ok, info
    assert not (np.asarray(runs.samples) == EOS).any(axis=-1).all()  # unfinished sequences are kept
    assert not _agrees(bed, runs, "B")[0]  # and it is not semantics B


@pytest.fixture(scope="module")
def forced_runs(bed):
    """Importance sampling with the forcing proposal (no resampling, so every weight is that particle's own)."""
    program = _program(bed, "force_eos")
    return _runs(program.target(bed["reward"], 1.0), proposal=program.proposal, ess_threshold=0.0)


def test_force_eos_targets_complete_sequences(bed, forced_runs):
    """Forced end with the correction p₀(E | x_{<T−1}): Ẑ → Z_B, σ̂ → σ_B, every particle complete."""
    z_ok, tv_ok, info = _agrees(bed, forced_runs, "B")
    assert z_ok and tv_ok, info
    assert (np.asarray(forced_runs.samples) == EOS).any(axis=-1).all()


def test_force_eos_target_without_the_proposal_is_still_b(bed):
    """The indicator lives in the target, so bootstrap SMC from p₀ (an unfinished draw gets weight 0) agrees
    with B too: a sampler that never sees the proposal (IS, best-of-N, DTS) targets the same law."""
    z_ok, tv_ok, info = _agrees(bed, _runs(_program(bed, "force_eos").target(bed["reward"], 1.0)), "B")
    assert z_ok and tv_ok, info


def test_forced_step_weight_is_the_end_probability(bed, forced_runs):
    """Per particle, exactly: log w = log p₀(x) + r(x) − log q_F(x), and log p₀(x) − log q_F(x) is log p₀(E | h)
    for a forced sequence (0 for one that ended by itself)."""
    index = {tuple(s): i for i, s in enumerate(bed["seqs"].tolist())}
    samples = np.asarray(forced_runs.samples).reshape(-1, T)
    ids = np.asarray([index[tuple(x)] for x in samples.tolist()])
    seqs = bed["seqs"][ids]
    # q_F = p₀ except at the last step of a sequence whose end token sits at position T−1; there q_F(<eos>) = 1
    # (a single end id), so log p₀ − log q_F = log p₀(<eos> | x_{<T−1}) = that step's factor of log p₀
    forced = seqs[:, T - 1] == EOS
    last_factor = bed["log_p0"][ids] - _log_prob(bed["model"], seqs[:, : T - 1])
    expected = bed["r"][ids] + np.where(forced, last_factor, 0.0)
    assert forced.any() and (~forced).any()
    np.testing.assert_allclose(np.asarray(forced_runs.log_weights).ravel(), expected, atol=1e-5)


class _ForcedLaw:
    """The broken cut-off (DESIGN §8): the end is forced *in the law* (transition = q_F), no p₀(E | h) factor."""

    def __init__(self, program):
        self.program, self.num_steps = program, program.num_steps

    def init(self, key):
        return self.program.init(key)

    def transition(self, state, t):
        return self.program.proposal(state, t)

    def update(self, state, x, t):
        return self.program.update(state, x, t)

    def output(self, state):
        return self.program.output(state)


jax.tree_util.register_pytree_node(_ForcedLaw, lambda f: ((f.program,), None), lambda _, c: _ForcedLaw(c[0]))


def test_forcing_without_the_correction_is_caught(bed):
    """The same checks fail for a forced end without the correction: they can tell the two apart."""
    program = _program(bed, "force_eos")
    target = pplalign.tilt(_ForcedLaw(program), CompleteOnly(bed["reward"], program.eos_ids), 1.0)
    z_ok, tv_ok, info = _agrees(bed, _runs(target), "B")
    assert not z_ok and not tv_ok, info


def test_bad_cutoff(bed):
    with pytest.raises(ValueError, match="cutoff must be one of"):
        LMProgram.from_prompt(bed["model"], PROMPT, T, cutoff="stop")
    with pytest.raises(ValueError, match="every end id is banned"):
        LMProgram.from_prompt(bed["model"], PROMPT, T, cutoff="force_eos", banned=[EOS])
