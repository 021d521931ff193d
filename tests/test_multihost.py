"""A real two-process run: `python -m launch.train` and `python -m launch.sample` started twice on
localhost with `--distributed=on` (coordinator on a free loopback port, 4 fake CPU devices per
process, collectives over gloo), on one (8,1,1) mesh spanning both processes.

Training must give the single-process 8-device result (same losses and params) on the same
global batches: process p reads rows p::2 of the data, and its rows come p-th in the global
batch. Only process 0 prints; the checkpoint holds one data-iterator state per process.
Sampling must print, on process 0 only, the samples that the unsharded sampler draws from the
trained params with the launcher's keys.

Both processes compile without XLA's optimisation passes (as tests/test_scale.py does), and
every subprocess is bounded by a deadline and killed on failure.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import subprocess_env
from test_scale import (
    ATOL,
    PRESET,
    SETS,
    STEPS,
    global_batches,
    less_optimization,
    max_diff,
    mesh_of,
    run_sharded,
)

from launch.train import build
from sigma_jax import checkpoint, metrics_log, sample_ar

REPO = Path(__file__).resolve().parents[1]
# test_scale's settings with the task's own 2-token vocabulary, so that every sampled token
# prints as a digit (a larger vocabulary prints unused tokens as '?').
MH_SETS = [item for item in SETS if not item.startswith("vocab_size=")]
SET_ARGS = [arg for item in MH_SETS for arg in ("--set", item)]
pytestmark = [pytest.mark.multidevice, pytest.mark.integration]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(module: str, args: list[str], tmp_path: Path, name: str):
    """Start `python -m module args` as processes 0 and 1 of a 2-process job."""
    port = free_port()
    env = subprocess_env(4, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", module, *args, "--mesh=8:1:1", "--distributed=on",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"]
        out = open(tmp_path / f"{name}{i}.out", "w")
        err = open(tmp_path / f"{name}{i}.err", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err), out,
                      err))
    return procs


def wait_pair(procs, tmp_path: Path, name: str, timeout: float) -> list[str]:
    """Wait for both processes (killing both at the deadline or when one fails); returns their
    stdout texts. Always leaves no process running."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _, _ in procs):
            failed = [p for p, _, _ in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, out, err in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            out.close()
            err.close()
    # gloo's C++ side reports its connections on stdout ("[Gloo] Rank 1 is connected to 7 peer
    # ranks. Expected number of connected peer ranks is : 7"), from several threads at once, so
    # a report can hold another in its middle: whole reports go first, innermost first, then
    # lines holding a piece of one; everything else is ours.
    report = re.compile(r"\[Gloo\]\s+Rank\s+\d+\s+is\s+connected\s+to\s+\d+\s+peer\s+ranks\."
                        r"\s+Expected\s+number\s+of\s+connected\s+peer\s+ranks\s+is\s*:\s*\d+\n?")
    gloo = lambda line: line.startswith("[Gloo]") or "peer ranks" in line
    texts = []
    for i in range(2):
        text, before = (tmp_path / f"{name}{i}.out").read_text(), None
        while text != before:
            text, before = report.sub("", text), text
        texts.append("".join(line for line in text.splitlines(keepends=True) if not gloo(line)))
    for i, (p, _, _) in enumerate(procs):
        errors = (tmp_path / f"{name}{i}.err").read_text()[-3000:]
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{errors}"
    return texts


def test_two_processes_train_and_sample_like_one_process(tmp_path):
    workdir = tmp_path / "run"
    procs = launch_pair("launch.train", [f"--config={PRESET}", *SET_ARGS,
                                         f"--workdir={workdir}"], tmp_path, "train")
    try:  # meanwhile, the reference: one process, 8 devices, the same global batches
        with less_optimization():
            model_cfg, train_cfg, task = build(PRESET, MH_SETS)
            batches = global_batches(task, train_cfg, process_count=2)
            state, losses = run_sharded(model_cfg, train_cfg, mesh_of("8:1:1"), batches)
    finally:
        outs = wait_pair(procs, tmp_path, "train", timeout=300)
    assert "step 3/3" in outs[0] and "final:" in outs[0] and "2 process(es)" in outs[0]
    assert outs[1] == ""  # process 1 prints nothing
    rows = metrics_log.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=0, atol=ATOL)
    cfg, params, step = checkpoint.load(workdir)
    assert step == STEPS and cfg == model_cfg
    assert max_diff(params, state.params) < ATOL
    data_files = sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "data").iterdir())
    assert len([f for f in data_files if "process" in f]) == 2, data_files

    # Sampling: 6 samples (padded to 8 rows), gathered from both processes, printed by process 0.
    procs = launch_pair("launch.sample", [f"--workdir={workdir}", "--sampler=ar",
                                          "--num_samples=6", "--seed=3"], tmp_path, "sample")
    try:
        with less_optimization():
            keys = jax.random.split(jax.random.fold_in(jax.random.key(3), 0), 6)
            want, _ = sample_ar(cfg, params, keys, np.zeros((6, 8), np.int32),
                                np.zeros((6, 8), bool), order="random")
    finally:
        outs = wait_pair(procs, tmp_path, "sample", timeout=240)
    printed = re.findall(r"^--- sample \d+:.*\n(.*)$", outs[0], flags=re.M)
    assert printed == [task.decode(row) for row in np.asarray(want)]
    assert all(set(line) <= {"0", "1"} for line in printed) and len(set(printed)) > 1
    assert outs[1] == ""
