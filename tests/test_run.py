"""benchmark/run.py: a sweep of a tiny fake script (logs, failures, skipping finished runs, dry run, submitit), a dry
run of the real rfm_flow.py, and the functions that match earlier runs."""

import shlex
import subprocess
import sys

import pytest

from benchmark import run as launcher
from tests.conftest import ROOT, read_scalars

# Stands in for a real script: same run-dir name, hyperparameter table and final eval point, in a fraction of the time.
FAKE = r'''
import argparse, os, sys, time
from torch.utils.tensorboard import SummaryWriter

p = argparse.ArgumentParser()
p.add_argument("--env-id", required=True)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--exp-name", default=os.path.basename(__file__)[: -len(".py")])
p.add_argument("--total-timesteps", type=int, default=100)
p.add_argument("--lr", type=float, default=0.001)
p.add_argument("--capture-video", action=argparse.BooleanOptionalAction, default=False)
p.add_argument("--fail", action="store_true")
args = p.parse_args()
print(f"threads={os.environ.get('OMP_NUM_THREADS')}", flush=True)
run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__{args.seed}__{time.time_ns()}"
writer = SummaryWriter(f"runs/{run_name}")
writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
for step in range(0, args.total_timesteps, 50):
    print(f"step={step} SPS=100 last_return={step / 10:.1f}", flush=True)
if args.fail:
    print("error: asked to fail")
    writer.close()
    sys.exit(3)
writer.add_scalar("eval/episodic_return", 10.0 * args.seed, args.total_timesteps)
print(f"eval step={args.total_timesteps} return={10.0 * args.seed:.2f}")
writer.close()
'''
ENV = "toy/Env-v0"


def launch(tmp_path, *args, timeout=180):
    """benchmark/run.py with the fake script, cwd tmp_path; returns the CompletedProcess (stdout + stderr)."""
    script = tmp_path / "fake_algo.py"
    if not script.exists():
        script.write_text(FAKE)
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--scripts", str(script), "--env-ids", ENV, *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def run_dirs(tmp_path):
    return sorted(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("toy_Env-v0__"))


