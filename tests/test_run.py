"""benchmark/run.py: sweeps of a fake script (tests/run_fakes.py) with the real scripts' interface: runs identified
by their whole configuration, errors in one line before anything runs, live runs left alone, the run index, Slurm
options, and the requeue path with a live child (fast) and with a real time limit through submitit (slow)."""

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmark import run as launcher
from tests.conftest import ROOT, read_scalars
from tests.run_fakes import FAKE

ENV = "toy/Env-v0"


def fake_script(tmp_path, name="fake_algo"):
    script = tmp_path / f"{name}.py"
    if not script.exists():
        script.write_text(FAKE)
    return script


def launch(tmp_path, *args, timeout=180, script=None):
    """benchmark/run.py with the fake script, cwd tmp_path; returns the CompletedProcess (stdout + stderr)."""
    script = script or fake_script(tmp_path)
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--scripts", str(script), "--env-ids", ENV, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def dry_run(tmp_path, capsys, *scripts, **kw):
    """launcher.main in this process with --dry-run; returns (exit status, the printed lines)."""
    scripts = scripts or (str(fake_script(tmp_path)),)
    args = launcher.Args(scripts=list(scripts), env_ids=[ENV], seeds=[1], runs_dir=str(tmp_path / "runs"), dry_run=True,
                         **kw)  # fmt: skip
    rc = launcher.main(args)
    return rc, capsys.readouterr().out.splitlines()


def make_run(tmp_path, flags="", eval_steps=(100,), checkpoint=True, name="fake_algo", seed=1, **overrides):
    """A run folder as the fake script leaves it: config.json (the flags resolved by its own parser) and eval points."""
    from torch.utils.tensorboard import SummaryWriter

    module = launcher.load_script(fake_script(tmp_path, name))
    args = launcher.parse_script_flags(module, shlex.split(flags), "test")
    config = launcher.resolve(module, args, ENV, seed, "test", set())
    run_dir = tmp_path / "runs" / f"toy_Env-v0__{name}__{seed}__{time.time_ns()}"
    writer = SummaryWriter(str(run_dir))
    for step in eval_steps:
        writer.add_scalar("eval/episodic_return", 1.0, step)
    writer.close()
    body = dict(script=f"{name}.py", args={**config, **overrides}, resumable=sorted(module.RESUMABLE), commit=None)
    (run_dir / "config.json").write_text(json.dumps(body))
    if checkpoint:
        (run_dir / "checkpoint.pt").write_text(json.dumps({"step": max(eval_steps, default=0)}))
    return run_dir


def run_dirs(tmp_path):
    return sorted(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("toy_Env-v0__"))


# ---------------------------------------------------------------- whole sweeps


