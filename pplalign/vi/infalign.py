"""InfAlign-CTRL: calibrate-and-transform KL-regularised RL for best-of-N decoding (Balashankar et al. 2024,
"InfAlign: inference-aware language model alignment", arXiv 2412.19792).

Calibration. For a prompt with base policy p₀ and reward r, the calibrated reward is the base policy's CDF
of the reward, with ties split (the mid-rank form):

    C(x) = P_{y~p₀}[r(y) < r(x)] + ½·P_{y~p₀}[r(y) = r(x)],

so C(x) = the win rate of x against one sample of p₀, C is invariant to any increasing map of r, and for a
continuous reward law C(y) ~ Uniform(0, 1) when y ~ p₀. It is estimated from m samples of p₀ for the same
prompt (:func:`calibrate` with ``base_values`` their rewards; optional ``base_weights`` give an exact CDF on
a finite support, e.g. p₀'s probabilities of every sequence).

Best-of-N and win rates. BoN_N(π) draws N samples of π and keeps the one of largest reward; its calibrated
reward U has CDF F_π(u)^N. Against one base sample its win rate is E[C(BoN_N(π))]; against the base decoded
the same way (the paper's inference-time win rate) it is P(U_π > U_{p₀}) with U_{p₀} ~ max of N uniforms,
i.e. E[G_N(BoN_N(π))] with G_N(u) = P_{p₀}-BoN_N[C < u] + ½·P[=] (u^N for a continuous law).
:func:`bon_win_rates` computes both exactly on a finite support.

Transform. The paper proves the KL-constrained optimum of any such inference-time win rate is a tilt
σ ∝ p₀·exp(Φ(C)/β) for some transform Φ of the calibrated reward, and for best-of-N proposes the exponential
family Φ_t(u) = exp(t·u), t > 0, used here as exp(t·(u − 1)) (a factor e^{−t} that β absorbs; t → 0 recovers the calibrated reward up to an affine map, which β absorbs:
(e^{tu} − 1)/t → u). Because C is Uniform(0, 1) under p₀ whatever the model, t can be chosen once per
(N, KL budget) on the *uniform* model: there σ_{t,β}(u) ∝ exp(e^{tu}/β) on [0, 1], with
KL(σ‖Uniform) = ∫σ log σ and BoN win rate ∫ N F^{N−1} σ · G_N; :func:`choose_t` maximises that win rate over
a grid of t, each at the β that meets the KL budget (bisection on β). This is our choice of t: the one that is
best on the calibrated (uniform) problem at the KL the policy will be held to.

Fit. :func:`ctrl_objective` is :func:`pplalign.vi.kl_regularised_rl` on ``tilt(base, CTRLReward, β)``: the
existing KL-regularised VI, whose maximiser is σ ∝ p₀·exp(Φ_t(C(x))/β).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..programs import Tilted, tilt
from .objectives import Objective, kl_regularised_rl

__all__ = ["calibrate", "exponential_transform", "CTRLReward", "ctrl_objective", "bon_win_rates",
           "uniform_bon_win_rate", "choose_t"]


def _base_cdf(base_values, base_weights):
    """(sorted distinct values, P[R < v], P[R = v]) of the base reward law."""
    v = np.asarray(base_values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("calibration needs at least one base-policy reward sample")
    if not np.all(np.isfinite(v)):
        raise ValueError("base-policy rewards must be finite")
    w = np.full(v.shape, 1.0 / v.size) if base_weights is None else np.asarray(base_weights, np.float64).ravel()
    if w.shape != v.shape or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"base_weights must be non-negative, not all 0, one per base value; got shape {w.shape}")
    levels, inverse = np.unique(v, return_inverse=True)
    mass = np.bincount(inverse, weights=w / w.sum(), minlength=len(levels))
    below = np.concatenate([[0.0], np.cumsum(mass)[:-1]])
    return levels, below, mass


def calibrate(values: Any, base_values: Any, base_weights: Optional[Any] = None) -> jax.Array:
    """C(values) = P_{p₀}[R < r] + ½ P_{p₀}[R = r] from base rewards (samples, or a weighted support)."""
    levels, below, mass = (jnp.asarray(a, jnp.float32) for a in _base_cdf(base_values, base_weights))
    return _mid_cdf(jnp.asarray(values, jnp.float32), levels, below, mass)


@jax.jit
def _mid_cdf(r, levels, below, mass):
    i = jnp.searchsorted(levels, r, side="left")  # levels strictly below r: indices < i
    j = jnp.clip(i, 0, levels.shape[0] - 1)
    hit = (i < levels.shape[0]) & (levels[j] == r)
    cum = jnp.concatenate([jnp.zeros((1,), below.dtype), jnp.cumsum(mass)])
    u = cum[i] + jnp.where(hit, 0.5 * mass[j], 0.0)
    # a NaN reward stays NaN (searchsorted would rank it above every level, the best calibrated reward)
    return jnp.where(jnp.isnan(r), jnp.nan, u)


def exponential_transform(u: Any, t: float) -> jax.Array:
    """Φ_t(u) = exp(t·(u − 1)), the paper's exp(t·u) for best-of-N (t > 0) scaled by e^{−t} — a constant
    factor that β absorbs (σ ∝ p₀·exp(e^{tu}/β) = p₀·exp(Φ_t(u)/(β e^{−t}))), kept so that Φ_t ≤ 1 in float32."""
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"the best-of-N transform needs t > 0; got {t}")
    return jnp.exp(t * (jnp.asarray(u) - 1.0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CTRLReward:
    """r̃(x) = Φ_t(C(r(x))): the calibrated (by the base law ``levels``/``below``/``mass``) and transformed
    reward; a pytree, so a tilt of it compiles once for many calibrations."""

    reward: Callable
    levels: jax.Array
    below: jax.Array
    mass: jax.Array
    t: jax.Array

    @classmethod
    def build(cls, reward: Callable, base_values: Any, t: float, base_weights: Optional[Any] = None) -> "CTRLReward":
        if not callable(reward):
            raise ValueError(f"reward must be callable; got {type(reward).__name__}")
        exponential_transform(0.0, t)  # validates t
        levels, below, mass = (jnp.asarray(a, jnp.float32) for a in _base_cdf(base_values, base_weights))
        return cls(reward, levels, below, mass, jnp.asarray(t, jnp.float32))

    def calibrated(self, x) -> jax.Array:
        return _mid_cdf(jnp.asarray(self.reward(x), jnp.float32), self.levels, self.below, self.mass)

    def __call__(self, x) -> jax.Array:
        return jnp.exp(self.t * (self.calibrated(x) - 1.0))  # Φ_t of exponential_transform


def ctrl_objective(family: Any, base: Any, reward: Callable, base_values: Any, *, t: float, beta: float,
                   base_weights: Optional[Any] = None, **kwargs: Any) -> Objective:
    """InfAlign-CTRL's loss: KL-regularised RL toward σ ∝ p₀·exp(Φ_t(C(x))/β) (``kwargs`` go to
    :func:`kl_regularised_rl`: ``num_samples``, ``estimator``)."""
    target = tilt(base, CTRLReward.build(reward, base_values, t, base_weights), beta)
    assert isinstance(target, Tilted)
    return kl_regularised_rl(family, target, **kwargs)


def _check_probs(p, name):
    p = np.asarray(p, np.float64)
    if np.any(p < -1e-9) or abs(p.sum() - 1.0) > 1e-4:
        raise ValueError(f"{name} must be a probability vector (sum {p.sum():.6g}, min {p.min():.3g})")
    return np.clip(p, 0.0, None) / np.clip(p, 0.0, None).sum()


def bon_win_rates(values: Any, policy_probs: Any, base_probs: Any, n: int) -> dict:
    """Exact win rates of BoN_n(π) on a finite support (reward ``values`` [K] with laws π, p₀ [K]; ties ½):
    ``vs_base`` against one p₀ sample, ``vs_base_bon`` against BoN_n(p₀)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"best-of-n needs an int n >= 1; got {n!r}")
    v = np.asarray(values, np.float64).ravel()
    pi, p0 = _check_probs(policy_probs, "policy_probs"), _check_probs(base_probs, "base_probs")
    if not (v.shape == pi.shape == p0.shape):
        raise ValueError(f"values, policy_probs and base_probs must have one shape; got {v.shape}, {pi.shape}, {p0.shape}")
    levels, inv = np.unique(v, return_inverse=True)
    mass = lambda p: np.bincount(inv, weights=p, minlength=len(levels))

    def bon_mass(p):  # law of the largest reward level among n draws: F(l)^n − F(l⁻)^n
        cdf = np.cumsum(mass(p))
        return np.diff(np.concatenate([[0.0], np.clip(cdf, 0, 1) ** n]))

    def win(a, b):  # P(A > B) + ½ P(A = B) over reward levels
        below = np.concatenate([[0.0], np.cumsum(b)[:-1]])
        return float(np.sum(a * (below + 0.5 * b)))

    q = bon_mass(pi)
    return dict(vs_base=win(q, mass(p0)), vs_base_bon=win(q, bon_mass(p0)))


