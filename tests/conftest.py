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
