"""Compute accounting and budgets for reasoning searches (issue 14): every method reports three counts, so that
comparisons are matched on each axis separately.

* ``nfe`` — transition evaluations of the program (DESIGN §3: particle × step);
* ``policy_tokens`` — tokens the policy drew and kept (a search that stops a branch at its step delimiter or
  end token spends no token after it; a sampler that runs every particle to the horizon spends T per particle);
* ``verifier_calls`` — evaluations of the process or outcome reward, one per scored prefix (a PRM forward pass
  over prompt + prefix).

A :class:`SearchBudget` caps the last two. A search checks before every expansion that the expansion's worst
case still fits, so a run never exceeds either cap; a budget that cannot pay for one expansion is refused up
front (``ValueError``), as is a verifier whose values leave its declared range (checked on the host after a run,
since a compiled loop cannot raise).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import numpy as np

from .._validation import check_count

__all__ = ["Compute", "SearchBudget", "check_value_range", "check_values"]


class Compute(NamedTuple):
    """The three counts of a run (ints, or [] int32 arrays inside a trace)."""

    nfe: int
    policy_tokens: int
    verifier_calls: int

    def __add__(self, other: "Compute") -> "Compute":  # type: ignore[override]
        return Compute(*(a + b for a, b in zip(self, other)))

    def as_dict(self) -> dict:
        return {k: int(v) for k, v in self._asdict().items()}


@dataclasses.dataclass(frozen=True)
class SearchBudget:
    """Caps on ``policy_tokens`` and ``verifier_calls`` (None: uncapped on that axis; not both None)."""

    tokens: Optional[int] = None
    verifier_calls: Optional[int] = None

    def validate(self, expansion_tokens: int, expansion_calls: int, what: str) -> None:
        """Refuse a budget below one expansion's worst case (``what`` names the expansion in the message)."""
        if self.tokens is None and self.verifier_calls is None:
            raise ValueError("a search needs a budget: set tokens, verifier_calls or both")
        if self.tokens is not None and check_count(self.tokens, "token budget") < expansion_tokens:
            raise ValueError(f"token budget {self.tokens} is too small for one expansion ({what}: up to "
                             f"{expansion_tokens} tokens)")
        if self.verifier_calls is not None and check_count(self.verifier_calls, "verifier-call budget") < expansion_calls:
            raise ValueError(f"verifier-call budget {self.verifier_calls} is too small for one expansion ({what}: "
                             f"{expansion_calls} calls)")

    def max_expansions(self, tokens_each: int, calls_each: int) -> int:
        """An upper bound on the expansions the budget can pay for, each spending ≥ ``tokens_each`` tokens and
        exactly ``calls_each`` calls (it sizes the fixed-capacity arrays)."""
        return min(b // c for b, c in ((self.tokens, tokens_each), (self.verifier_calls, calls_each)) if b is not None)

    def cap(self, name: str) -> int:
        """The cap on one axis as a number a compiled loop can compare to (int32's max when uncapped)."""
        value = getattr(self, name)
        return int(np.iinfo(np.int32).max) if value is None else int(value)


def check_value_range(value_range) -> Optional[tuple[float, float]]:
    """``(low, high)`` with low < high (either may be ±inf), or None."""
    if value_range is None:
        return None
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair (low, high); got {value_range!r}") from None
    if math.isnan(low) or math.isnan(high) or not low < high:
        raise ValueError(f"value_range must be (low, high) with low < high; got {value_range!r}")
    return low, high


def check_values(values, valid, value_range, who: str = "the verifier") -> None:
    """``ValueError`` if a ``values[valid]`` is NaN or outside the closed ``value_range``; without a range only
    NaN and +inf are refused (−inf, "certainly wrong", is a value a log-probability PRM may give)."""
    v = np.asarray(values, np.float64)[np.asarray(valid, bool)]
    if np.isnan(v).any():
        raise ValueError(f"{who} returned NaN")
    bad = (v == math.inf) if value_range is None else (v < value_range[0]) | (v > value_range[1])
    if bad.any():
        raise ValueError(f"{who} returned {v[bad][0]!r}, outside its declared range {value_range} "
                         f"({int(bad.sum())} of {v.size} values)")
