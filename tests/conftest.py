"""Test-wide JAX setup (before the backend starts): CPU, one device, strict ranks, fast
compilation, and a subprocess with 8 fake devices for the tests that need them.

- Devices. Tests run on one CPU device. Modules marked `multidevice` need 8 (meshes up to
  2x2x2): in a run with fewer devices, the selected tests of each such module are replaced by one
  item that runs them in a child pytest with `SIGMA_JAX_TEST_DEVICES=8` and fails with the
  child's report if any of them fails. `SIGMA_JAX_TEST_DEVICES=8 python -m pytest
  tests/test_sharding.py` runs them directly.
- Compilation. The test models are tiny, so compiling dominates: XLA compiles with the fast
  flags of tests/cli_helpers.py, and the persistent compilation cache lets the pytest-xdist
  workers, the child runs and later runs reuse each other's executables (SIGMA_JAX_TEST_CACHE
  names its folder; default: sigma_jax_jit_cache in the temp dir). Child runs and launcher
  subprocesses get the same through `cli_helpers.subprocess_env`.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_helpers import subprocess_env, xla_flags

DEVICES = int(os.environ.get("SIGMA_JAX_TEST_DEVICES", "1"))
MULTIDEVICE = 8  # devices a `multidevice` module needs

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = xla_flags(DEVICES)
os.environ.setdefault("SIGMA_JAX_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "data"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "SIGMA_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "sigma_jax_jit_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parents[1]


class ChildRunFailed(Exception):
    """A child pytest run reported failures; the message is its report."""


class MultiDeviceRun(pytest.Item):
    """The selected tests of one `multidevice` module, run by a child pytest on 8 devices."""

    def __init__(self, *, node_ids, **kwargs):
        super().__init__(**kwargs)
        self.node_ids = node_ids
        self.add_marker("multidevice")
        self.add_marker("integration")

    def runtest(self):
        env = subprocess_env(MULTIDEVICE, SIGMA_JAX_TEST_DEVICES=str(MULTIDEVICE))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               "-o", "addopts=", *self.node_ids]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            report = proc.stdout[-20000:] + proc.stderr[-5000:]
            raise ChildRunFailed(f"{' '.join(cmd[2:])}\n{report}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ChildRunFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.name}: {len(self.node_ids)} tests on {MULTIDEVICE} devices"


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """With fewer than 8 devices, replace each multidevice module's tests by one child run,
    placed first (they are the longest items, so a parallel run starts them early)."""
    if DEVICES >= MULTIDEVICE:
        return
    groups, kept = {}, []
    for item in items:
        if item.get_closest_marker("multidevice") is None:
            kept.append(item)
        else:
            module = item.getparent(pytest.Module)
            groups.setdefault(module.nodeid, (module, []))[1].append(item.nodeid)
    children = [MultiDeviceRun.from_parent(module, name=f"[{MULTIDEVICE} devices]",
                                           node_ids=node_ids)
                for module, node_ids in groups.values()]
    items[:] = children + kept