def test_sweep_runs_logs_and_skips_finished_runs(tmp_path):
    proc = launch(tmp_path, "--seeds", "1", "2", "--extra= --total-timesteps 100", "--workers", "2", "--threads", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 runs: 2 done" in proc.stdout
    dirs = run_dirs(tmp_path)
    assert [d.name.split("__")[:3] for d in dirs] == [["toy_Env-v0", "fake_algo", str(seed)] for seed in (1, 2)]
    assert all(read_scalars(d)["eval/episodic_return"][0][0] == 100 for d in dirs)
    for seed in (1, 2):
        log = (tmp_path / "runs" / "logs" / f"fake_algo__toy_Env-v0__{seed}.log").read_text()
        assert "threads=3" in log and "step=50 SPS=100" in log and f"eval step=100 return={10 * seed}.00" in log

    # the same command again: both runs are found finished, nothing is launched
    proc = launch(tmp_path, "--seeds", "1", "2", "--extra= --total-timesteps 100", "--workers", "2")
    assert proc.returncode == 0 and "2 runs: 2 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert f"skipped (done: runs/{dirs[0].name})" in proc.stdout
    assert run_dirs(tmp_path) == dirs
    # a different value of a flag (given as 1e-2, stored as 0.01) is a different run; the same value (1e-3) is not
    proc = launch(tmp_path, "--seeds", "1", "--variants", " --lr 1e-2", " --lr 1e-3", "--extra= --total-timesteps 100")
    assert proc.returncode == 0 and "2 runs: 1 done, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert len(run_dirs(tmp_path)) == 3


def test_failing_run_is_reported_with_its_log(tmp_path):
    proc = launch(tmp_path, "--seeds", "1", "--variants", "", " --fail", "--workers", "2")
    assert proc.returncode != 0
    assert "2 runs: 1 done, 1 failed" in proc.stdout, proc.stdout + proc.stderr
    log = tmp_path / "runs" / "logs" / "fake_algo-fail__toy_Env-v0__1.log"
    assert f"FAILED rc=3: fake_algo-fail__toy_Env-v0__1  log: {log}" in proc.stdout
    assert "error: asked to fail" in log.read_text()
    # the failed run left a checkpoint (as the scripts will once they support --resume): the rerun resumes from it
    (failed,) = [d for d in run_dirs(tmp_path) if "eval/episodic_return" not in read_scalars(d)]
    (failed / "checkpoint.pt").touch()
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
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # rfm_flow.py: found in ROOT
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    flags = ["--estimator", "noise", "--total-timesteps", "1000"]
    expected = [[str(ROOT / "rfm_flow.py"), "--env-id", "tests.toy_envs:ContextBandit-v0", "--seed", str(seed), *flags]
                for seed in (1, 2, 3)]  # fmt: skip
    assert [line[1:] for line in lines] == expected
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_submitit_executor_runs_both(tmp_path, executor):
    proc = launch(tmp_path, "--seeds", "1", "2", "--slurm", "--slurm-executor", executor,
                  "--slurm-log-dir", str(tmp_path / "runs" / "slurm"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 runs: 2 done" in proc.stdout, proc.stdout
    assert sum(line.startswith("job ") for line in proc.stdout.splitlines()) == 2  # job ids, printed at submission
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and all(read_scalars(d)["eval/episodic_return"][0][0] == 100 for d in dirs)
    assert "eval step=100 return=20.00" in (tmp_path / "runs" / "logs" / "fake_algo__toy_Env-v0__2.log").read_text()


def test_requeue_resubmits_with_resume(tmp_path):
    """What submitit resubmits when a job is stopped: the same run, now with --resume pointing at its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "runs" / "toy_Env-v0__fake_algo__1__1700000000"
    writer = SummaryWriter(str(run_dir))
    table = "|exp_name|fake_algo|\n|env_id|toy/Env-v0|\n|seed|1|\n|total_timesteps|100|"
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    writer.add_scalar("eval/episodic_return", 1.0, 50)
    writer.close()
    (run_dir / "checkpoint.pt").touch()
    want = {"exp_name": "fake_algo", "env_id": ENV, "seed": 1}
    run = launcher.Run("x", ["python", "fake_algo.py"], str(tmp_path), str(tmp_path / "x.log"), str(tmp_path / "runs"),
                       want, {})  # fmt: skip
    delayed = launcher.RunJob().checkpoint(run)
    assert isinstance(delayed.function, launcher.RunJob)
    assert delayed.args[0].cmd == ["python", "fake_algo.py", "--resume", str(run_dir)]


def test_bad_runs_dir_is_one_error_line(tmp_path):
    proc = launch(tmp_path, "--runs-dir", "results", "--dry-run")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --runs-dir must be a folder named runs")


# ---------------------------------------------------------------- matching functions


def test_parse_flags():
    tokens = shlex.split("--lr 3e-4 --capture-video --no-cuda --exp-name=x --hidden 64 64 --offset -1")
    assert launcher.parse_flags(tokens) == {"lr": "3e-4", "capture_video": True, "cuda": False, "exp_name": "x",
                                            "hidden": "64 64", "offset": "-1"}  # fmt: skip
    assert launcher.parse_flags([]) == {}
    assert launcher.parse_flags(["--no-capture-video"]) == {"capture_video": False}
    with pytest.raises(ValueError):
        launcher.parse_flags(["0.1", "--lr"])


def test_same_value():
    assert launcher.same_value("0.001", "1e-3") and launcher.same_value("10000", "10_000")
    assert launcher.same_value("3", 3.0) and not launcher.same_value("0.01", "0.001")
    assert launcher.same_value("True", True) and launcher.same_value("False", False)
    assert not launcher.same_value("True", False) and not launcher.same_value("1", True)
    assert launcher.same_value("[64, 64]", "64 64") and not launcher.same_value("[64, 64]", "64")
    assert launcher.same_value("stein", "stein") and not launcher.same_value("stein", "noise")


def test_matches_and_previous_run():
    rows = ["exp_name|rfm_flow", "seed|1", "env_id|a/b-v0", "estimator|stein", "total_timesteps|1000"]
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{row}|" for row in rows)
    hparams = launcher.parse_hparams(table)
    assert hparams == {"exp_name": "rfm_flow", "seed": "1", "env_id": "a/b-v0", "estimator": "stein",
                       "total_timesteps": "1000"}  # fmt: skip
    want = {"exp_name": "rfm_flow", "env_id": "a/b-v0", "seed": 1}
    assert launcher.matches(hparams, want) and launcher.matches(hparams, {**want, "estimator": "stein"})
    assert not launcher.matches(hparams, {**want, "seed": 2}) and not launcher.matches(hparams, {**want, "lr": "1"})
    # a variant that leaves --estimator at its default must not take a sibling variant's `--estimator stein` run
    assert not launcher.matches(hparams, want, avoid={"estimator": ["stein"]})
    assert launcher.matches(hparams, want, avoid={"estimator": ["noise"]})

    assert launcher.is_finished(hparams, {500, 1000}) and not launcher.is_finished(hparams, {500})
    unfinished = ("runs/old", hparams, {500}, True)
    finished = ("runs/done", hparams, {500, 1000}, False)
    other = ("runs/other", {**hparams, "seed": "2"}, {1000}, True)
    assert launcher.previous_run([finished, unfinished, other], want) == ("done", "runs/done")
    assert launcher.previous_run([unfinished, other], want) == ("resume", "runs/old")
    assert launcher.previous_run([(*unfinished[:3], False), other], want) is None
    assert launcher.with_resume(["python", "x.py"], "runs/old") == ["python", "x.py", "--resume", "runs/old"]


def test_plan_sets_what_each_run_must_match(tmp_path):
    args = launcher.Args(env_ids=["a/b-v0"], seeds=[1], variants=["", " --estimator noise"],
                         extra=" --total-timesteps 100", runs_dir=str(tmp_path / "runs"))  # fmt: skip
    default, noise = launcher.plan(args)
    assert (default.label, noise.label) == ("rfm_flow__a_b-v0__1", "rfm_flow-estimator_noise__a_b-v0__1")
    assert default.cmd[1:] == [str(ROOT / "rfm_flow.py"), "--env-id", "a/b-v0", "--seed", "1", "--total-timesteps", "100"]
    assert noise.want == {"exp_name": "rfm_flow", "env_id": "a/b-v0", "seed": 1, "estimator": "noise",
                          "total_timesteps": "100"}  # fmt: skip
    # the default variant must not take the noise variant's runs, and no run takes an --eval-only run
    assert default.avoid == {"eval_only": [True], "estimator": ["noise"]} and noise.avoid == {"eval_only": [True]}
    assert default.cwd == str(tmp_path) and default.log == str(tmp_path / "runs" / "logs" / f"{default.label}.log")


def test_plan_with_flags_of_one_script(tmp_path):
    """`--scripts "qvpo_baseline.py --shared-batch" rfm_flow.py "rfm_flow.py --estimator noise"`: each entry's flags go
    to its own runs only, and the plain rfm_flow.py entry does not take the noise entry's runs."""
    args = launcher.Args(scripts=["qvpo_baseline.py --shared-batch --q-lr 1e-3", "rfm_flow.py",
                                  "rfm_flow.py --estimator noise"], env_ids=["a/b-v0"], seeds=[1],
                         runs_dir=str(tmp_path / "runs"))  # fmt: skip
    qvpo, flow, noise = launcher.plan(args)
    assert qvpo.cmd[2:] == ["--env-id", "a/b-v0", "--seed", "1", "--shared-batch", "--q-lr", "1e-3"]
    assert flow.cmd[2:] == ["--env-id", "a/b-v0", "--seed", "1"] and noise.cmd[6:] == ["--estimator", "noise"]
    assert qvpo.want == {"exp_name": "qvpo_baseline", "env_id": "a/b-v0", "seed": 1, "shared_batch": True,
                         "q_lr": "1e-3"}  # fmt: skip
    assert flow.avoid == {"eval_only": [True], "estimator": ["noise"]} and "shared_batch" not in flow.avoid
    assert len({qvpo.label, flow.label, noise.label}) == 3
