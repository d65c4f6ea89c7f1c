"""Shared helpers: run a script end to end in a temp dir and read back its TensorBoard scalars."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BANDIT = "tests.toy_envs:ContextBandit-v0"
# per script, the flags of a tiny run (few particles, samples and steps) for end-to-end tests that check plumbing
TINY = {
    "rfm_flow.py": ["--num-particles", 4, "--num-posterior-samples", 8, "--flow-steps", 2],
    "rfm_diffusion.py": ["--num-particles", 4, "--num-posterior-samples", 8, "--diffusion-steps", 3],
    "qvpo_baseline.py": ["--diffusion-steps", 3, "--num-action-samples", 8, "--num-entropy-samples", 2,
                         "--eval-samples", 4],
    "dipo_baseline.py": ["--diffusion-steps", 5, "--action-gradient-steps", 3],
}  # fmt: skip


def run_script(script, args, cwd, timeout=600, **env_vars):
    """`python <ROOT>/<script> <args>` with cwd as the run directory (and extra environment variables, e.g.
    MUJOCO_GL="egl"); returns the CompletedProcess. The user's MUJOCO_GL is otherwise left as it is."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **env_vars)
    cmd = [sys.executable, str(ROOT / script), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from the single TensorBoard event file under run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def single_run_dir(cwd):
    runs = list((Path(cwd) / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def check_ok(proc, run_dir):
    """A run that exited 0 and made its run dir: its scalars."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_dir is not None
    return read_scalars(run_dir)


def assert_one_line_error(proc, run_dir):
    """Bad input: non-zero exit, stderr is exactly one `error:` line (no traceback), and no run directory was made."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert run_dir is None
    return lines[0]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch/OpenMP thread in-process and in the scripts the tests run: the ops are tiny, and on a busy 2-core
    machine two threads spin-wait at every parallel region. No result depends on the thread count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run(tmp_path):
    """run(script, *args) -> (CompletedProcess, run_dir or None), executed inside tmp_path."""

    def _run(script, *args, timeout=600, **env_vars):
        proc = run_script(script, args, tmp_path, timeout, **env_vars)
        runs = tmp_path / "runs"
        run_dir = single_run_dir(tmp_path) if runs.exists() and any(runs.iterdir()) else None
        return proc, run_dir

    return _run