def test_sweep_runs_logs_and_skips_finished_runs(tmp_path):
    proc = launch(tmp_path, "--seeds", "1", "2", "--extra= --total-timesteps 100", "--workers", "2", "--threads", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 runs: 2 done" in proc.stdout
    dirs = run_dirs(tmp_path)
    assert [d.name.split("__")[:3] for d in dirs] == [["toy_Env-v0", "fake_algo", str(seed)] for seed in (1, 2)]
    assert all(read_scalars(d)["eval/episodic_return"][-1][0] == 100 for d in dirs)
    for seed in (1, 2):
        log = (tmp_path / "runs" / "logs" / f"fake_algo__toy_Env-v0__{seed}.log").read_text()
        assert "threads=3" in log and "step=50 SPS=100" in log and f"eval step=100 return={10 * seed}.00" in log
    assert not list((tmp_path / "runs" / ".live").iterdir())  # finished runs leave no lock

    # the same command again: both runs are found finished, nothing is launched
    proc = launch(tmp_path, "--seeds", "1", "2", "--extra= --total-timesteps 100", "--workers", "2")
    assert proc.returncode == 0 and "2 runs: 2 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert f"skipped (done: runs/{dirs[0].name})" in proc.stdout
    assert run_dirs(tmp_path) == dirs
    # --lr 1e-2 is another configuration; --lr 1e-3 is the default spelled out, the same one as the runs above
    proc = launch(tmp_path, "--seeds", "1", "--variants", " --lr 1e-2", " --lr 1e-3")
    assert proc.returncode == 0 and "2 runs: 1 done, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert len(run_dirs(tmp_path)) == 3


def test_failing_run_is_reported_with_its_last_error_line_and_log(tmp_path):
    proc = launch(tmp_path, "--seeds", "1", "--variants", "", " --fail", "--workers", "2")
    assert proc.returncode != 0
    assert "2 runs: 1 done, 1 failed" in proc.stdout, proc.stdout + proc.stderr
    log = tmp_path / "runs" / "logs" / "fake_algo-fail__toy_Env-v0__1.log"
    assert f"FAILED rc=3: fake_algo-fail__toy_Env-v0__1  log: {log}\n    error: asked to fail" in proc.stdout
    # the failed run left a checkpoint: the rerun resumes it, the finished one is skipped
    (failed,) = [d for d in run_dirs(tmp_path) if json.loads((d / "config.json").read_text())["args"]["fail"]]
    proc = launch(tmp_path, "--seeds", "1", "--variants", "", " --fail", "--dry-run")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# skipped (done: runs/") and lines[1].endswith(f"--fail --resume {failed}"), proc.stdout


def test_dry_run_prints_commands_and_launches_nothing(tmp_path):
    proc = launch(tmp_path, "--seeds", "1", "2", "--variants", " --capture-video", "--extra", " --lr 0.1", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = str(tmp_path / "fake_algo.py")
    expected = [[sys.executable, script, "--env-id", ENV, "--seed", str(s), "--capture-video", "--lr", "0.1"] for s in (1, 2)]
    assert [shlex.split(line) for line in proc.stdout.splitlines()] == expected
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_the_real_script(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--env-ids", "tests.toy_envs:ContextBandit-v0",
           "--variants", " --estimator noise", "--extra= --total-timesteps 1000", "--dry-run"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # check_env imports tests.toy_envs
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    flags = ["--estimator", "noise", "--total-timesteps", "1000"]
    expected = [[str(ROOT / "rfm_flow.py"), "--env-id", "tests.toy_envs:ContextBandit-v0", "--seed", str(seed), *flags]
                for seed in (1, 2, 3)]  # fmt: skip
    assert [line[1:] for line in lines] == expected
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 1. a run is its whole configuration


def test_a_flag_left_at_its_default_is_part_of_the_identity(tmp_path, capsys):
    """The issue's case: a default request must not take a run made with a non-default flag, whichever way the flag
    was given (variant, --extra, or quoted with the script), and vice versa."""
    other = make_run(tmp_path, "--lr 0.01")
    rc, lines = dry_run(tmp_path, capsys)
    assert rc == 0 and not lines[-1].startswith("#") and "--resume" not in lines[-1], lines
    rc, lines = dry_run(tmp_path, capsys, f"{fake_script(tmp_path)} --lr 1e-2")
    assert lines[-1].startswith(f"# skipped (done: {os.path.relpath(other)})"), lines
    default = make_run(tmp_path, "")
    rc, lines = dry_run(tmp_path, capsys, extra=" --lr 0.001")  # the default, spelled out
    assert lines[-1].startswith(f"# skipped (done: {os.path.relpath(default)})"), lines
    # a field the request never names still counts: a run whose config differs in it is another run
    (default / "config.json").write_text((default / "config.json").read_text().replace('"lr": 0.001', '"lr": 0.5'))
    rc, lines = dry_run(tmp_path, capsys)
    assert not lines[-1].startswith("#"), lines


def test_another_script_or_an_eval_only_run_never_matches(tmp_path, capsys):
    make_run(tmp_path, "", name="other_algo")  # the same fields, another script
    make_run(tmp_path, "", eval_only="runs/x/checkpoint.pt")  # evaluating a checkpoint is not training
    rc, lines = dry_run(tmp_path, capsys)
    assert not lines[-1].startswith("#") and "--resume" not in lines[-1], lines


def test_resumable_fields_may_differ_and_a_longer_run_extends_a_finished_one(tmp_path, capsys):
    unfinished = make_run(tmp_path, "--eval-every 20", eval_steps=(20, 40))  # eval_every: in RESUMABLE
    rc, lines = dry_run(tmp_path, capsys)
    assert lines[-1].endswith(f"--resume {unfinished}"), lines
    finished = make_run(tmp_path, "", eval_steps=(50, 100))
    rc, lines = dry_run(tmp_path, capsys)
    assert lines[-1].startswith(f"# skipped (done: {os.path.relpath(finished)})"), lines
    rc, lines = dry_run(tmp_path, capsys, extra=" --total-timesteps 200")  # more steps: continue the finished run
    assert lines[-1].endswith(f"--total-timesteps 200 --resume {finished}"), lines


def test_index_reads_each_event_file_once(tmp_path, monkeypatch, capsys):
    run_dir = make_run(tmp_path, "", eval_steps=(50,))
    (tmp_path / "runs" / "old_run").mkdir()  # made before config.json existed: not matched, counted in a note
    (tmp_path / "runs" / "old_run" / "events.out.tfevents.1.x").write_bytes(b"")
    (record,) = launcher.index_runs(tmp_path / "runs")
    assert record["eval_steps"] == {50} and "1 run folders" in capsys.readouterr().out
    monkeypatch.setattr(launcher, "read_eval_steps", lambda d: pytest.fail("read again although unchanged"))
    assert launcher.index_runs(tmp_path / "runs")[0]["eval_steps"] == {50}
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))  # the run went on: a changed event file is read again
    writer.add_scalar("eval/episodic_return", 2.0, 100)
    writer.close()
    monkeypatch.undo()
    assert launcher.index_runs(tmp_path / "runs")[0]["eval_steps"] == {50, 100}


# ---------------------------------------------------------------- 5. errors in one line before anything runs


@pytest.mark.parametrize("args, message", [
    (["--env-ids", "dm/Nope"], "error: unknown env id 'dm/Nope' (fake_algo.py)"),
    (["--extra= --total-timestep 5"], "error: fake_algo.py --total-timestep 5: Unrecognized options: --total-timestep, 5 "
                                      "(perhaps you meant --total-timesteps)"),
    (["--extra= --lr x"], "error: fake_algo.py --lr x: Error parsing --lr: "),
    (["--extra= --total-timesteps 0"], "error: --total-timesteps must be >= 1 (fake_algo.py --total-timesteps 0)"),
    (["--extra= --seed 4"], "error: fake_algo.py --seed 4: --seed is set by the launcher"),
    (["--scripts", "README.md"], "error: --scripts "),
    (["--scripts", "benchmark/plot.py"], "error: --scripts "),
])  # fmt: skip
def test_bad_requests_fail_in_one_line_before_anything_runs(tmp_path, args, message):
    proc = launch(tmp_path, "--seeds", "1", *args)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_flag_one_script_lacks_is_refused_for_that_script(tmp_path):
    script = fake_script(tmp_path)
    other = tmp_path / "other_algo.py"
    other.write_text(FAKE.replace("    fail: bool = False\n", ""))  # a script without --fail
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "run.py"), "--scripts", str(script), str(other),
                           "--env-ids", ENV, "--extra= --fail", "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.startswith("error: other_algo.py --fail: Unrecognized options"), proc.stderr
    assert proc.stdout == ""


