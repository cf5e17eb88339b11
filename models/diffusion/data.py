"""Training data: 2-D toy laws (the 8-component ring of the exact testbed, a checkerboard) and scikit-learn's
8×8 digits (bundled with scikit-learn; nothing is downloaded), flattened to 64 values in [−1, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ring_sampler", "checkerboard_sampler", "load_digits", "DIGIT_SCALE"]

DIGIT_SCALE = 8.0  # pixel values 0..16 map to x = v/8 − 1 ∈ [−1, 1]


def ring_sampler():
    """(key, n) -> [n, 2] draws from the exact testbed's 8-component ring (radius 4, std 0.5)."""
    from models.gmm_diffusion import ring_mixture

    model = ring_mixture()
    return lambda key, n: model.sample_data(key, n)


def checkerboard_sampler(size: float = 4.0, cells: int = 4):
    """(key, n) -> [n, 2] uniform on the dark squares of a cells×cells board over [−size, size]²."""

    def sample(key, n):
        k1, k2, k3 = jax.random.split(key, 3)
        width = 2 * size / cells
        col = jax.random.randint(k1, (n,), 0, cells)
        row = 2 * jax.random.randint(k2, (n,), 0, cells // 2) + (col % 2)
        u = jax.random.uniform(k3, (n, 2))
        return jnp.stack([-size + (col + u[:, 0]) * width, -size + (row + u[:, 1]) * width], axis=-1)

    return sample


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(x [1797, 64] float32 in [−1, 1], labels [1797] int32)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return (d.data.astype(np.float32) / DIGIT_SCALE - 1.0), d.target.astype(np.int32)
