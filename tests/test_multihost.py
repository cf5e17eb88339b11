"""Multi-host runs for real: two processes × 4 CPU devices joined by ``jax.distributed`` (gloo collectives) on
127.0.0.1 give the same results as one process × 8 devices, for every sampler that takes a mesh, DTS trees
split over processes, and SMC on the transformer LM with its KV-cache ``reorder``; gathering brings the full
particle set to every process; bad input gets a ValueError naming the counts (issue 16).

The processes are ``tests/multihost_worker.py`` (the script ``docs/multihost.md`` runs): the pair and the
8-device reference start together, each computes every method once (tiny N and T: compiles are the cost) and
writes its gathered results to an .npz, compared here.

Bits. Every random draw comes from the same key through JAX's partitionable threefry, and both runs partition
the program into the same 8 shards: the only thing that changes is who carries a cross-device reduction (XLA's
in-process all-reduce or gloo over TCP). So samples, ancestors, per-particle log-weights and DTS trees must be
equal bit for bit. Where a float32 sum over devices feeds a value, gloo may add the 8 partial sums in another
order and the last bits may differ: the ESS and log Ẑ (measured: some steps' ESS and some methods' log Ẑ off by
1 to 3 ulps, up to 3.4e-7 relative, which ones depending on the compile flags) and every float of tempered SMC
(its MCMC step is the population's weighted spread: positions off by up to 7e-7 relative); those are compared
to 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
# seconds for the whole group of processes: about 75 CPU-seconds, nearly all XLA compiles, so ~40 s on a quiet
# 2-core machine; the slack is for a CI machine shared with other test workers
TIMEOUT = 420
METHODS = ["smc_bootstrap", "smc_twisted", "smc_adaptive", "csmc", "tempered_smc", "island_smc", "many", "dts", "lm_smc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    # the children must not see pytest(-xdist)'s or a caller's JAX/XLA settings; these two are docs/multihost.md's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XLA_", "JAX_", "COV_CORE_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _launch(out: Path, args: list[str], devices: int, name: str) -> subprocess.Popen:
    with open(out / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], cwd=ROOT, env=_env(devices),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    address = f"127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    procs = [_launch(one, [], 8, "single")]
    procs += [_launch(two, [address, "2", str(i)], 4, f"process{i}") for i in range(2)]
    deadline = start + TIMEOUT
    try:  # wait for all, but stop at the first failure: its partner would wait in a collective
        while any(p.poll() is None for p in procs) and time.perf_counter() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        _stop(procs)
    logs = {f.name: f.read_text()[-3000:] for d in (one, two) for f in d.glob("*.log")}
    assert all(p.returncode == 0 for p in procs), (f"a process failed or ran past {TIMEOUT} s", logs)
    load = lambda d, i: (dict(np.load(d / f"process{i}.npz")), json.loads((d / f"process{i}.json").read_text()))
    yield dict(single=load(one, 0), pair=[load(two, 0), load(two, 1)], logs=logs)


def _reduced(field: str, value: np.ndarray) -> bool:
    """Whether a float value is fed by a float32 sum across devices, whose order gloo may change (module
    docstring): log Ẑ and ESS everywhere, and every float of tempered SMC, whose MCMC step size is the
    population's weighted spread (so its positions move by an ulp-sized different step)."""
    method, name = field.split("/")
    return np.issubdtype(value.dtype, np.floating) and (name in ("log_Z", "ess", "mean") or method == "tempered_smc")


