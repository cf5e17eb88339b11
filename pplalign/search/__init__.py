"""Tree search for reward-tilted targets: Diffusion Tree Sampling (DTS) and DTS* (Jain et al. 2025) on a
fixed-capacity array tree (:mod:`.tree`), compiled per iteration, vmappable and resumable."""

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
]
