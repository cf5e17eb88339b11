"""Regex constraints as potentials on the exact Markov testbed (V = 4 tokens "a".."d", T = 5, 1024 sequences).

The automaton comes from outlines-core's regex Index (models.hf.constraints over a 4-token vocabulary); the
truth comes from Python's ``re.fullmatch`` on every one of the 1024 strings, independently of the automaton:
Z = P_{p₀}(x ∈ L), σ ∝ p₀·1[L], and with the conftest reward Z_r = Σ p₀ e^{r} 1[L].
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.hf.constraints import TokenVocabulary, regex_automaton
from models.markov_lm import MarkovLM
from pplalign.constraints import ConstrainedState, TokenAutomaton, constrain
from pplalign.metrics import tv_distance

VOCAB = TokenVocabulary((b"a", b"b", b"c", b"d"))
PATTERN = r"a[abcd]*d|[bc]+a?"  # 112 of the 1024 strings; final states do not persist (exact-length horizon)
N, SEEDS = 256, 16


def _strings(seqs):
    return ["".join("abcd"[i] for i in s) for s in np.asarray(seqs)]


def _matches(seqs, pattern=PATTERN):
    return np.array([re.fullmatch(pattern, s) is not None for s in _strings(seqs)])


@pytest.fixture(scope="module")
def exact(markov):
    """Enumeration in numpy (no per-op compiles): every sequence, its log p₀, its reward, and whether it matches."""
    lm, reward, beta = markov
    seqs = np.array(list(itertools.product(range(4), repeat=lm.num_steps)))  # row i has base-4 code i
    log_init, log_trans = np.asarray(lm.log_init, np.float64), np.asarray(lm.log_trans, np.float64)
    log_p = log_init[seqs[:, 0]] + log_trans[seqs[:, :-1], seqs[:, 1:]].sum(axis=1)
    log_r = np.asarray(reward.values, np.float64) / beta  # TableReward: r = values[code]
    inside = _matches(seqs)
    z = np.exp(log_p)[inside].sum()
    z_r = np.exp(log_p + log_r)[inside].sum()
    post = np.where(inside, np.exp(log_p), 0.0) / z
    return dict(seqs=seqs, inside=inside, z=z, z_r=z_r, post=post)


@pytest.fixture(scope="module")
def automaton():
    return regex_automaton(VOCAB, PATTERN)


def _runs(target, twist, seeds=SEEDS, n=N):
    return [pplalign.smc(jax.random.key(s), target, n, twist=twist) for s in range(seeds)]


def _ratio_stats(runs, z):
    ratio = np.array([float(jnp.exp(p.log_Z)) for p in runs]) / z
    return ratio.mean(), ratio.std(ddof=1) / np.sqrt(len(ratio))


@pytest.fixture(scope="module")
def constrained_runs(markov, automaton):
    lm, _, _ = markov
    target, twist = constrain(lm, automaton)
    return _runs(target, twist)


@pytest.mark.parametrize("pattern", [PATTERN, r"a[ab]*b", r"(a|bc)+d*", r"(ab|c)*d[abc]?", r"a{2,3}b?c*",
                                     r"(a|ab)(c|bcd)d*", r"[^c]*", r"(ab)*"])
def test_automaton_language_is_re_fullmatch(pattern):
    """Over every string of 1..5 tokens the table accepts exactly what ``re.fullmatch`` accepts (outlines-core's
    Index unanchored would refuse e.g. "abab" for a[ab]*b, and anchored without the leading sentinel it has no
    start state for patterns that match the empty text, such as [^c]*)."""
    auto = regex_automaton(VOCAB, pattern)
    table, final = np.asarray(auto.next_state), np.asarray(auto.final)
    for length in range(1, 6):
        seqs = np.array(list(itertools.product(range(4), repeat=length)))
        q = np.full(len(seqs), auto.initial)
        for k in range(length):
            q = table[q, seqs[:, k]]
        np.testing.assert_array_equal(final[q], _matches(seqs, pattern), err_msg=f"{pattern}, length {length}")


def test_indicator_and_twist_equal_enumeration(markov, automaton, exact):
    """The target's final potential is log 1[re.fullmatch] on all 1024 strings, and ψ_t of every prefix is
    1 iff some completion of the prefix to T tokens matches (the exact-length "can still complete")."""
    lm, _, _ = markov
    target, twist = constrain(lm, automaton)
    seqs = exact["seqs"]
    log_ind = np.asarray(jax.vmap(target.reward)(jnp.asarray(seqs)))
    np.testing.assert_array_equal(np.isfinite(log_ind), exact["inside"])
    table = np.asarray(automaton.next_state)
    q = np.full(len(seqs), automaton.initial)
    for t in range(lm.num_steps):
        q = table[q, seqs[:, t]]  # automaton state after step t of every sequence
        # one row per prefix of length t+1 (a block of V^{T-1-t} consecutive sequences shares it)
        block = 4 ** (lm.num_steps - 1 - t)
        completable = exact["inside"].reshape(-1, block).any(axis=1)
        states = ConstrainedState(None, jnp.asarray(q[::block]))
        psi = np.asarray(jax.vmap(lambda s: twist(s, t))(states))
        np.testing.assert_array_equal(np.isfinite(psi), completable, err_msg=f"step {t}")


def test_twisted_smc_constrained_posterior_and_z(markov, constrained_runs, exact):
    """σ ∝ p₀·1[L] by twisted SMC with the constraint twist: Ẑ/Z, TV to σ, and every particle matches."""
    mean, se = _ratio_stats(constrained_runs, exact["z"])
    # Ẑ is unbiased: E[Ẑ/Z] = 1; over 16 fixed seeds the mean lies within 4 standard errors (t₁₅ tail < 0.2 %)
    assert se > 0 and abs(mean - 1.0) < 4 * se, (mean, se)
    for p in constrained_runs:  # every particle is alive and its string matches
        assert bool(jnp.all(jnp.isfinite(p.log_weights)))
        assert _matches(p.samples).all()
    # pooled weighted histogram of the 16 × 256 particles (each run's normalised weights, averaged)
    lm = markov[0]
    codes = np.concatenate([np.asarray(lm.codes(p.samples)) for p in constrained_runs])
    weights = np.concatenate([np.asarray(p.normalized_weights) for p in constrained_runs]) / len(constrained_runs)
    pmf = np.bincount(codes, weights=weights, minlength=4**5)
    # E[TV] of n i.i.d. draws ≈ ½ Σ_k sqrt(2 p_k(1 − p_k)/(π n)) (tests/test_smc.py). The particles of one run
    # are correlated by resampling (final ESS ≈ 220 of 256, plus shared ancestry); n = SEEDS·N/4 = 1024 counts
    # every run as a quarter of its N. Measured: TV = 0.049, against E[TV] = 0.042 for 4096 i.i.d. draws and
    # 0.084 at n = 1024; the bound is 1.5× the latter. A sampler that ignores the steps left, or puts mass
    # outside L, fails the matching check above first.
    p = exact["post"]
    n_eff = SEEDS * N / 4
    expected = 0.5 * np.sum(np.sqrt(2 * p * (1 - p) / (np.pi * n_eff)))
    tv = float(tv_distance(jnp.asarray(pmf), jnp.asarray(p)))
    assert tv < 1.5 * expected, (tv, expected)


def test_constraint_composes_with_reward_and_learned_twist(markov, automaton, exact):
    """σ ∝ p₀·e^{r}·1[L]: the tilt's reward times the constraint, with the exact twist of the *unconstrained*
    tilted target as a learned twist multiplied in; Ẑ is unbiased for Z_r = Σ p₀ e^r 1[L] by enumeration."""
    lm, reward, beta = markov
    learned = lm.optimal_twist(reward, beta)  # ψ* of p₀·e^r, not of the constrained target: a guess, not exact
    target, twist = constrain(pplalign.tilt(lm, reward, beta), automaton, twist=learned)
    runs = _runs(target, twist)
    mean, se = _ratio_stats(runs, exact["z_r"])
    assert se > 0 and abs(mean - 1.0) < 4 * se, (mean, se)  # as above: 4 SE over 16 seeds
    assert all(_matches(p.samples).all() for p in runs)


def test_all_particles_dead_gives_all_zero_without_nan(automaton):
    """A p₀ with P(x ∈ L) = 0 though L has strings of length 5: it always starts with 'b' (allowed: 'bbbbb'
    matches) and always follows 'b' with 'd' (never allowed after 'b'). At step 1 every candidate the twist
    allows has p₀ = 0, so every particle dies: the result says all_zero, with no NaN."""
    log_init = jnp.log(jnp.asarray([0.0, 1.0, 0.0, 0.0]))  # always 'b'
    trans = np.full((4, 4), 0.25)
    trans[1] = [0.0, 0.0, 0.0, 1.0]  # after 'b' always 'd': '[bc]+a?' and 'a…d' both die at step 1
    lm = MarkovLM(log_init, jnp.log(jnp.asarray(trans)), 5)
    target, twist = constrain(lm, automaton)
    p = pplalign.smc(jax.random.key(0), target, N, twist=twist)  # N as above: the compiled run is reused
    _assert_all_zero(p)
    # death at the last step: '[abc]+d' needs a final 'd', which this p₀ never draws (padded to the same
    # shape, so the compiled run is reused)
    trans = np.full((4, 4), 1 / 3)
    trans[:, 3] = 0.0
    lm = MarkovLM(jnp.full((4,), -np.log(4.0)), jnp.log(jnp.asarray(trans)), 5)
    target, twist = constrain(lm, regex_automaton(VOCAB, r"[abc]+d").padded(automaton.num_states))
    _assert_all_zero(pplalign.smc(jax.random.key(0), target, N, twist=twist))


def _assert_all_zero(p):
    assert bool(p.all_zero)
    assert float(p.log_Z) == -np.inf
    assert not np.isnan(np.asarray(p.log_weights)).any() and not np.isnan(float(p.log_Z))


def test_bad_input_is_refused_before_sampling(markov, automaton):
    lm, _, _ = markov
    with pytest.raises(ValueError, match="Z = 0"):  # 6 tokens never fit in T = 5
        constrain(lm, regex_automaton(VOCAB, r"[abcd]{6}"))
    with pytest.raises(ValueError, match="no token automaton"):  # no token spells "e"
        regex_automaton(VOCAB, r"e+")
    with pytest.raises(ValueError, match="no token automaton"):  # not a regex outlines-core compiles
        regex_automaton(VOCAB, r"(a")
    other = random_lm_of_size(5)
    with pytest.raises(ValueError, match="vocabulary of 4"):
        constrain(other, automaton)
    shuffled = TokenVocabulary((b"b", b"a", b"c", b"d"))
    with pytest.raises(ValueError, match="another tokenizer"):
        constrain(lm, automaton, vocab_hash=shuffled.hash)
    with pytest.raises(ValueError, match="max_table_bytes"):
        regex_automaton(VOCAB, PATTERN, max_table_bytes=64)
    assert automaton.table_bytes == 4 * automaton.num_states * 4


def random_lm_of_size(v):
    uniform = jnp.full((v,), -np.log(v), jnp.float32)
    return MarkovLM(uniform, jnp.tile(uniform, (v, 1)), 5)


def test_end_tokens_only_from_final_states_and_pads_neutral():
    """With an end token (id 4) and a pad (id 5): the end token is allowed only where the text is in L, after
    it only the pad, and ``must_end`` decides whether a final state without an end token counts."""
    vocab = TokenVocabulary((b"a", b"b", b"c", b"d", None, None), eos_ids=(4,), pad_id=5)
    auto = regex_automaton(vocab, r"ab")
    table = np.asarray(auto.next_state)
    q0 = auto.initial
    qa = table[q0, 0]
    qab = table[qa, 1]
    assert table[q0, 4] == 0 and table[qa, 4] == 0  # no end before the text matches
    ended = table[qab, 4]
    assert ended != 0 and table[ended, 5] == ended and (np.delete(table[ended], 5) == 0).all()
    assert bool(auto.final[ended]) and not bool(auto.final[qab])  # must_end: only ENDED is final
    loose = regex_automaton(vocab, r"ab", must_end=False)
    assert bool(loose.final[np.asarray(loose.next_state)[np.asarray(loose.next_state)[q0, 0], 1]])
    mask = TokenAutomaton.from_mask([True, False, True, True, False, False], end_ids=(4,), pad_id=5)
    assert mask.num_states == 3 and mask.table_bytes == 3 * 6 * 4
