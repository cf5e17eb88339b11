"""Variational inference toward reward-tilted targets: objectives, gradient estimators, fitting, RL guidance.

KL-regularised RL is variational inference (Korbak et al. 2022): max_q E_q[r] − β·KL(q‖p₀) is attained at
σ ∝ p₀·exp(r/β) with value β·log Z. See :mod:`pplalign.vi.objectives` for the maths of each objective,
:mod:`pplalign.vi.estimators` for the gradient estimators (one argument switches between them) and
:mod:`pplalign.vi.adev` for the same objectives as genjax ADEV programs, :mod:`pplalign.vi.dpo` for step-level
DPO (MCTS-DPO) and :mod:`pplalign.vi.infalign` for InfAlign's calibrate-and-transform reward.
"""

from . import infalign, rl_guidance
from .dpo import dpo_logits, dpo_loss, masked_log_prob
from .estimators import ESTIMATORS, estimate
from .families import GaussianFamily, SequentialFamily, sample_program, sequence_log_prob
from .fit import FitResult, NonFiniteLossError, fit
from .objectives import (
    Objective,
    check_support,
    dpg,
    elbo,
    exact_summary,
    forward_kl,
    iwae,
    kl_regularised_rl,
    renyi,
    reward_maximisation,
)

__all__ = [
    "ESTIMATORS",
    "rl_guidance",
    "infalign",
    "dpo_loss",
    "dpo_logits",
    "masked_log_prob",
    "fit",
    "FitResult",
    "NonFiniteLossError",
    "estimate",
    "GaussianFamily",
    "SequentialFamily",
    "sample_program",
    "sequence_log_prob",
    "Objective",
    "check_support",
    "dpg",
    "elbo",
    "exact_summary",
    "forward_kl",
    "iwae",
    "kl_regularised_rl",
    "renyi",
    "reward_maximisation",
]
