"""Checkpoints in every script, end to end on a toy bandit: a run stopped and resumed (--resume) is the run that was
never stopped, bit for bit on CPU; SIGTERM/SIGUSR1 checkpoint and exit 75; truncated, unreadable, foreign or
mismatched checkpoints are refused in one line and left as they are; --eval-only reproduces the training run's
evaluation. The bandit's step draws random numbers (reward noise), so resuming must restore the env's random stream
as it was after that draw."""

import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from tests.conftest import BANDIT, ROOT, TINY, read_scalars, run_script, single_run_dir

# the tiny runs of conftest; QVPO's entropy weight is kept constant (floor = start), since its decay is stretched
# over --total-timesteps, which the stopped run changes
SCRIPTS = {**TINY, "qvpo_baseline.py": [*TINY["qvpo_baseline.py"], "--entropy-alpha-min", 0.02]}
NOISY_BANDIT = "tests.toy_envs:NoisyContextBandit-v0"
COMMON = ["--env-id", NOISY_BANDIT, "--learning-starts", 60, "--batch-size", 32, "--eval-every", 50, "--eval-episodes", 2,
          "--torch-deterministic"]  # fmt: skip
N, M = 150, 100  # a run stopped at step N, then resumed to N + M: updates (from step 60) and losses logged in both parts


