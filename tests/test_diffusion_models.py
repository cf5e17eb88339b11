"""The DDPM/DDIM program, the shipped networks and the resumable training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pplalign
from models.diffusion import ddim, ddpm
from models.diffusion.data import load_digits
from models.diffusion.pretrained import classifier_reward, load_classifier, load_denoiser, program
from models.diffusion.sampler import time_grid
from models.diffusion.train import _digits_split, build, fit, load_params, save_params
from models.gmm_diffusion import ring_mixture

N = 2000


def _null_level(model, n):
    """E[energy distance] between two exact samples of size n: 2·E‖X−X'‖/n (V-statistic)."""
    ref = model.sample_data(jax.random.PRNGKey(7), n)
    return float(jnp.mean(jnp.linalg.norm(ref[:, None] - ref[None], axis=-1))) * 2 / (n - 1)


@pytest.fixture(scope="module")
def ring():
    model = ring_mixture(num_steps=100)
    return model, model.sample_data(jax.random.PRNGKey(1), N), _null_level(model, N)


def _samples(prog, key, n):
    p = pplalign.importance_sampling(key, pplalign.tilt(prog, lambda x: jnp.zeros(()), 1.0), n)
    assert int(p.nfe) == n * prog.num_steps
    return p.samples


def test_ddim_over_learned_ring_reaches_the_data(ring):
    """Strided DDIM (η = 1, 20 of 100 steps) over the shipped ring MLP: energy distance to exact data within 5×
    the exact-vs-exact level. (The step's maths is checked pointwise below; the exact testbed has its own tests.)"""
    model, ref, null = ring
    x = _samples(ddim(load_denoiser("ring"), model.betas, num_steps=20), jax.random.PRNGKey(0), N)
    ed = float(pplalign.metrics.energy_distance(x, ref))
    assert ed < 5 * null, (ed, null)


def test_ddpm_step_is_the_gaussian_posterior(ring):
    """With η = 1 on consecutive steps the step is q(x_{s−1} | x_s, x̂_0): mean and variance β̃_s."""
    model, _, _ = ring
    prog = ddpm(model.denoiser(), model.betas)
    ab, b = np.asarray(model.alpha_bars, np.float64), np.asarray(model.betas, np.float64)
    x = jnp.asarray([1.0, -2.0])
    for t in [0, 50, 98]:
        s = 100 - t
        state = prog.init(jax.random.PRNGKey(0))._replace(x=x, time=jnp.asarray(s))
        state = state._replace(x0=prog.denoise(x, s))
        mean, var = prog.reverse_moments(state, t)
        c0 = np.sqrt(ab[s - 1]) * b[s - 1] / (1 - ab[s])
        c1 = np.sqrt(1 - b[s - 1]) * (1 - ab[s - 1]) / (1 - ab[s])
        np.testing.assert_allclose(mean, c0 * np.asarray(state.x0) + c1 * np.asarray(x), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(var, (1 - ab[s - 1]) / (1 - ab[s]) * b[s - 1], rtol=2e-4)
    assert float(prog.final_var) > 0


def test_resumed_training_equals_uninterrupted(tmp_path):
    """Stopping after 10 of 20 steps and resuming from the checkpoint gives the very same weights."""
    config = dict(kind="classifier", dim=4, hidden=8, depth=1, num_classes=3, steps=20, lr=1e-2)
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 1).astype(jnp.int32)

    def loss(net, key):
        idx = jax.random.randint(key, (16,), 0, 64)
        logits = net(x[idx])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[idx, None], axis=1))

    full, losses_full = fit(build(config), loss, config, chunk=5)
    ckpt = tmp_path / "ckpt.npz"
    fit(build(config), loss, config, checkpoint=ckpt, save_every=5, chunk=5, stop_after=10)
    resumed, losses_resumed = fit(build(config), loss, config, checkpoint=ckpt, save_every=5, chunk=5)
    np.testing.assert_allclose(losses_resumed, losses_full, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="another configuration"):
        fit(build(config), loss, dict(config, lr=0.5), checkpoint=ckpt)
    save_params(tmp_path / "w.npz", resumed, config)
    loaded, cfg = load_params(tmp_path / "w.npz")
    assert cfg == config
    np.testing.assert_allclose(loaded(x), resumed(x), rtol=1e-6)


def test_shipped_classifier_and_reward():
    """The classifier is accurate on held-out digits; log p(C|x) ≤ 0 and a superset of classes scores higher."""
    _, (xte, yte) = _digits_split()
    clf = load_classifier()
    assert float(np.mean(np.argmax(np.asarray(clf(jnp.asarray(xte))), -1) == yte)) > 0.95
    x, _ = load_digits()
    x = jnp.asarray(x[:32])
    even, zero = classifier_reward([0, 2, 4, 6, 8]), classifier_reward([0])
    r_even, r_zero = jax.vmap(even)(x), jax.vmap(zero)(x)
    assert r_even.shape == (32,) and bool(jnp.all(r_even <= 1e-6))
    assert bool(jnp.all(r_even >= r_zero - 1e-5))
    assert clf.features(x).shape[0] == 32


def test_digits_program_shapes():
    prog = program("digits", num_steps=5, label=3)
    state = prog.init(jax.random.PRNGKey(0))
    assert state.x.shape == (64,) and prog.event_shape == (64,)
    assert prog.transition(state, 0).event_shape == (64,)


def test_bad_input():
    model = ring_mixture(num_steps=10)
    with pytest.raises(ValueError, match="eta"):
        ddim(model.denoiser(), model.betas, eta=0.0)
    with pytest.raises(ValueError):
        time_grid(10, 11)
    with pytest.raises(ValueError, match="unknown checkpoint"):
        load_denoiser("imagenet")
    with pytest.raises(ValueError):
        ddim(model.denoiser())
