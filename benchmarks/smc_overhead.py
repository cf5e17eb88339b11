"""SMC time over plain ancestral sampling time, same model, N and T, measured in one run.

The model is a Markov LM with a large vocabulary whose particle state holds the token history [N, T], so
resampling is a real gather. A cheap per-token potential (log ψ_t = λ Σ_{s≤t} g(x_s), g ~ N(0,1) per
vocabulary entry) makes the weights uneven, so ESS-adaptive resampling really triggers.

Prints one JSON line last with ``every_step_ratio`` and ``adaptive_ratio`` (and the plain time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

import pplalign
from benchmarks._timing import interleaved_medians
from models.markov_lm import random_markov_lm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenScorePotential:
    """log ψ_t(x_{≤t}) = λ Σ_{s≤t} g[x_s]."""

    scores: jax.Array
    scale: float = dataclasses.field(default=0.3, metadata=dict(static=True))

    def __call__(self, state, t):
        mask = jnp.arange(state.tokens.shape[0]) <= t
        return self.scale * jnp.sum(jnp.where(mask, self.scores[state.tokens], 0.0))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--particles", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    lm = random_markov_lm(jax.random.PRNGKey(0), args.vocab, args.steps, concentration=0.3)
    potential = TokenScorePotential(jax.random.normal(jax.random.PRNGKey(1), (args.vocab,)))
    reward = lambda tokens: jnp.zeros(())  # the potential carries the signal; the final tilt is flat
    target = pplalign.tilt(lm, reward, 1.0)
    n = args.particles

    fns = {
        "plain": jax.jit(lambda k: pplalign.ancestral_sample(k, lm, n)),
        "every_step": jax.jit(
            lambda k: pplalign.smc(k, target, n, twist=potential, optimal_proposal=False, ess_threshold=1.0).log_Z
        ),
        "adaptive": jax.jit(
            lambda k: pplalign.smc(k, target, n, twist=potential, optimal_proposal=False, ess_threshold=0.5)
        ),
    }
    times = interleaved_medians(fns, lambda r: (jax.random.PRNGKey(r),), repeats=args.repeats)
    adaptive = fns["adaptive"](jax.random.PRNGKey(0))
    resampled = int(jnp.sum(jnp.any(adaptive.ancestors != jnp.arange(n), axis=1)))
    result = dict(
        vocab=args.vocab,
        steps=args.steps,
        particles=n,
        device=jax.devices()[0].platform,
        plain_seconds=times["plain"],
        every_step_seconds=times["every_step"],
        adaptive_seconds=times["adaptive"],
        adaptive_resampling_steps=resampled,
        every_step_ratio=times["every_step"] / times["plain"],
        adaptive_ratio=times["adaptive"] / times["plain"],
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