def _uniform_tilt(t: float, beta: float, grid: np.ndarray) -> np.ndarray:
    """Cell masses of σ(u) ∝ exp(Φ_t(u)/β) on the cells (midpoints ``grid``) of [0, 1]."""
    lw = np.exp(t * (grid - 1.0)) / beta  # Φ_t as in exponential_transform
    w = np.exp(lw - lw.max())
    return w / w.sum()


def uniform_bon_win_rate(t: float, beta: float, n: int, *, grid_size: int = 4096) -> dict:
    """On the calibrated (uniform) model, discretised into ``grid_size`` cells: KL(σ_{t,β}‖U) and BoN_n(σ)'s
    win rates against U and against BoN_n(U) (the max of n draws has cell masses F_i^n − F_{i−1}^n)."""
    u = (np.arange(grid_size) + 0.5) / grid_size
    m = _uniform_tilt(t, beta, u)
    cdf = np.minimum(np.cumsum(m), 1.0)
    bon = np.diff(np.concatenate([[0.0], cdf**n]))
    return dict(kl=float(np.sum(m * np.log(np.maximum(m * grid_size, 1e-300)))),
                vs_base=float(np.sum(bon * u)), vs_base_bon=float(np.sum(bon * u**n)))


def _beta_for_kl(t: float, kl: float, n: int) -> float:
    lo, hi = -25.0, 15.0  # log β bracket (Φ_t ∈ (e^{−t}, 1]): KL decreases in β
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if uniform_bon_win_rate(t, float(np.exp(mid)), n)["kl"] > kl:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def choose_t(n: int, kl: float, ts: Any = (0.25, 0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64), *,
             against: str = "vs_base_bon") -> dict:
    """t of Φ_t = exp(t·u) maximising BoN_n's win rate on the uniform model at KL(σ‖p₀) = ``kl``."""
    if not kl > 0:
        raise ValueError(f"the KL budget must be > 0; got {kl}")
    if against not in ("vs_base", "vs_base_bon"):
        raise ValueError(f"against must be 'vs_base' or 'vs_base_bon'; got {against!r}")
    rows = []
    for t in ts:
        beta = _beta_for_kl(float(t), kl, n)
        rows.append(dict(t=float(t), beta=beta, **uniform_bon_win_rate(float(t), beta, n)))
    best = max(rows, key=lambda r: r[against])
    return dict(t=best["t"], beta=best["beta"], win_rate=best[against], grid=rows)
