"""The particle axis over 8 host devices: every sampler gives the same result with and without a mesh for the
same key, its outputs are really sharded over the 8 devices, and a mesh that does not divide N is refused.
(Kept to one run per sampler family: each 8-device compile costs seconds of CPU.)

The 8-device checks run in one subprocess (XLA_FLAGS must be set before jax is imported); it prints one JSON
line with every comparison, which the tests below read.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _checks() -> dict:  # runs inside the 8-device subprocess
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    import pplalign
    from models.markov_lm import TableReward, random_markov_lm
    from pplalign.islands import island_smc, many
    from pplalign.tempered import tempered_smc

    out = {"devices": jax.device_count()}
    mesh = pplalign.particle_mesh()
    lm = random_markov_lm(jax.random.PRNGKey(0), vocab_size=4, num_steps=5)
    reward = TableReward(1.0 * jax.random.normal(jax.random.PRNGKey(1), (4**5,)), 4)
    target = pplalign.tilt(lm, reward, 1.0)
    key = jax.random.key(3)

    def compare(name, a, b, exact_samples=True):
        sa = jax.tree_util.tree_leaves(a.samples)
        sb = jax.tree_util.tree_leaves(b.samples)
        out[name] = dict(
            log_Z=[float(a.log_Z), float(b.log_Z)],
            log_weights_maxdiff=float(jnp.max(jnp.abs(jnp.nan_to_num(a.log_weights - b.log_weights)))),
            samples_maxdiff=max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(sa, sb)),
            ancestors_equal=bool(jnp.all(a.ancestors == b.ancestors)),
            num_devices=len(b.log_weights.sharding.device_set),
        )

    n = 64
    compare("smc", pplalign.smc(key, target, n), pplalign.smc(key, target, n, mesh=mesh))
    ref = lm.sample_posterior(jax.random.key(5), 1, reward, 1.0)[0]
    compare("csmc", pplalign.csmc(key, target, n, ref), pplalign.csmc(key, target, n, ref, mesh=mesh))

    def model():
        return numpyro.sample("z", dist.Normal(jnp.zeros(2), 1.5).to_event(1))

    static = pplalign.tilt(model, lambda z: -0.5 * jnp.sum((z - 1.0) ** 2) / 0.25, 1.0)
    compare("tempered_smc", tempered_smc(key, static, n, max_stages=8), tempered_smc(key, static, n, max_stages=8, mesh=mesh))
    compare(
        "islands_smc",
        island_smc(key, target, n, num_islands=8),
        island_smc(key, target, n, num_islands=8, mesh=mesh),
    )
    tables = jax.random.normal(jax.random.key(9), (3, 4**5))
    targets = jax.vmap(lambda v: pplalign.tilt(lm, TableReward(v, 4), 1.0))(tables)  # for the error check
    errors = {}
    bad = [
        ("smc", lambda: pplalign.smc(key, target, 60, mesh=mesh)),
        ("csmc", lambda: pplalign.csmc(key, target, 60, ref, mesh=mesh)),
        ("importance_sampling", lambda: pplalign.importance_sampling(key, static, 60, mesh=mesh)),
        ("tempered_smc", lambda: tempered_smc(key, static, 60, mesh=mesh)),
        ("island_smc", lambda: island_smc(key, target, 64, num_islands=4, mesh=mesh)),
        ("many", lambda: many(key, targets, 60, mesh=mesh)),
    ]
    for name, call in bad:
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices_present(eight_devices):
    assert eight_devices["devices"] == 8


@pytest.mark.parametrize(
    "name", ["smc", "csmc", "tempered_smc", "islands_smc"]
)
def test_sharded_equals_unsharded(eight_devices, name):
    r = eight_devices[name]
    a, b = r["log_Z"]
    assert abs(a - b) < 1e-4 * max(1.0, abs(a)), r
    assert r["log_weights_maxdiff"] < 1e-4, r
    assert r["samples_maxdiff"] < 1e-4, r
    assert r["ancestors_equal"], r
    assert r["num_devices"] == 8, r  # the sharded run really spread its particles


@pytest.mark.parametrize("name", ["smc", "csmc", "importance_sampling", "tempered_smc", "many"])
def test_mesh_not_dividing_particles(eight_devices, name):
    msg = eight_devices["errors"][name]
    assert msg is not None and "num_particles=60" in msg and "8 devices" in msg, msg


def test_islands_not_multiple_of_devices(eight_devices):
    msg = eight_devices["errors"]["island_smc"]
    assert msg is not None and "num_islands=4" in msg and "8 devices" in msg, msg


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_checks()))
