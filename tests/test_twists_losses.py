"""Twist-learning losses against exact answers on the Markov testbed (enumeration: no sampling noise).

Every expectation is taken over all V^T sequences with their exact weights, so the identities below hold to
float precision: each loss has zero gradient at the exact twist ψ* (SIXO at ψ*/Z), the CTL value differs from
its optimum by Σ_t KL(σ_t‖π_t^ψ), and the DPG value by KL(σ‖q^ψ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models import markov_twists
from pplalign import evaluation, twists


@pytest.fixture(scope="module")
def bed(markov):
    lm, reward, beta = markov
    target = pplalign.tilt(lm, reward, beta)
    seqs = lm.all_sequences()
    log_target = lm.log_target(reward, beta)
    log_Z = jax.nn.logsumexp(log_target)
    exact = markov_twists.from_exact(lm.optimal_twist(reward, beta))
    noise = 0.7 * jax.random.normal(jax.random.PRNGKey(5), exact.table.shape)
    perturbed = markov_twists.TabularTwist(exact.table + noise, exact.offsets, exact.vocab_size)
    return dict(
        lm=lm,
        target=target,
        seqs=seqs,
        log_sigma=log_target - log_Z,
        log_p0=lm.log_prob(seqs),
        log_Z=log_Z,
        exact=exact,
        perturbed=perturbed,
    )


def _enumerated_losses(target, twist, seqs, log_sigma, log_p0, log_Z):
    """All five losses with exact expectations: σ- and p₀-weighted sums over every sequence."""
    tr = twists.trace_batch(target, twist, seqs)
    steps = seqs.shape[1]
    # CTL negatives: every sequence with weight p₀(x), reweighted by the loss to p₀ψ_t (prefix marginal π_t^ψ)
    ratio = jnp.broadcast_to(log_p0[:, None], (seqs.shape[0], steps))
    sixo_psi = tr.log_psi - log_Z  # SIXO's optimum is ψ*/Z
    return dict(
        ctl=twists.ctl_loss(tr.log_psi, tr.log_psi, ratio, pos_log_weights=log_sigma),
        sixo=twists.sixo_loss(sixo_psi, sixo_psi, pos_log_weights=log_sigma, neg_log_weights=log_p0),
        dpg=twists.dpg_loss(tr.cand_log_psi, tr.log_p0, tr.tokens, log_weights=log_sigma),
        soft_rl=twists.soft_rl_loss(tr.log_psi, tr.cand_log_psi, tr.log_p0, tr.log_phi),
        fudge=twists.fudge_loss(tr.log_psi, tr.log_phi, log_weights=log_p0),
    )


@pytest.fixture(scope="module")
def values_and_grads(bed):
    """{twist name: {method: (value, gradient w.r.t. the table)}}, from one compiled function."""

    @jax.jit
    def all_losses(table, offsets, tg, s, ls, lp, lz):
        def one(method):
            def f(tab):
                tw = markov_twists.TabularTwist(tab, offsets, bed["exact"].vocab_size)
                return _enumerated_losses(tg, tw, s, ls, lp, lz)[method]

            return jax.value_and_grad(f)(table)

        return {m: one(m) for m in twists.METHODS}

    args = (bed["target"], bed["seqs"], bed["log_sigma"], bed["log_p0"], bed["log_Z"])
    out = {}
    for name in ("exact", "perturbed"):
        res = all_losses(bed[name].table, bed[name].offsets, *args)
        out[name] = {m: (float(v), np.asarray(g)) for m, (v, g) in res.items()}
    return out


@pytest.mark.parametrize("method", twists.METHODS)
def test_gradient_vanishes_at_the_exact_twist(values_and_grads, method):
    _, g_exact = values_and_grads["exact"][method]
    _, g_pert = values_and_grads["perturbed"][method]
    scale = np.max(np.abs(g_pert))
    assert scale > 1e-3, "the gradient must not vanish away from the optimum"
    # float32 round-off of sums over 1024 sequences: far below the gradient a 0.7-nat perturbation gives
    assert np.max(np.abs(g_exact)) < 1e-3 * scale


@pytest.mark.parametrize("method", twists.METHODS)
def test_exact_twist_minimises_the_loss(values_and_grads, method):
    assert values_and_grads["exact"][method][0] < values_and_grads["perturbed"][method][0]


def _prefix_marginals(log_w, vocab, steps, t):
    """log of the marginal over prefix codes x_{≤t} of a law over full sequences (codes, first token major)."""
    return np.logaddexp.reduce(log_w.reshape(vocab ** (t + 1), vocab ** (steps - t - 1)), axis=1)


def test_ctl_value_is_the_sum_of_prefix_kls(bed, values_and_grads):
    lm = bed["lm"]
    v, steps = lm.vocab_size, lm.num_steps
    table, offsets = np.asarray(bed["perturbed"].table, np.float64), np.asarray(bed["perturbed"].offsets)
    log_sigma, log_p0 = np.asarray(bed["log_sigma"], np.float64), np.asarray(bed["log_p0"], np.float64)
    total = 0.0
    for t in range(steps):
        s_t = _prefix_marginals(log_sigma, v, steps, t)
        psi_t = table[offsets[t] : offsets[t] + v ** (t + 1)]
        pi_t = _prefix_marginals(log_p0, v, steps, t) + psi_t
        pi_t = pi_t - np.logaddexp.reduce(pi_t)
        total += float(np.sum(np.exp(s_t) * (s_t - pi_t)))
    diff = values_and_grads["perturbed"]["ctl"][0] - values_and_grads["exact"]["ctl"][0]
    assert total > 0.1
    np.testing.assert_allclose(diff, total, rtol=1e-4, atol=1e-4)


def test_dpg_value_is_the_forward_kl_of_the_proposal(bed, values_and_grads):
    kl = evaluation.exact_kl(bed["target"], bed["perturbed"], bed["seqs"], bed["log_sigma"])["kl_sigma_q"]
    diff = values_and_grads["perturbed"]["dpg"][0] - values_and_grads["exact"]["dpg"][0]
    assert kl > 0.1
    np.testing.assert_allclose(diff, kl, rtol=1e-4, atol=1e-4)
    # at ψ* the value is the entropy of σ
    entropy = -float(jnp.sum(jnp.exp(bed["log_sigma"]) * bed["log_sigma"]))
    np.testing.assert_allclose(values_and_grads["exact"]["dpg"][0], entropy, rtol=1e-4)


def test_soft_bellman_residual_is_zero_at_the_exact_twist(values_and_grads):
    assert values_and_grads["exact"]["soft_rl"][0] < 1e-9
    assert values_and_grads["perturbed"]["soft_rl"][0] > 0.1


def test_trace_weights(bed):
    """Replayed weights: Σ_t log G_t = log Z for ψ*, = r/β for bootstrap; q^ψ sums to one."""
    tg, seqs = bed["target"], bed["seqs"]
    tr = twists.trace_batch(tg, bed["exact"], seqs)
    np.testing.assert_allclose(tr.log_g.sum(-1), bed["log_Z"], atol=2e-5)
    boot = twists.trace_batch(tg, None, seqs[:16])
    np.testing.assert_allclose(boot.log_g.sum(-1), boot.log_phi, atol=1e-6)
    np.testing.assert_allclose(jnp.exp(boot.log_q.sum(-1)), jnp.exp(bed["log_p0"][:16]), rtol=1e-5)
    log_q = evaluation.proposal_log_prob(tg, bed["perturbed"], seqs)
    np.testing.assert_allclose(float(jnp.exp(jax.nn.logsumexp(log_q))), 1.0, atol=1e-5)


def test_trace_matches_one_particle_csmc(bed):
    """The replay reproduces pplalign.smc's weights: CSMC with N = 1 returns the pinned path's log-weight."""
    tg, tw = bed["target"], bed["perturbed"]
    refs = bed["lm"].sample_posterior(jax.random.PRNGKey(7), 4, bed["target"].reward, 1.0)
    tr = twists.trace_batch(tg, tw, refs)
    for i in range(4):
        log_w = pplalign.csmc(jax.random.PRNGKey(i), tg, 1, refs[i], twist=tw).log_Z
        np.testing.assert_allclose(float(tr.log_g[i].sum()), float(log_w), atol=1e-5)


def test_masks_end_sequences_early():
    """With step T−1 masked out, soft RL regresses step T−2 on log φ, and masked steps contribute nothing."""
    log_psi = jnp.array([[0.5, 1.0, 9.0]])
    cand = jnp.zeros((1, 3, 2))
    log_p0 = jnp.log(jnp.full((1, 3, 2), 0.5))
    mask = jnp.array([[1.0, 1.0, 0.0]])
    value = twists.soft_rl_loss(log_psi, cand, log_p0, jnp.array([2.0]), mask=mask)
    # t=0 regresses on the backup of step 1 (log Σ ½·e⁰ = 0); t=1 on log φ = 2
    np.testing.assert_allclose(float(value), 0.5 * 0.5**2 + 0.5 * 1.0**2, rtol=1e-6)
    ctl_all = twists.ctl_loss(log_psi, log_psi, jnp.zeros((1, 3)), pos_mask=mask, neg_mask=mask)
    np.testing.assert_allclose(float(ctl_all), 0.0, atol=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="rank 2"):
        twists.ctl_loss(jnp.zeros((3,)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="neg_log_ratio"):
        twists.ctl_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="log_p0"):
        twists.dpg_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="unknown twist-learning method"):
        twists.method_loss("ppo", None, None, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="num_steps"):
        twists.fit(lambda p, k: 0.0, jnp.zeros(()), jax.random.PRNGKey(0), -1)
