"""Importing the library starts no JAX backend, so `jax.distributed.initialize()` can still come after it."""

import subprocess
import sys


def test_import_starts_no_backend():
    code = (
        "import pplalign, pplalign.metrics\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized(), 'a backend was started at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