def cli(script, *extra):
    return [*COMMON, *SCRIPTS[script], *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """straight(script) -> run dir of an N + M step run never stopped (with --save-model), made once per module."""
    runs = {}

    def get(script):
        if script not in runs:
            cwd = tmp_path_factory.mktemp(script[: -len(".py")])
            proc = run_script(script, cli(script, "--total-timesteps", N + M, "--save-model"), cwd)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[script] = single_run_dir(cwd)
        return runs[script]

    return get


def load(path):
    """torch.load as the scripts do it: weights_only, so tensors and plain data only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def learning_scalars(run_dir):
    """Every scalar but the wall-clock SPS and the --save-model evaluation."""
    drop = {"charts/SPS", "eval/saved_model_episodic_return"}
    return {tag: points for tag, points in read_scalars(run_dir).items() if tag not in drop}


def same(a, b):
    """Bitwise equality of nested checkpoint contents (tensors, arrays, plain data)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if torch.is_tensor(a) or isinstance(a, np.ndarray):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


def event_counts(run_dir):
    """Counter of (tag, step) over the raw events of every event file in run_dir (no TensorBoard purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return Counter((value.tag, event.step) for path in sorted(run_dir.glob("events.out.tfevents*"))
                   for event in EventFileLoader(str(path)).Load() for value in event.summary.value)  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_resumed_run_equals_straight_run(tmp_path, straight, script):
    """Stopped at step 50 (uniform random actions until 60), resumed and stopped at N, resumed to N + M: the same
    losses, evaluation returns and training returns at every step as a run never stopped, each logged once."""
    for stop in (50, N, N + M):
        resume = ["--resume", single_run_dir(tmp_path)] if stop > 50 else []
        proc = run_script(script, cli(script, "--total-timesteps", stop, *resume), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_dir = single_run_dir(tmp_path)  # one run dir throughout
        assert load(run_dir / "checkpoint.pt")["global_step"] == stop

    want, got = learning_scalars(straight(script)), learning_scalars(run_dir)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert got[tag] == want[tag], tag  # bitwise (float32 as logged)
    loss_steps = [s for s, _ in want["losses/qf_loss"]]
    assert min(loss_steps) < N < max(loss_steps), loss_steps  # updates logged before and after the second stop
    assert [s for s, _ in want["eval/episodic_return"]] == list(range(50, N + M + 1, 50))  # stops on evaluation steps
    counts = event_counts(run_dir)
    assert {k: n for k, n in counts.items() if n > 1} == {}
    assert any(step > N for _, step in counts)
    # and the final checkpoints: weights, optimizers, buffers, every random stream
    a, b = load(straight(script) / "checkpoint.pt"), load(run_dir / "checkpoint.pt")
    assert a.keys() == b.keys()
    for key in a.keys() - {"args"}:  # args differ in --resume
        assert same(a[key], b[key]), key


def test_resume_after_a_crash_hides_the_steps_it_redoes(tmp_path, straight):
    """A run that died after its checkpoint at step 100 had logged up to step N: resumed from that checkpoint, its
    scalars read back (TensorBoard drops the orphaned steps 101..N) as the straight run's, one value per step > 100."""
    script = "rfm_flow.py"
    assert run_script(script, cli(script, "--total-timesteps", 100), tmp_path).returncode == 0
    run_dir = single_run_dir(tmp_path)
    at_100 = (run_dir / "checkpoint.pt").read_bytes()
    assert run_script(script, cli(script, "--total-timesteps", N, "--resume", run_dir), tmp_path).returncode == 0
    (run_dir / "checkpoint.pt").write_bytes(at_100)  # the crash: steps 101..N logged, their checkpoint lost
    proc = run_script(script, cli(script, "--total-timesteps", N + M, "--resume", run_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = learning_scalars(straight(script)), learning_scalars(run_dir)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert all(n == 1 for step, n in Counter(s for s, _ in got[tag]).items() if step > 100), tag
        assert dict(got[tag]) == dict(want[tag]), tag  # the last value written at each step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_exits_75_and_resumes(tmp_path, sig):
    """SIGTERM / SIGUSR1 mid-run: the step finishes, a checkpoint is written, one line says how to resume, exit status
    75; --resume then finishes the run (final evaluation at --total-timesteps)."""
    script, total = "rfm_flow.py", 100_000
    cmd = [sys.executable, str(ROOT / script), *map(str, cli(script, "--total-timesteps", total, "--checkpoint-every",
                                                            total))]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # until a progress line after the first updates (from step 60)
        lines.append(line)
        if line.startswith("step=100/"):
            break
    proc.send_signal(sig)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    assert re.search(rf"^step=100/{total} SPS=\d+ ETA=(\d+h\d\dm|\?) last_return=\S+$", out, re.MULTILINE), out[-3000:]
    run_dir = single_run_dir(tmp_path)
    ckpt = load(run_dir / "checkpoint.pt")
    step = ckpt["global_step"]
    assert step > 100 and ckpt["args"]["exp_name"] == "rfm_flow" and ckpt["rb"]["rows"].shape[0] == step
    resume_line = [ln for ln in out.splitlines() if ln.startswith("preempted")]
    assert len(resume_line) == 1 and f"--resume runs/{run_dir.name}" in resume_line[0], out[-3000:]

    resumed = run_script(script, cli(script, "--total-timesteps", step + 120, "--resume", run_dir), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    scalars = read_scalars(run_dir)
    assert scalars["eval/episodic_return"][-1][0] == step + 120
    assert any(s > step for s, _ in scalars["losses/qf_loss"])


BAD = ["garbage", "truncated", "other script", "other flag", "missing", "too few steps"]


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_is_refused_in_one_line_and_kept(tmp_path, straight, case):
    good = (straight("rfm_flow.py") / "checkpoint.pt").read_bytes()
    data = {
        "garbage": b"not a checkpoint\n" * 64,
        "truncated": good[: len(good) // 2],
        "other script": (straight("qvpo_baseline.py") / "checkpoint.pt").read_bytes(),
    }.get(case, good)
    run_dir = tmp_path / "runs" / "stopped"
    run_dir.mkdir(parents=True)
    if case != "missing":
        (run_dir / "checkpoint.pt").write_bytes(data)
    before = sorted(tmp_path.rglob("*"))
    extra = ["--gamma", 0.9] if case == "other flag" else []
    total = N if case == "too few steps" else N + M  # the checkpoint is at N + M
    proc = run_script("rfm_flow.py", cli("rfm_flow.py", "--total-timesteps", total, "--resume", run_dir, *extra),
                      tmp_path)  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    expected = {"other script": "--exp-name qvpo_baseline -> rfm_flow", "other flag": "--gamma 0.99 -> 0.9",
                "too few steps": f"{N}"}  # fmt: skip
    assert expected.get(case, "") in lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    if case != "missing":
        assert (run_dir / "checkpoint.pt").read_bytes() == data


def test_eval_only_and_resume_exclude_each_other(tmp_path):
    proc = run_script("rfm_flow.py", ["--env-id", BANDIT, "--eval-only", "x.pt", "--resume", "y"], tmp_path)
    assert proc.returncode != 0
    assert re.fullmatch(r"error: .*--eval-only.*", proc.stderr.strip()), proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("file", ["checkpoint.pt", "rfm_flow.pt"])
def test_eval_only_reproduces_the_final_evaluation(tmp_path, straight, file):
    """--eval-only PATH (the checkpoint or the --save-model file): no training, one evaluation logged at the
    step the weights were saved at, in a new run dir, equal to the training run's own evaluation there."""
    run_dir = straight("rfm_flow.py")
    final = read_scalars(run_dir)["eval/episodic_return"][-1]
    proc = run_script("rfm_flow.py", cli("rfm_flow.py", "--eval-only", run_dir / file), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_dir = single_run_dir(tmp_path)
    assert eval_dir.name.startswith("eval__") and not (eval_dir / "checkpoint.pt").exists()
    scalars = read_scalars(eval_dir)
    assert scalars["eval/episodic_return"] == [final] and final[0] == N + M
    assert not any(tag.startswith("losses/") for tag in scalars)
    assert f"eval step={N + M} return={final[1]:.2f}" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_save_and_restore_round_trip_every_random_stream(tmp_path, script):
    """In-process: after restore_checkpoint, python's, numpy's and torch's global RNGs and the action space draw what
    they drew after save_checkpoint; the replay buffer (wrapped) matches; the training env's last reset is replayed, so
    its observation and its random stream are those after the step that drew reward noise and then autoreset."""
    import gymnasium as gym

    mod = __import__(script[: -len(".py")])
    envs = gym.vector.SyncVectorEnv([mod.make_env(NOISY_BANDIT, 3, 0, False, "")],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)  # fmt: skip
    envs.reset(seed=3)
    rb = mod.ReplayBuffer(5, 2, 2, "cpu")
    for _ in range(7):  # wraps: 7 rows into 5
        rb.add(*(np.random.rand(1, d).astype(np.float32) for d in (2, 2, 2)), np.zeros(1), np.zeros(1))
    obs_after_step = envs.step(envs.action_space.sample())[0]  # reward noise, then the autoreset's context
    env_stream = envs.envs[0].np_random.bit_generator.state
    path = str(tmp_path / "checkpoint.pt")
    mod.save_checkpoint(path, {"rb": rb}, envs, global_step=7, last_return=0.5)

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item(), envs.single_action_space.sample().tolist()

    want = draws()
    draws()  # move every stream on
    envs.step(envs.action_space.sample())
    fresh = mod.ReplayBuffer(5, 2, 2, "cpu")
    obs, step, last_return = mod.restore_checkpoint(load(path), {"rb": fresh}, envs, torch.device("cpu"))
    assert draws() == want
    assert (obs == obs_after_step).all() and (step, last_return) == (7, 0.5)
    assert envs.envs[0].np_random.bit_generator.state == env_stream
    assert torch.equal(fresh.data, rb.data) and (fresh.ptr, fresh.full) == (rb.ptr, rb.full) == (2, True)
    legacy = np.random.RandomState(5)  # what shimmy's dm_control envs have as np_random
    state, first = mod.rng_state(legacy), legacy.rand(3)
    mod.set_rng_state(legacy, state)
    assert (legacy.rand(3) == first).all()
