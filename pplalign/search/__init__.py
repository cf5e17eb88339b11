"""Tree search for reward-tilted targets: Diffusion Tree Sampling (DTS) and DTS* (Jain et al. 2025) on a
fixed-capacity array tree (:mod:`.tree`), compiled per iteration, vmappable and resumable; and searches over
delimited reasoning steps guided by a process reward — A*-decoding (:mod:`.astar`), REBASE (:mod:`.rebase`) —
with their compute accounting (:mod:`.budget`: policy tokens and verifier calls next to NFE)."""

from .astar import AStarConfig, AStarQueue, AStarResult, astar
from .budget import Compute, SearchBudget, check_values
from .calibrate import CalibratedTwist, calibrate_twist
from .checkpoint import load_tree, save_tree
from .dts import (
    DTSConfig,
    check_stochastic,
    dts,
    grow,
    init,
    nodes_needed,
    particles_from_tree,
    run,
    run_loop,
    sample_leaves,
    sample_tree,
    step,
)
from .fingerprint import stamp_tree
from .rebase import RebaseConfig, RebaseResult, rebase, rebase_allocation
from .steps import StepSpec, extend_step
from .tree import Tree

__all__ = [
    "dts",
    "DTSConfig",
    "Tree",
    "init",
    "step",
    "run",
    "run_loop",
    "sample_leaves",
    "grow",
    "sample_tree",
    "particles_from_tree",
    "nodes_needed",
    "check_stochastic",
    "save_tree",
    "load_tree",
    "stamp_tree",
    "calibrate_twist",
    "CalibratedTwist",
    "astar",
    "AStarConfig",
    "AStarQueue",
    "AStarResult",
    "rebase",
    "rebase_allocation",
    "RebaseConfig",
    "RebaseResult",
    "Compute",
    "SearchBudget",
    "check_values",
    "StepSpec",
    "extend_step",
]