def _compare(a: np.ndarray, b: np.ndarray, field: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (field, a.shape, b.shape, a.dtype, b.dtype)
    if _reduced(field, b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=field)  # ~100 float32 ulps
    else:
        # the same bits: tokens, per-particle log-weights, DTS trees (no communication at all), and ancestors —
        # those come from cumulative weights, so a last-bit change could in principle move one, but only where a
        # cumulative weight lies within an ulp of a systematic-resampling grid point; with these keys none does
        np.testing.assert_array_equal(a, b, err_msg=field)


def test_processes_joined(runs):
    single, pair = runs["single"][1], [m for _, m in runs["pair"]]
    assert single["num_processes"] == 1 and single["num_devices"] == 8
    assert [m["process_id"] for m in pair] == [0, 1]
    assert all(m["num_processes"] == 2 and m["num_devices"] == 8 and m["num_local_devices"] == 4 for m in pair)
    assert "2 process(es) joined, 8 cpu device(s)" in pair[0]["describe"]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one(runs, method):
    ref = runs["single"][0]
    fields = sorted(k for k in ref if k.startswith(method + "/"))
    assert fields, method
    for data, meta in runs["pair"]:
        assert sorted(k for k in data if k.startswith(method + "/")) == fields
        for field in fields:
            _compare(data[field], ref[field], field)


def test_gathered_particles_are_the_full_set(runs):
    """Every process holds all N gathered particles; each process's own shards are disjoint pieces of them,
    and the two processes' pieces together make the full set; a reduction on the devices needs no gather."""
    ref = runs["single"][0]
    n = ref["smc_adaptive/log_weights"].shape[0]
    full = ref["smc_adaptive/samples0"]
    starts = []
    for data, meta in runs["pair"]:
        assert data["smc_adaptive/samples0"].shape[0] == n == data["smc_adaptive/log_weights"].shape[0]
        local_starts, rows = data["reduce/local_starts"], data["reduce/local_rows"]
        assert rows.shape[0] == n // 2  # 4 of the 8 devices, 2 particles each
        for i, s in enumerate(local_starts):
            np.testing.assert_array_equal(rows[2 * i:2 * i + 2], full[s:s + 2])
        starts += list(local_starts)
        np.testing.assert_allclose(data["reduce/mean"], ref["reduce/mean"], rtol=1e-6)
    assert sorted(starts) == list(range(0, n, 2))


def _errors(runs):
    pair = [m["errors"] for _, m in runs["pair"]]
    assert pair[0].keys() == pair[1].keys()
    return pair


def test_particles_not_divisible_by_the_global_devices(runs):
    for e in _errors(runs):
        msg = e["not_divisible"]
        assert msg and "num_particles=12" in msg and "8 devices" in msg and "2 processes × 4 local devices" in msg, msg


def test_mesh_of_local_devices_refused(runs):
    for pid, e in enumerate(_errors(runs)):
        msg = e["local_mesh"]
        assert msg and f"4 devices of process(es) {pid} only" in msg and "2 processes with 8 devices" in msg, msg


@pytest.mark.parametrize("case,what", [("key_disagrees", "the key"), ("config_disagrees", "the configuration"),
                                       ("beta_disagrees", "the configuration"),
                                       ("n_disagrees", "num_particles, the mesh or the configuration")])
def test_processes_that_disagree_are_refused(runs, case, what):
    for e in _errors(runs):  # every process raises, not only the odd one out (no process is left waiting)
        msg = e[case]
        assert msg and msg.startswith(f"processes disagree on {what}:") and "1 of the 2 processes (1)" in msg, msg


def test_docs_show_the_commands_this_test_runs():
    doc = (ROOT / "docs" / "multihost.md").read_text()
    for devices, args in ((4, "/tmp/pair 127.0.0.1:$PORT 2 $i"), (8, "/tmp/one")):
        env = _env(devices)
        assert f"JAX_PLATFORMS={env['JAX_PLATFORMS']} XLA_FLAGS={env['XLA_FLAGS']}" in doc, devices
        assert f".venv/bin/python tests/multihost_worker.py {args}" in doc, args


def test_digest_is_the_same_for_the_same_values():
    """What every process computes for the agreement check: equal values give equal digests whatever the
    objects' addresses; another key, β, table or function gives another."""
    import jax

    import pplalign
    from models.markov_lm import MarkovLM, TableReward
    from pplalign.distributed import digest

    lm = MarkovLM(np.log(np.full(3, 1 / 3, np.float32)), np.log(np.full((3, 3), 1 / 3, np.float32)), 2)
    make = lambda beta, values: pplalign.tilt(lm, TableReward(np.asarray(values, np.float32), 3), beta)
    values = np.arange(9.0)
    assert digest(make(1.0, values)) == digest(make(1.0, values.copy()))
    assert digest(make(1.0, values)) != digest(make(2.0, values))
    assert digest(make(1.0, values)) != digest(make(1.0, values + 1e-6))
    assert digest(jax.random.key(0)) == digest(jax.random.key(0)) != digest(jax.random.key(1))
    assert digest(np.sum) == digest(np.sum) != digest(np.mean)
    assert digest(object()) == digest(object())  # a default repr's address is left out


def test_single_process_helpers():
    """In one process: initialize(num_processes=1) joins nothing, the agreement check is free, gather
    fetches, and check_mesh keeps its single-process messages."""
    import jax

    from pplalign import distributed

    cluster = distributed.initialize(num_processes=1, verbose=False)
    assert cluster.num_processes == 1 and cluster.is_main and cluster.mesh.devices.size == jax.device_count()
    distributed.check_agreement(jax.random.key(0), "anything")
    got = distributed.gather({"a": jax.numpy.arange(3), "b": 2.0})
    assert isinstance(got["a"], np.ndarray) and got["a"].tolist() == [0, 1, 2] and got["b"] == 2.0
    with pytest.raises(ValueError, match="Mesh"):
        distributed.check_mesh("cpu", 8)
    distributed.check_mesh(cluster.mesh, 8 * jax.device_count())
