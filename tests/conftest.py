"""Shared fixtures. Compiles are the cost of this suite: build targets once per session and reuse them."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax
import pytest

from models.markov_lm import TableReward, random_markov_lm


@pytest.fixture(scope="session")
def markov():
    """A 4-token, 5-step Markov LM with a random non-decomposable reward, tilted at β = 1.

    Returns (lm, reward, beta): exact log Z, posterior and optimal twists come from enumeration (1024 paths).
    """
    lm = random_markov_lm(jax.random.PRNGKey(0), vocab_size=4, num_steps=5)
    reward = TableReward(1.0 * jax.random.normal(jax.random.PRNGKey(1), (4**5,)), 4)
    return lm, reward, 1.0


def _observed_normal_posterior(obs: float, obs_sd: float, reward):
    """(log Z, mean, variance) of σ(z) ∝ N(z; 0, 1)·N(obs; z, obs_sd)·exp(reward(z)), by the trapezoid rule
    on a fine grid: the exact answer for the one-latent models with an observed ``y`` in the static tests."""
    import math

    import numpy as np

    z = np.linspace(-10, 10, 200001)
    log_f = (
        -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
        - 0.5 * ((obs - z) / obs_sd) ** 2 - np.log(obs_sd * np.sqrt(2 * np.pi))
        + reward(z)
    )
    f = np.exp(log_f)
    zf = np.trapezoid(f, z)
    mean = np.trapezoid(z * f, z) / zf
    return math.log(zf), mean, np.trapezoid((z - mean) ** 2 * f, z) / zf


@pytest.fixture(scope="session")
def observed_normal_posterior():
    """The function (obs, obs_sd, reward) → (log Z, mean, variance) of N(0,1) prior · N(obs; z, sd) · e^r."""
    return _observed_normal_posterior