def test_slurm_not_installed_is_one_line(tmp_path):
    env_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "sbatch").exists())
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--scripts", str(fake_script(tmp_path)),
           "--env-ids", ENV, "--slurm"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, PATH=env_path))
    assert proc.returncode != 0 and proc.stderr.strip() == "error: --slurm: sbatch not found (Slurm is not installed " \
        "here); run without --slurm", proc.stderr  # fmt: skip


def test_bad_runs_dir_is_one_error_line(tmp_path):
    proc = launch(tmp_path, "--runs-dir", "results", "--dry-run")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --runs-dir must be a folder named runs")


# ---------------------------------------------------------------- 3. a live run is never started twice


def test_a_paused_run_is_shown_running_and_not_offered_again(tmp_path):
    fake_script(tmp_path)
    first = subprocess.Popen([sys.executable, str(ROOT / "benchmark" / "run.py"), "--scripts", "fake_algo.py",
                              "--env-ids", ENV, "--seeds", "1", "--extra= --total-timesteps 400 --step-time 0.05"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    pid = None
    try:
        deadline = time.time() + 60
        while not list((tmp_path / "runs").glob("toy*/config.json")) and time.time() < deadline:
            time.sleep(0.1)  # the run has started
        (lock,) = (tmp_path / "runs" / ".live").glob("*.json")
        pid = json.loads(lock.read_text())["pid"]
        run_dir = next((tmp_path / "runs").glob("toy*"))
        (run_dir / "checkpoint.pt").write_text('{"step": 0}')  # as a periodic checkpoint would: resumable
        os.kill(pid, signal.SIGSTOP)
        proc = launch(tmp_path, "--seeds", "1", "--extra= --total-timesteps 400 --step-time 0.05", "--dry-run")
        assert proc.returncode == 0 and proc.stdout.startswith(f"# running (pid {pid}):"), proc.stdout + proc.stderr
        os.kill(pid, signal.SIGKILL)  # the run dies: its folder is offered for --resume again
        first.wait(60)
        proc = launch(tmp_path, "--seeds", "1", "--extra= --total-timesteps 400 --step-time 0.05", "--dry-run")
        assert proc.stdout.strip().endswith(f"--resume {run_dir}"), proc.stdout + proc.stderr
    finally:
        first.kill()
        if pid:  # its own session: not stopped with the launcher
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_queued_slurm_job_is_not_submitted_again(tmp_path, monkeypatch, capsys):
    fake_script(tmp_path)
    (run,) = launcher.plan(launcher.Args(scripts=[str(tmp_path / "fake_algo.py")], env_ids=[ENV], seeds=[1],
                                         runs_dir=str(tmp_path / "runs")))  # fmt: skip
    launcher.write_lock(run, slurm_job="4242_0")  # what a submission leaves: no run folder yet
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text('#!/bin/sh\n[ "$3" = 4242_0 ] && echo PENDING\nexit 0\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, lines = dry_run(tmp_path, capsys)
    assert lines[-1].startswith("# running (Slurm job 4242_0 pending):"), lines
    launcher.write_lock(run, slurm_job="4243_0")  # gone from the queue: no longer live
    rc, lines = dry_run(tmp_path, capsys)
    assert not lines[-1].startswith("#"), lines


# ---------------------------------------------------------------- 2, 6. submitit and Slurm


def test_submitit_local_executor_keeps_to_workers_and_threads(tmp_path):
    proc = launch(tmp_path, "--seeds", "1", "2", "--slurm", "--slurm-executor", "local", "--workers", "1",
                  "--slurm-cpus", "3", "--extra= --step-time 0.01")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 runs: 2 done" in proc.stdout, proc.stdout
    assert sum(line.startswith("job ") for line in proc.stdout.splitlines()) == 2
    assert list((tmp_path / "runs" / "slurm").iterdir())  # submitit's files under the runs folder
    spans = []
    for seed in (1, 2):
        log = (tmp_path / "runs" / "logs" / f"fake_algo__toy_Env-v0__{seed}.log").read_text()
        assert "threads=3" in log  # --threads defaults to the CPUs per task
        spans.append((float(log.split(" t=")[1].split()[0]), float(log.split("finished t=")[1].split()[0])))
    spans.sort()
    assert spans[0][1] <= spans[1][0]  # --workers 1: one after the other


def test_slurm_parameters_reach_submitit(tmp_path, monkeypatch, capsys):
    seen = {}

    class Executor:
        def __init__(self, folder, cluster):
            seen.update(folder=folder, cluster=cluster)

        def update_parameters(self, **params):
            seen.update(params)

        def map_array(self, fn, runs):
            return [type("Job", (), {"job_id": f"77_{i}"}) for i in range(len(runs))]

    monkeypatch.setattr(launcher.submitit, "AutoExecutor", Executor)
    monkeypatch.setattr(launcher.shutil, "which", lambda name: "/usr/bin/" + name if name == "sbatch" else None)
    fake_script(tmp_path)
    args = launcher.Args(scripts=[str(tmp_path / "fake_algo.py")], env_ids=[ENV], seeds=[1, 2], slurm=True,
                         runs_dir=str(tmp_path / "runs"), slurm_account="acc", slurm_qos="high", slurm_mem_gb=16,
                         slurm_constraint="a100", slurm_setup=["module load cuda"], slurm_sbatch=["mail-type=FAIL"],
                         workers=5)  # fmt: skip
    assert launcher.main(args) == 0
    assert seen["folder"] == str(tmp_path / "runs" / "slurm") and seen["name"] == "fake_algo"
    assert (seen["slurm_account"], seen["slurm_qos"], seen["mem_gb"], seen["slurm_constraint"]) == ("acc", "high", 16, "a100")
    assert seen["slurm_setup"] == ["module load cuda"] and seen["slurm_additional_parameters"] == {"mail-type": "FAIL"}
    assert seen["slurm_array_parallelism"] == 5
    # the submitted jobs hold their configurations: submitting again skips them (no squeue here: by heartbeat time)
    assert len(list((tmp_path / "runs" / ".live").glob("*.json"))) == 2
    assert launcher.main(dataclasses.replace(args, dry_run=True)) == 0
    lines = capsys.readouterr().out.splitlines()[-2:]
    assert all(line.startswith("# running (Slurm job 77_") for line in lines), lines


def test_requeue_signal_with_a_live_child_resubmits_at_once(tmp_path):
    """submitit calls checkpoint() from the signal handler while execute() waits on the child: it must neither wait
    out its timeout nor scan the event files. A live child and a real SIGUSR1 to this process."""
    fake_script(tmp_path)
    (run,) = launcher.plan(launcher.Args(scripts=[str(tmp_path / "fake_algo.py")], env_ids=[ENV], seeds=[1],
                                         extra=" --total-timesteps 100000 --step-time 0.01",
                                         runs_dir=str(tmp_path / "runs")))  # fmt: skip
    job, resubmitted = launcher.RunJob(), []
    handler = signal.signal(signal.SIGUSR1, lambda *_: resubmitted.append((job.checkpoint(run), time.time())))
    try:
        def signal_when_started():
            while not list((tmp_path / "runs").glob("toy*/config.json")):
                time.sleep(0.05)
            time.sleep(1.0)  # tyro and the tensorboard import: past the fake's signal handler set-up
            resubmitted.append(time.time())
            os.kill(os.getpid(), signal.SIGUSR1)

        threading.Thread(target=signal_when_started, daemon=True).start()
        rc = job(run)
    finally:
        signal.signal(signal.SIGUSR1, handler)
    sent, (delayed, handled) = resubmitted
    assert rc == launcher.PREEMPTED and handled - sent < 10  # was 60 s: wait(timeout=60) inside the handler
    (run_dir,) = run_dirs(tmp_path)
    assert isinstance(delayed.function, launcher.RunJob) and delayed.args[0].cmd == [*run.cmd, "--resume", str(run_dir)]
    assert "preempted at step" in Path(run.log).read_text()


@pytest.mark.slow
def test_time_limit_requeues_resumes_and_finishes(tmp_path):
    """A real 1-minute time limit through submitit's local executor: its warning signal (30 s before the limit)
    reaches the job, the script checkpoints and exits 75, the job is requeued with --resume and finishes."""
    start = time.time()
    proc = launch(tmp_path, "--seeds", "1", "--slurm", "--slurm-executor", "local", "--slurm-time-min", "1",
                  "--extra= --total-timesteps 400 --step-time 0.1", timeout=300)  # fmt: skip
    wall = time.time() - start
    assert proc.returncode == 0 and "1 runs: 1 done" in proc.stdout, proc.stdout + proc.stderr
    log = (tmp_path / "runs" / "logs" / "fake_algo__toy_Env-v0__1.log").read_text()
    (run_dir,) = run_dirs(tmp_path)
    assert "preempted at step" in log and f"--resume {run_dir}" in log and "finished" in log, log
    assert read_scalars(run_dir)["eval/episodic_return"][-1][0] == 400
    print(f"requeue test wall time: {wall:.0f} s")


def test_the_committed_runs_are_told_apart_from_the_default_configuration(tmp_path, capsys):
    """The issue's case with the real script: the committed runs (reduced configuration, config.json backfilled) are
    done for the command that made them, and not for a request that leaves those flags at their defaults."""
    import shutil

    shutil.copytree(ROOT / "results" / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns(".*"))
    reduced = (" --total-timesteps 10000 --learning-starts 1000 --eval-every 1000 --eval-episodes 5 --batch-size 64"
               " --num-particles 8 --num-posterior-samples 32")  # fmt: skip
    common = dict(env_ids=["dm_control/cartpole-swingup-v0"], runs_dir=str(tmp_path / "runs"), dry_run=True)
    scripts = ["rfm_flow.py", "rfm_flow.py --estimator noise", "rfm_flow.py --estimator gradient"]
    assert launcher.main(launcher.Args(scripts=scripts, extra=reduced, **common)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and all(line.startswith("# skipped (done: ") for line in lines), lines
    assert launcher.main(launcher.Args(extra=" --total-timesteps 10000", **common)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and not any(line.startswith("#") or "--resume" in line for line in lines), lines
