"""Static Bayesian targets for the tempered-SMC peer benchmark, each a prior and a likelihood with known log Z.

A target is a prior p(z) on R^D (a numpyro distribution with event shape [D]) and an observation model
p(y | z) with data y, so that

    σ(z) = p(z) p(y | z) / Z,        Z = p(y) = ∫ p(z) p(y | z) dz,

and every sampler sees the same two functions: ``log_prior(z) = log p(z)`` and ``log_likelihood(z) =
log p(y | z)`` (blackjax's ``logprior_fn`` / ``loglikelihood_fn``; for pplalign ``tilt(prior model,
log_likelihood, β = 1)``, whose λ-path is blackjax's tempering path p(z) p(y | z)^λ), and
``numpyro_model()`` holds both as a latent site ``"z"`` and an observed site ``"y"`` (numpyro importance
sampling).

Targets (:func:`make_target` by name):

* ``gauss{D}`` — conjugate Gaussian: z ~ N(μ0, s0² I), y | z ~ N(z, τ² I), y_d on a line from −1 to 2.
  log Z = Σ_d log N(y_d; μ0, s0² + τ²), exact.
* ``banana{D}`` — the twisted Gaussian of Haario, Saksman & Tamminen (1999): with φ_b(z) = (z1, z2 + b·(z1²
  − s1²), z3, …), the prior is p(z) = N(φ_b(z); 0, S), S = diag(s1², 1, …, 1), and y | z ~ N(φ_b(z), τ² I).
  φ_b is a shear with unit Jacobian, so u = φ_b(z) is Gaussian under the prior (this is also how the prior is
  sampled: z = φ_b⁻¹(u)), and Z = ∫ N(u; 0, S) N(y; u, τ² I) du = Π_d N(y_d; 0, S_dd + τ²), exact. Prior,
  every intermediate tempered law and posterior are bananas in z (b = 0.1, s1 = 10: Haario's "strongly
  twisted" case).
* ``logistic`` — Bayesian logistic regression on scikit-learn's breast-cancer data (569 rows, 30
  standardised features and an intercept, D = 31), z ~ N(0, I), y_i | z ~ Bernoulli(σ(x_i·z)). log Z has no
  closed form; :data:`LOGISTIC_LOG_Z` is a reference value, reproduced by ``python -m
  benchmarks._tempered_targets --reference`` (see :func:`logistic_reference`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = [
    "Target",
    "make_target",
    "gaussian_target",
    "banana_target",
    "logistic_target",
    "TwistedNormal",
    "logistic_reference",
    "LOGISTIC_LOG_Z",
    "LOGISTIC_LOG_Z_SE",
]

MU0, S0, TAU = 0.5, 1.5, 0.5  # conjugate Gaussian
BANANA_B, BANANA_S1, BANANA_TAU = 0.1, 10.0, 0.5

# Reference log Z of the logistic regression, and its standard error, printed as "pooled log Z" by
#   python -m benchmarks._tempered_targets --reference --samples 4000000 --seeds 8
# (8 × 4·10⁶ draws of importance sampling from a Student-t(ν = 8) at the Laplace approximation, see
# logistic_reference; the seeds gave −55.2229, −55.2248, −55.2216, −55.2246, −55.2245, −55.2040, −55.2166,
# −55.2296, pooled −55.22104 ± 0.00275 from their spread; ~7 min on 2 CPU cores).
LOGISTIC_LOG_Z = -55.22104
LOGISTIC_LOG_Z_SE = 0.00275


@dataclasses.dataclass(frozen=True)
class Target:
    """A prior p(z) on R^D, an observation model p(y | z) with its data y, and log Z = log p(y) (± se)."""

    name: str
    prior: dist.Distribution
    observation: Callable[[jax.Array], dist.Distribution]
    data: jax.Array
    log_Z: float
    log_Z_se: float = 0.0  # 0 where log Z is exact

    @property
    def dim(self) -> int:
        return int(self.prior.event_shape[0])

    def log_prior(self, z: jax.Array) -> jax.Array:
        return self.prior.log_prob(z)

    def log_likelihood(self, z: jax.Array) -> jax.Array:
        return self.observation(z).log_prob(self.data)

    def sample_prior(self, key: jax.Array, n: int) -> jax.Array:
        return self.prior.sample(key, (n,))

    def prior_model(self) -> jax.Array:
        return numpyro.sample("z", self.prior)

    def numpyro_model(self) -> None:
        numpyro.sample("y", self.observation(self.prior_model()), obs=self.data)


# --- conjugate Gaussian ---------------------------------------------------------------------------------


def gaussian_target(dim: int) -> Target:
    y = jnp.linspace(-1.0, 2.0, dim)
    log_Z = float(jnp.sum(dist.Normal(MU0, math.sqrt(S0**2 + TAU**2)).log_prob(y)))
    return Target(
        f"gauss{dim}",
        dist.Normal(MU0 * jnp.ones(dim), S0).to_event(1),
        lambda z: dist.Normal(z, TAU).to_event(1),
        y,
        log_Z,
    )


# --- banana (twisted Gaussian) ----------------------------------------------------------------------------


def _twist(z: jax.Array, b: float, s1: float) -> jax.Array:
    """φ_b(z) = (z1, z2 + b(z1² − s1²), z3, …): a shear along z2, unit Jacobian."""
    return z.at[..., 1].add(b * (z[..., 0] ** 2 - s1**2))


def _untwist(u: jax.Array, b: float, s1: float) -> jax.Array:
    return u.at[..., 1].add(-b * (u[..., 0] ** 2 - s1**2))


class TwistedNormal(dist.Distribution):
    """The banana law of z = φ_b⁻¹(u), u ~ N(0, diag(scale²)): density N(φ_b(z); 0, diag(scale²)) (unit
    Jacobian), Haario et al. (1999)."""

    arg_constraints = {"scale": constraints.positive}
    support = constraints.real_vector
    reparametrized_params = ["scale"]

    def __init__(self, scale: jax.Array, b: float, *, validate_args=None):
        self.scale, self.b = jnp.asarray(scale), float(b)
        if self.scale.ndim != 1 or self.scale.shape[0] < 2:
            raise ValueError(f"TwistedNormal needs a scale vector of length >= 2; got shape {self.scale.shape}")
        super().__init__(batch_shape=(), event_shape=self.scale.shape, validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        u = self.scale * jax.random.normal(key, tuple(sample_shape) + self.event_shape)
        return _untwist(u, self.b, self.scale[0])

    def log_prob(self, value):
        u = _twist(value, self.b, self.scale[0])
        return jnp.sum(dist.Normal(0.0, self.scale).log_prob(u), axis=-1)


def banana_target(dim: int) -> Target:
    if dim < 2:
        raise ValueError(f"the banana needs D >= 2; got {dim}")
    scale = jnp.ones(dim).at[0].set(BANANA_S1)
    # Data off the banana's axis of symmetry (z1 -> -z1), so that a sign error in the tempering would show.
    y = jnp.concatenate([jnp.array([3.0, -1.0]), jnp.linspace(-1.0, 2.0, dim)[2:]])
    log_Z = float(jnp.sum(dist.Normal(0.0, jnp.sqrt(scale**2 + BANANA_TAU**2)).log_prob(y)))
    return Target(
        f"banana{dim}",
        TwistedNormal(scale, BANANA_B),
        lambda z: dist.Normal(_twist(z, BANANA_B, BANANA_S1), BANANA_TAU).to_event(1),
        y,
        log_Z,
    )


# --- logistic regression ------------------------------------------------------------------------------------


def breast_cancer_design() -> tuple[jax.Array, jax.Array]:
    """scikit-learn's breast-cancer data: X [569, 31] (an intercept column, then the 30 features standardised
    to mean 0 and sd 1), y [569] in {0, 1} (1 = benign)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    x = np.concatenate([np.ones((x.shape[0], 1)), x], axis=1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(data.target, jnp.float32)


def logistic_target() -> Target:
    x, y = breast_cancer_design()
    return Target(
        "logistic",
        dist.Normal(jnp.zeros(x.shape[1]), 1.0).to_event(1),
        lambda z: dist.Bernoulli(logits=x @ z).to_event(1),
        y,
        LOGISTIC_LOG_Z,
        LOGISTIC_LOG_Z_SE,
    )


def _laplace(target: Target, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """The posterior mode (Newton's method; the log posterior is strictly concave) and the Hessian of
    −log posterior there, in float64 numpy."""
    log_post = lambda z: target.log_prior(z) + target.log_likelihood(z)
    grad, hess = jax.jit(jax.grad(log_post)), jax.jit(jax.hessian(log_post))
    z = np.zeros(target.dim)
    for _ in range(iters):
        z = z - np.linalg.solve(np.asarray(hess(jnp.asarray(z, jnp.float32)), np.float64),
                                np.asarray(grad(jnp.asarray(z, jnp.float32)), np.float64))
    return z, -np.asarray(hess(jnp.asarray(z, jnp.float32)), np.float64)


def logistic_reference(num_samples: int, seed: int, dof: float = 8.0, batch: int = 100_000) -> tuple[float, float]:
    """log Ẑ of the logistic target by importance sampling, and the delta-method standard error of log Ẑ.

    Proposal q: a multivariate Student-t with ``dof`` degrees of freedom, centred at the posterior mode m with
    scale matrix H⁻¹ (H the Hessian of −log σ at m: the Laplace approximation with heavier tails, so that
    w = p(z) p(y | z) / q(z) has finite variance). Ẑ = mean_i w_i is unbiased for Z; se(log Ẑ) ≈
    sd(w) / (√M · mean(w)). Weights are formed in float64 from float32 log densities.
    """
    target = logistic_target()
    mode, h = _laplace(target)
    chol = np.linalg.cholesky(np.linalg.inv(h))
    q = dist.MultivariateStudentT(dof, jnp.asarray(mode, jnp.float32), jnp.asarray(chol, jnp.float32))

    @jax.jit
    def log_weights(key):
        z = q.sample(key, (batch,))
        return jax.vmap(lambda v: target.log_prior(v) + target.log_likelihood(v))(z) - q.log_prob(z)

    key = jax.random.key(seed)
    lw = np.concatenate([np.asarray(log_weights(k), np.float64)
                         for k in jax.random.split(key, max(num_samples // batch, 1))])
    shift = lw.max()
    w = np.exp(lw - shift)
    log_z = float(np.log(w.mean()) + shift)
    se = float(w.std(ddof=1) / (math.sqrt(len(w)) * w.mean()))
    return log_z, se


def make_target(name: str) -> Target:
    """``gauss{D}``, ``banana{D}`` or ``logistic``."""
    m = re.fullmatch(r"(gauss|banana)(\d+)", name)
    if m:
        return (gaussian_target if m.group(1) == "gauss" else banana_target)(int(m.group(2)))
    if name == "logistic":
        return logistic_target()
    raise ValueError(f"unknown target {name!r}; use gauss<D>, banana<D> or logistic")


def main(argv=None):
    parser = argparse.ArgumentParser(description="reference log Z of the logistic-regression target")
    parser.add_argument("--reference", action="store_true", required=True)
    parser.add_argument("--samples", type=int, default=4_000_000)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args(argv)
    runs = [logistic_reference(args.samples, seed) for seed in range(args.seeds)]
    for seed, (lz, se) in enumerate(runs):
        print(f"seed {seed}: log Ẑ = {lz:.5f} ± {se:.5f}")
    lz = np.array([r[0] for r in runs])
    # Equal sample sizes: the pooled estimate is the mean of the seeds' Ẑ (still unbiased for Z), and its
    # standard error on the log scale is that of the seeds' spread, cross-checked by the delta-method ones.
    pooled = float(np.log(np.mean(np.exp(lz - lz.max()))) + lz.max())
    se_spread = float(lz.std(ddof=1) / math.sqrt(len(lz)))
    se_delta = float(math.sqrt(np.sum(np.array([r[1] for r in runs]) ** 2)) / len(runs))
    print(f"pooled log Z = {pooled:.5f} ± {se_spread:.5f} (spread over seeds; delta method {se_delta:.5f})")

if __name__ == "__main__":
    main()
