"""Imperfect verifiers for resampling (Stroebl, Kapoor & Narayanan 2024, "Inference scaling fLaws: the limits of
LLM resampling with imperfect verifiers").

Two verifiers of a candidate solution, each a binary accept:

* :class:`NoisyChecker` — the exact checker corrupted: a right solution is accepted with probability TPR, a
  wrong one with probability FPR. The coin is keyed by (seed, problem, the solution's tokens), so it is a
  *function of the solution*: resampling the same wrong solution passes it again, as with a real verifier.
* :class:`ThresholdPRM` — the shipped PRM's outcome score (v after the last token) thresholded at τ;
  :func:`operating_points` picks τ for target false-positive rates on a labelled pool and reports each
  point's measured FPR and TPR.

Resampling until accepted (best-of-n with a verifier). Draw up to n samples, return the first accepted one,
abstain if none is. With per-problem sample accuracy p and acceptance a = p·TPR + (1 − p)·FPR,

    P(right within n) = p·TPR·(1 − (1 − a)^n)/a,   P(wrong within n) = (1 − p)·FPR·(1 − (1 − a)^n)/a,

and as n → ∞ the accuracy rises to the ceiling

    P(right | accepted) = p·TPR / (p·TPR + (1 − p)·FPR)   (= p / (p + (1 − p)·FPR) for TPR = 1),

which no amount of resampling passes (:func:`resampling_ceiling`); averaged over problems, the ceiling is
the mean of the per-problem ones. With the utility abstain = 0, right = 1, wrong = −c the expected utility
at n is P(right) − c·P(wrong): per problem it is monotone in n (its sign is that of p·TPR − c(1−p)·FPR), but
over a mix of easy and hard problems it peaks at a finite n (:func:`utility_optimal_n`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

__all__ = ["check_range", "NoisyChecker", "ThresholdPRM", "operating_points", "resampling_ceiling",
           "resampling_curve", "first_accepted", "utility_optimal_n"]


def check_range(values, low: float, high: float, name: str = "verifier") -> np.ndarray:
    """``values`` as an array, or ValueError if any is non-finite or outside the declared [low, high]."""
    v = np.asarray(values, np.float64)
    bad = ~np.isfinite(v) | (v < low) | (v > high)
    if bad.any():
        raise ValueError(f"{name} returned {v[bad].ravel()[0]!r}, outside its declared range [{low}, {high}]")
    return v


def _rate(x, name):
    if not (isinstance(x, (int, float, np.floating)) and 0.0 <= float(x) <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1]; got {x!r}")
    return float(x)


@dataclasses.dataclass(frozen=True)
class NoisyChecker:
    """Accept a right solution with probability ``tpr`` and a wrong one with probability ``fpr``; the coin is
    a deterministic function of (``seed``, problem index, solution tokens)."""

    fpr: float
    seed: int = 0
    tpr: float = 1.0

    def __post_init__(self):
        _rate(self.fpr, "fpr")
        _rate(self.tpr, "tpr")

    def coin(self, problem: int, tokens) -> float:
        digest = hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=8).digest()
        return float(np.random.default_rng([self.seed, int(problem), int.from_bytes(digest, "little")]).random())

    def __call__(self, problem: int, tokens, correct: bool) -> bool:
        return self.coin(problem, tokens) < (self.tpr if correct else self.fpr)

    def accepts(self, pool: np.ndarray, correct: np.ndarray) -> np.ndarray:
        """[P, M] accept of every pool sample ([P, M, T] tokens, [P, M] exact labels)."""
        out = np.zeros(correct.shape, bool)
        for i in range(pool.shape[0]):
            for j in range(pool.shape[1]):
                out[i, j] = self(i, pool[i, j], bool(correct[i, j]))
        return out


@dataclasses.dataclass(frozen=True)
class ThresholdPRM:
    """Accept iff the outcome score P_ORM = exp(v_last) ∈ [0, 1] is ≥ ``threshold``."""

    threshold: float

    def accepts(self, orm_prob) -> np.ndarray:
        return check_range(orm_prob, 0.0, 1.0, "the PRM's outcome probability") >= self.threshold


def operating_points(orm_prob: np.ndarray, correct: np.ndarray, target_fprs: Sequence[float]) -> list[dict]:
    """For each target FPR, the smallest threshold whose measured FPR on the labelled pool is ≤ it, with the
    measured FPR (accepted wrong / wrong) and TPR (accepted right / right)."""
    s = check_range(orm_prob, 0.0, 1.0, "the PRM's outcome probability").ravel()
    y = np.asarray(correct, bool).ravel()
    if y.all() or not y.any():
        raise ValueError("operating points need both right and wrong solutions in the pool")
    wrong = np.sort(s[~y])[::-1]
    rows = []
    for f in target_fprs:
        k = int(np.floor(_rate(f, "target fpr") * len(wrong)))  # at most k wrong ones may pass
        tau = float(np.nextafter(wrong[k], np.inf)) if k < len(wrong) else 0.0
        acc = s >= tau
        rows.append(dict(target_fpr=float(f), threshold=tau, fpr=float(acc[~y].mean()), tpr=float(acc[y].mean())))
    return rows


def resampling_ceiling(p, fpr: float, tpr: float = 1.0) -> np.ndarray:
    """lim_{n→∞} P(right) of resampling until accepted: p·TPR / (p·TPR + (1 − p)·FPR) (0 where nothing passes)."""
    p = np.asarray(p, np.float64)
    num, den = p * tpr, p * tpr + (1 - p) * fpr
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def resampling_curve(p, n, fpr: float, tpr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(P(right within n), P(wrong within n)) of resampling until accepted, closed form, per problem."""
    p = np.asarray(p, np.float64)
    a = p * tpr + (1 - p) * fpr
    reach = np.where(a > 0, (1 - (1 - a) ** n) / np.where(a > 0, a, 1.0), 0.0)
    return p * tpr * reach, (1 - p) * fpr * reach


def first_accepted(accepts: np.ndarray, correct: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Measured (P(right), P(wrong)) per problem of returning the first accepted of n samples, over the
    M // n disjoint groups of the pool ([P, M] accept and exact labels)."""
    P, M = accepts.shape
    g = M // n
    if g < 1:
        raise ValueError(f"the pool ({M} samples) is smaller than n = {n}")
    acc = accepts[:, :g * n].reshape(P, g, n)
    cor = correct[:, :g * n].reshape(P, g, n)
    any_acc = acc.any(-1)
    first = np.argmax(acc, -1)
    hit = np.take_along_axis(cor, first[..., None], -1)[..., 0]
    return (any_acc & hit).mean(1), (any_acc & ~hit).mean(1)


def utility_optimal_n(ns: Sequence[int], right: Sequence[float], wrong: Sequence[float], c: float) -> dict:
    """argmax over n of U(n) = P(right) − c·P(wrong), with n = 0 (always abstain, U = 0) as an option."""
    if not c >= 0:
        raise ValueError(f"the cost of a wrong answer must be >= 0; got {c}")
    if not (len(ns) == len(right) == len(wrong)) or not len(ns):
        raise ValueError("ns, right and wrong must be non-empty and of one length")
    u = np.asarray(right, np.float64) - c * np.asarray(wrong, np.float64)
    best = int(np.argmax(u))
    if u[best] <= 0:
        return dict(n=0, utility=0.0, utilities=u.tolist())
    return dict(n=int(ns[best]), utility=float(u[best]), utilities=u.tolist())
