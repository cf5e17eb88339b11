"""pplalign: generation as Bayesian inference in reward-tilted targets σ ∝ p₀·exp(r/β)."""

from . import (
    constraints,
    distributed,
    evaluation,
    guidance,
    islands,
    mcmc,
    metrics,
    potentials,
    resampling,
    search,
    static,
    tempered,
    twists,
    vi,
    viewer,
)
from .ancestral import ancestral_sample
from .constraints import constrain
from .csmc import csmc
from .distributed import particle_mesh
from .guidance import reward_guidance, tds
from .islands import island_smc, many
from .particles import Particles
from .potentials import fk_steering
from .programs import Sequential, Tilted, Twist, tilt
from .resampling import multinomial, residual, stratified, systematic
from .search import dts
from .smc import best_of_n, importance_sampling, smc
from .tempered import tempered_smc, tempered_smc_with_info

__all__ = [
    "Particles",
    "Sequential",
    "Tilted",
    "Twist",
    "tilt",
    "smc",
    "csmc",
    "importance_sampling",
    "best_of_n",
    "dts",
    "search",
    "ancestral_sample",
    "multinomial",
    "stratified",
    "systematic",
    "residual",
    "particle_mesh",
    "tempered_smc",
    "tempered_smc_with_info",
    "island_smc",
    "many",
    "fk_steering",
    "tds",
    "reward_guidance",
    "potentials",
    "guidance",
    "twists",
    "vi",
    "evaluation",
    "static",
    "tempered",
    "islands",
    "mcmc",
    "metrics",
    "resampling",
    "distributed",
    "constraints",
    "constrain",
    "viewer",
]
__version__ = "0.1.0"
