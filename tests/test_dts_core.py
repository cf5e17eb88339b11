"""DTS / DTS* / consistent DTS on a tiny exact stand-in program (3 binary steps, 8 sequences).

Checks: tree invariants, the exact soft-value backup, NFE accounting, sampling without the model, the
unbiasedness (Z scale) and consistency of the consistent variant, DTS*'s greedy output, resume equivalence
through a checkpoint, vmapping over targets, and the errors of bad input."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import pplalign
from pplalign import search
from pplalign.search import DTSConfig

T = 3
V = 2
CAPACITY = 1 + 600 * (T + 1)  # one shape for every tree here, so the compiled iteration is shared


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tiny:
    """p₀(x_0..x_2): x_0 ~ Cat(π), x_t ~ Cat(P[x_{t-1}]); the state is (tokens [T], last token)."""

    log_init: jax.Array
    log_trans: jax.Array
    num_steps: int = dataclasses.field(default=T, metadata=dict(static=True))

    def init(self, key):
        return (jnp.zeros((T,), jnp.int32), jnp.asarray(-1, jnp.int32))

    def transition(self, state, t):
        tokens, last = state
        return dist.CategoricalLogits(jnp.where(last < 0, self.log_init, self.log_trans[jnp.maximum(last, 0)]))

    def update(self, state, x, t):
        tokens, _ = state
        x = jnp.asarray(x, jnp.int32)
        return tokens.at[t].set(x), x

    def output(self, state):
        return state[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableReward:
    """r(x) = table[code(x)], code = base-2 number with x_0 most significant."""

    table: jax.Array

    def __call__(self, x):
        code = jnp.sum(x * (V ** jnp.arange(T - 1, -1, -1)))
        return self.table[code]


def code_of(x):
    return int(np.sum(np.asarray(x) * (V ** np.arange(T - 1, -1, -1))))


BASE = Tiny(jnp.log(jnp.array([0.7, 0.3])), jnp.log(jnp.array([[0.8, 0.2], [0.4, 0.6]])))
# A sharp-ish reward: the rare sequence 1,1,1 (prob 0.3·0.6·0.6 = 0.108) is favoured.
TABLE = jnp.array([0.0, -1.0, -2.0, 0.5, -1.5, 0.0, 1.0, 3.0])
BETA = 1.0


def exact_posterior(table=TABLE, beta=BETA):
    seqs = list(itertools.product(range(V), repeat=T))
    li, lt = np.asarray(BASE.log_init), np.asarray(BASE.log_trans)
    logp = np.array([li[s[0]] + sum(lt[s[i - 1], s[i]] for i in range(1, T)) for s in seqs])
    codes = np.array([code_of(s) for s in seqs])
    logw = logp + np.asarray(table)[codes] / beta
    log_z = float(np.logaddexp.reduce(logw))
    post = np.zeros(V**T)
    post[codes] = np.exp(logw - log_z)
    return post, log_z


@pytest.fixture(scope="module")
def target():
    return pplalign.tilt(BASE, TableReward(TABLE), BETA)


def grow(target, iterations, key=0, **kw):
    cfg = DTSConfig(**kw)
    tree = search.init(target, CAPACITY)
    return search.run(jax.random.PRNGKey(key), tree, target, jnp.asarray(iterations, jnp.int32), cfg, None)


@pytest.fixture(scope="module")
def trees(target):
    return {
        "published": grow(target, 300, variant="published"),
        "consistent": grow(target, 300, variant="consistent"),
        "greedy": grow(target, 300, greedy=True),
    }


# --------------------------------------------------------------------------------------------------
# tree invariants, the backup, NFE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["published", "consistent", "greedy"])
def test_tree_invariants_and_exact_backup(trees, name):
    tree = jax.tree_util.tree_map(np.asarray, trees[name])
    n = int(tree.num_nodes)
    assert int(tree.iteration) == 300 and not bool(tree.full)
    parent, level, visits, value = tree.parent[:n], tree.level[:n], tree.visits[:n], tree.log_value[:n]
    assert parent[0] == -1 and level[0] == 0
    assert np.all(level[1:] == level[parent[1:]] + 1)
    counts = np.bincount(parent[1:], minlength=n)
    assert np.array_equal(counts, tree.num_children[:n])
    # linked lists enumerate exactly the children
    for node in range(n):
        kids, c = [], tree.first_child[node]
        while c != -1:
            kids.append(c)
            c = tree.next_sibling[c]
        assert sorted(kids) == sorted(np.nonzero(parent[1:] == node)[0] + 1)
    leaves = level == T + 1
    assert np.all(counts[leaves] == 0) and np.all(counts[~leaves] >= 1)
    # leaves hold r/β exactly; internal nodes the log-mean-exp of their children (the soft Bellman backup)
    codes = np.sum(tree.states[0][:n] * (V ** np.arange(T - 1, -1, -1)), axis=1)
    np.testing.assert_allclose(value[leaves], np.asarray(TABLE)[codes[leaves]] / BETA, rtol=0, atol=1e-6)
    for node in np.nonzero(~leaves)[0]:
        kids = np.nonzero(parent == node)[0]
        expect = np.logaddexp.reduce(value[kids]) - math.log(len(kids))
        assert abs(value[node] - expect) < 1e-5
    # every iteration passes through the root; an internal node's visits are its children's visits
    assert visits[0] == 300
    for node in np.nonzero(~leaves)[0]:
        assert visits[node] == visits[parent == node].sum()
    # NFE: one transition per node below level 1 (level-1 nodes come from init, which is free)
    assert int(tree.nfe) == int(np.sum(level >= 2))


def test_dts_particles_nfe_and_sampling_costs_nothing(target):
    particles, tree = search.dts(jax.random.PRNGKey(3), target, 50, capacity=CAPACITY, num_samples=64)
    assert particles.samples.shape == (64, T)
    assert int(particles.nfe) == int(tree.nfe) > 0
    assert float(particles.log_Z) == float(tree.log_value[0])
    # drawing from a built tree takes only the tree (no program, no reward): it cannot evaluate the model
    leaves = search.sample_tree(jax.random.PRNGKey(0), tree, T, 16)
    assert np.all(np.asarray(tree.level)[np.asarray(leaves)] == T + 1)


def test_tree_sampling_law_matches_the_backed_up_values(trees):
    """Descent ∝ exp(log Ŵ_c) draws leaf ℓ with probability exp(r_ℓ/β)∏_a (1/m_a) / Ŵ_root."""
    tree = trees["published"]
    nt = jax.tree_util.tree_map(np.asarray, tree)
    n = int(nt.num_nodes)
    leaves = np.nonzero(nt.level[:n] == T + 1)[0]
    logp = np.array([nt.log_value[l] for l in leaves], dtype=np.float64)
    for i, l in enumerate(leaves):
        a = nt.parent[l]
        while a != -1:
            logp[i] -= math.log(nt.num_children[a])
            a = nt.parent[a]
    logp -= nt.log_value[0]
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, atol=1e-4)
    draws = np.asarray(search.sample_tree(jax.random.PRNGKey(1), tree, T, 20000))
    # compare on sequence codes (many leaves share a code), TV tolerance ≈ 3·sqrt(K/N)
    codes = np.sum(nt.states[0][:n] * (V ** np.arange(T - 1, -1, -1)), axis=1)
    want = np.zeros(V**T)
    np.add.at(want, codes[leaves], np.exp(logp))
    got = np.bincount(codes[draws], minlength=V**T) / draws.size
    assert 0.5 * np.abs(got - want).sum() < 3 * math.sqrt(V**T / draws.size)


# --------------------------------------------------------------------------------------------------
# exactness: unbiased values and consistent samples of the corrected DTS; DTS*
# --------------------------------------------------------------------------------------------------


def test_consistent_dts_root_value_is_unbiased_for_Z(target):
    """Growth blind to the values makes Ŵ_root an unbiased estimate of Z (nested importance sampling)."""
    _, log_z = exact_posterior()
    cfg = DTSConfig("consistent")
    tree = search.init(target, CAPACITY)
    keys = jax.random.split(jax.random.PRNGKey(11), 400)
    runs = jax.jit(jax.vmap(lambda k: search.run_loop(k, tree, target, 12, cfg, None)))(keys)
    w = np.exp(np.asarray(runs.log_value[:, 0], np.float64))
    ratio, se = w.mean() / math.exp(log_z), w.std(ddof=1) / math.sqrt(w.size) / math.exp(log_z)
    assert abs(ratio - 1.0) < 4 * se + 1e-3, (ratio, se)


def test_consistent_dts_samples_converge_to_sigma(target):
    post, log_z = exact_posterior()
    particles, tree = search.dts(jax.random.PRNGKey(5), target, 600, capacity=CAPACITY, variant="consistent", num_samples=20000)
    codes = np.array([code_of(x) for x in np.asarray(particles.samples)])
    got = np.bincount(codes, minlength=V**T) / codes.size
    tv = 0.5 * np.abs(got - post).sum()
    # sampling noise ≈ sqrt(K/N)/2 ≈ 0.01; the tree's own error after 600 iterations is of the same order
    assert tv < 0.06, tv
    assert abs(float(particles.log_Z) - log_z) < 0.15


def prefix_twist(state, t):
    """A deliberately rough guide, log ψ̃ = 1.2·(ones so far) − 0.8·(zeros so far): ranks prefixes, is not the
    soft value, and falls along some paths (so the roulette thins internal nodes too)."""
    tokens, last = state
    seen = jnp.arange(T) <= t
    ones = jnp.sum(jnp.where(seen, tokens, 0))
    return (1.2 * ones - 0.8 * (jnp.sum(seen) - ones)).astype(jnp.float32)


def test_twisted_dts_root_value_is_unbiased_and_backup_exact(target):
    """Twist-guided growth with Russian roulette: E[Ŵ_root] = Z (each survivor carries 1/p), and every
    internal value is log-mean-exp(children) − log p_n."""
    _, log_z = exact_posterior()
    cfg = DTSConfig("twisted")
    tree = search.init(target, CAPACITY)
    keys = jax.random.split(jax.random.PRNGKey(12), 400)
    runs = jax.jit(jax.vmap(lambda k: search.run_loop(k, tree, target, 12, cfg, prefix_twist)))(keys)
    assert np.any(np.asarray(runs.log_survival) == -np.inf) and np.any(np.asarray(runs.log_survival) < -0.1)
    w = np.exp(np.asarray(runs.log_value[:, 0], np.float64))
    ratio, se = w.mean() / math.exp(log_z), w.std(ddof=1) / math.sqrt(w.size) / math.exp(log_z)
    assert abs(ratio - 1.0) < 4 * se + 1e-3, (ratio, se)
    # the trees' pooled leaf measures μ_k(ℓ) = exp(r_ℓ/β)∏_a 1/(m_a p_a) (what descending ∝ Ŵ_c samples from,
    # tree k weighted by Ŵ_root,k, as islands are combined) estimate p₀·exp(r/β) without bias: their sum → σ
    nr = jax.tree_util.tree_map(np.asarray, runs)
    mass = np.zeros(V**T)
    for k in range(w.size):
        n = int(nr.num_nodes[k])
        for leaf in np.nonzero((nr.level[k, :n] == T + 1) & (nr.log_survival[k, :n] > -np.inf))[0]:
            lw, a = float(nr.log_value[k, leaf]), nr.parent[k, leaf]
            while a != -1:
                lw -= math.log(nr.num_children[k, a]) + float(nr.log_survival[k, a])
                a = nr.parent[k, a]
            mass[code_of(nr.states[0][k, leaf])] += math.exp(lw)
    post, _ = exact_posterior()
    assert 0.5 * np.abs(mass / mass.sum() - post).sum() < 0.05, 0.5 * np.abs(mass / mass.sum() - post).sum()
    # the backup, on every node of every tree: log Ŵ_n = log Σ_c Ŵ_c − log m_n − log p_n. Nodes revisited by a
    # later iteration (visits ≥ 2) with p_n < 1 are recomputed by the path backup, not only by the rollout that
    # created them: the check reaches that branch (asserted), where forgetting 1/p_n would go unnoticed by one tree
    revisited_thinned = 0
    for k in range(w.size):
        n = int(nr.num_nodes[k])
        parent, value, surv = nr.parent[k, :n], nr.log_value[k, :n].astype(np.float64), nr.log_survival[k, :n]
        level, kids = nr.level[k, :n], nr.num_children[k, :n]
        dead = surv == -np.inf
        assert np.all(kids[dead] == 0) and np.all(value[dead] == -np.inf)
        top = np.full(n, -np.inf)
        np.maximum.at(top, parent[1:], value[1:])
        shift = np.where(np.isfinite(top), top, 0.0)
        total = np.zeros(n)
        np.add.at(total, parent[1:], np.exp(value[1:] - shift[parent[1:]]))
        internal = (level <= T) & ~dead & (np.arange(n) > 0)
        with np.errstate(divide="ignore"):
            expect = np.log(total) + shift - np.log(np.maximum(kids, 1)) - surv
        got = value[internal]
        np.testing.assert_allclose(np.where(np.isfinite(got), got, 0.0), np.where(np.isfinite(expect[internal]), expect[internal], 0.0), atol=1e-4)
        assert np.array_equal(np.isfinite(got), np.isfinite(expect[internal]))
        revisited_thinned += int(np.sum(internal & (nr.visits[k, :n] >= 2) & (surv < 0)))
    assert revisited_thinned > 0


def test_greedy_dts_star_finds_the_best_sequence(target):
    particles, _ = search.dts(jax.random.PRNGKey(0), target, 200, capacity=CAPACITY, greedy=True)
    assert particles.samples.shape == (1, T)
    # the greedy descent follows the largest soft values: the exact soft-optimal path here is 1,1,1
    assert code_of(particles.samples[0]) == int(np.argmax(TABLE))


# --------------------------------------------------------------------------------------------------
# resume, vmap
# --------------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_continues_exactly(target, tmp_path):
    key = jax.random.PRNGKey(42)
    cfg = DTSConfig("published")
    _, straight = search.dts(key, target, 120, capacity=CAPACITY)
    _, half = search.dts(key, target, 60, capacity=CAPACITY)
    path = str(tmp_path / "tree.npz")
    search.save_tree(path, half, key, cfg, target)
    loaded, loaded_key = search.load_tree(path, cfg, target)
    _, resumed = search.dts(loaded_key, target, 60, tree=loaded)
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # chunking the iterations does not change the result either
    _, chunked = search.dts(key, target, 120, capacity=CAPACITY, chunk_size=25)
    np.testing.assert_array_equal(np.asarray(chunked.log_value), np.asarray(straight.log_value))
    # a checkpoint of another configuration is refused
    with pytest.raises(ValueError, match="another configuration"):
        search.load_tree(path, DTSConfig("consistent"), target)
    with pytest.raises(ValueError, match="another configuration"):
        search.load_tree(path, cfg, pplalign.tilt(BASE, TableReward(TABLE), 2.0))
    # a checkpoint saved with a twist resumes only with that twist (e.g. the same calibration offsets)
    twist_a = search.CalibratedTwist(lambda state, t: jnp.zeros(()), jnp.zeros(T + 1), jnp.zeros(T + 1), jnp.asarray(0))
    twist_b = twist_a.__class__(twist_a.twist, jnp.ones(T + 1), twist_a.log_means, twist_a.pilot_nfe)
    search.save_tree(path, half, key, cfg, target, twist=twist_a)
    search.load_tree(path, cfg, target, twist=twist_a)
    with pytest.raises(ValueError, match="twist"):
        search.load_tree(path, cfg, target, twist=twist_b)
    with pytest.raises(ValueError, match="twist"):
        search.load_tree(path, cfg, target)


def test_iteration_vmaps_over_targets(target):
    """One compiled iteration serves a batch of prompts/classes: here two reward tables."""
    tables = jnp.stack([TABLE, -TABLE])
    cfg = DTSConfig("consistent")
    tree = search.init(target, CAPACITY)

    def one(table):
        tg = pplalign.Tilted(BASE, TableReward(table), BETA)  # built inside vmap: no eager validation
        return search.run_loop(jax.random.PRNGKey(0), tree, tg, 40, cfg, None)

    batched = jax.jit(jax.vmap(one))(tables)
    single = jax.jit(one)(tables[1])
    np.testing.assert_allclose(np.asarray(batched.log_value[1]), np.asarray(single.log_value), rtol=1e-6)
    assert np.array_equal(np.asarray(batched.parent[1]), np.asarray(single.parent))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Deterministic:
    """A program whose every step is a point mass (like DDIM with η = 0)."""

    num_steps: int = dataclasses.field(default=T, metadata=dict(static=True))

    def init(self, key):
        return jnp.zeros((1,), jnp.float32)

    def transition(self, state, t):
        return dist.Delta(state + 1.0, event_dim=1)

    def update(self, state, x, t):
        return x

    def output(self, state):
        return state


def test_errors(target):
    with pytest.raises(ValueError, match="capacity .* too small"):
        search.dts(jax.random.PRNGKey(0), target, 1000, capacity=CAPACITY)
    with pytest.raises(ValueError, match="capacity must be"):
        search.dts(jax.random.PRNGKey(0), target, 1, capacity=T)
    with pytest.raises(ValueError, match="stochastic sampler"):
        search.dts(jax.random.PRNGKey(0), pplalign.tilt(Deterministic(), lambda x: -jnp.sum(x**2), 1.0), 5)
    nan_table = TABLE.at[7].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        search.dts(jax.random.PRNGKey(0), pplalign.tilt(BASE, TableReward(nan_table), BETA), 100, capacity=CAPACITY)
    with pytest.raises(ValueError, match="variant"):
        search.dts(jax.random.PRNGKey(0), target, 5, variant="nope")
    with pytest.raises(ValueError, match="greedy"):
        search.dts(jax.random.PRNGKey(0), target, 5, greedy=True, variant="consistent")
    with pytest.raises(ValueError, match="num_iterations"):
        search.dts(jax.random.PRNGKey(0), target, -1)
    with pytest.raises(ValueError, match="Sequential"):
        search.dts(jax.random.PRNGKey(0), BASE, 5)
    # the twisted variant's splits can outgrow the worst case of one rollout per iteration: an error after the run
    with pytest.raises(ValueError, match="filled its capacity"):
        search.dts(jax.random.PRNGKey(0), target, 20, variant="twisted", twist=lambda s, t: 4.0 * prefix_twist(s, t))
    # a documented stop instead of the error: iterations that would not fit are skipped and flagged
    _, tree = search.dts(jax.random.PRNGKey(0), target, 50, capacity=4 * (T + 1), on_full="stop")
    assert bool(tree.full) and int(tree.num_nodes) <= 4 * (T + 1)
