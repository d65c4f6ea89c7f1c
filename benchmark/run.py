"""Launch a sweep (scripts x variants x env ids x seeds), one subprocess of an unchanged script per run.

    python benchmark/run.py --env-ids dm_control/cheetah-run-v0 dm_control/walker-walk-v0 --workers 2
    python benchmark/run.py --scripts rfm_flow.py qvpo_baseline.py --env-ids Hopper-v5 --seeds 1 2 3 4 5 \\
        --variants "" " --estimator noise" --extra " --total-timesteps 100000" --dry-run
    python benchmark/run.py --env-ids Hopper-v5 --slurm --slurm-partition gpu --slurm-gpus 1 --workers 32

A variant or --extra value that begins with a dash needs a leading space (" --estimator noise") or the `--extra=...`
form, or the command line would read it as a flag of this launcher. Finished runs found under --runs-dir are skipped,
so an interrupted sweep is continued by rerunning the same command. See benchmark/README.md.
"""

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

# Submitit has Slurm send this signal shortly before a job's time limit. The scripts checkpoint and exit 75 on
# SIGUSR1, so the job and the script it runs act on the same signal. Must be set before the import.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
import submitit  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_TAG = "eval/episodic_return"
PREEMPTED = 75  # exit status of a script stopped by SIGTERM/SIGUSR1 after writing runs/{run_name}/checkpoint.pt


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["rfm_flow.py"])  # scripts (a path, or relative to the repo)
    env_ids: list[str] = field(default_factory=list)  # environment ids, one run each
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # seeds, one run each
    variants: list[str] = field(default_factory=lambda: [""])  # extra flags per variant, e.g. " --estimator noise"
    extra: str = ""  # flags appended to every run, e.g. " --total-timesteps 10000"
    workers: int = 1  # runs at once (locally: subprocesses; on Slurm: array tasks)
    threads: int = 1  # torch/OpenMP threads per run (OMP_NUM_THREADS, MKL_NUM_THREADS)
    runs_dir: str = "runs"  # where the runs write (a folder named `runs`: each run starts in its parent folder)
    dry_run: bool = False  # print the commands and exit
    slurm: bool = False  # submit the runs as one submitit job array instead of running them here
    slurm_partition: str | None = None  # Slurm partition
    slurm_time_min: int = 1440  # time limit of each job, minutes
    slurm_gpus: int = 0  # GPUs per job
    slurm_cpus: int = 2  # CPUs per job
    slurm_log_dir: str = "runs/slurm"  # submitit's folder (job scripts, pickles, stdout/stderr)
    slurm_executor: Literal["slurm", "local", "debug"] = "slurm"  # local/debug: submitit on this machine (tests)
    python: str = sys.executable  # interpreter for the runs


@dataclass
class Run:
    label: str  # names the log file: {script stem}[-{variant}]__{env slug}__{seed}
    cmd: list[str]  # the command, with `--resume DIR` when an earlier run of it left a checkpoint
    cwd: str  # the parent of runs_dir, so that the script's `runs/` is runs_dir
    log: str
    runs_dir: str
    want: dict  # settings an earlier run must have to count as this one (see `matches`)
    avoid: dict  # flag -> values it must not have: set by a sibling variant while this one leaves them at default
    threads: int = 1


# ---------------------------------------------------------------- matching earlier runs (pure functions)


def parse_flags(tokens):
    """["--lr", "3e-4", "--capture-video", "--no-cuda", "--exp-name=x"] -> {lr: "3e-4", capture_video: True,
    cuda: False, exp_name: "x"}; a flag with several values keeps them space-separated."""
    flags, i = {}, 0
    while i < len(tokens):
        if not tokens[i].startswith("--"):
            raise ValueError(f"expected a --flag, got {tokens[i]!r}")
        name, eq, value = tokens[i][2:].partition("=")
        values = [value] if eq else []
        while not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            i += 1
            values.append(tokens[i])
        key = name.replace("-", "_")
        if values:
            flags[key] = " ".join(values)
        elif key.startswith("no_"):
            flags[key[3:]] = False
        else:
            flags[key] = True
        i += 1
    return flags


def same_value(a, b):
    """Compare a flag value with a hyperparameter-table entry: token by token (so "[64, 64]" equals "64 64"),
    booleans case-insensitively, numbers numerically ("1e4" equals "10000"), anything else as a string."""
    ta, tb = (re.findall(r"[^\s\[\](),']+", str(v)) for v in (a, b))
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.lower() in ("true", "false") or y.lower() in ("true", "false"):
            same = x.lower() == y.lower()
        else:
            try:
                same = float(x) == float(y)
            except ValueError:
                same = x == y
        if not same:
            return False
    return True


def matches(hparams, want, avoid=None):
    """An earlier run (its hyperparameter table) is this run if it has every wanted value and none to avoid."""
    if not all(key in hparams and same_value(hparams[key], value) for key, value in want.items()):
        return False
    return not any(key in hparams and any(same_value(hparams[key], v) for v in values)
                   for key, values in (avoid or {}).items())  # fmt: skip


def parse_hparams(text):
    """The scripts' "|param|value|" markdown table -> {param: value string}."""
    rows = (line.strip()[1:-1].split("|", 1) for line in text.splitlines() if line.strip().startswith("|"))
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0] not in ("param", "-")}


def is_finished(hparams, eval_steps):
    """Finished: an eval point at step == total_timesteps (the scripts always evaluate at the last step)."""
    try:
        return int(float(hparams["total_timesteps"])) in eval_steps
    except (KeyError, ValueError):
        return False


def previous_run(records, want, avoid=None):
    """("done", dir) for a finished matching run, else ("resume", dir) for one that left a checkpoint, else None.
    `records` are (dir, hparams, eval_steps, has_checkpoint), oldest first; the newest match wins."""
    found = [r for r in records if matches(r[1], want, avoid)]
    done = [r for r in found if is_finished(r[1], r[2])]
    if done:
        return "done", done[-1][0]
    resumable = [r for r in found if r[3]]
    return ("resume", resumable[-1][0]) if resumable else None


def with_resume(cmd, run_dir):
    """Continue from the checkpoint the scripts leave in run_dir."""
    return [*cmd, "--resume", str(run_dir)]


def scan_runs(runs_dir):
    """(dir, hparams, eval steps, has checkpoint.pt) of every run dir under runs_dir that has event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = []
    dirs = [d for d in Path(runs_dir).resolve().iterdir() if d.is_dir() and any(d.glob("events.out.tfevents*"))]
    for d in sorted(dirs, key=lambda d: (d.name.rsplit("__", 1)[-1].zfill(24), d.name)):  # by unix time suffix
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        text = "hyperparameters/text_summary"
        table = acc.Tensors(text)[0].tensor_proto.string_val[0].decode() if text in tags["tensors"] else ""
        hparams = parse_hparams(table)
        steps = {e.step for e in acc.Scalars(EVAL_TAG)} if EVAL_TAG in tags["scalars"] else set()
        records.append((d, hparams, steps, (d / "checkpoint.pt").exists()))
    return records


# ---------------------------------------------------------------- the sweep


def plan(args):
    """Every run of the sweep, in order."""
    runs_dir = Path(args.runs_dir).resolve()
    if runs_dir.name != "runs":
        raise SystemExit(f"error: --runs-dir must be a folder named runs (the scripts write ./runs), not {args.runs_dir}")
    if not args.env_ids:
        raise SystemExit("error: give at least one --env-ids")
    try:
        extra = shlex.split(args.extra)
        variant_flags = [parse_flags(shlex.split(v)) for v in args.variants]
        extra_flags = parse_flags(extra)
    except ValueError as e:
        raise SystemExit(f"error: --variants/--extra: {e}")
    entries = []  # (script path, its own flags as tokens, as a dict)
    for entry in args.scripts:
        script, *script_args = shlex.split(entry)  # "qvpo_baseline.py --shared-batch": flags of this script only
        path = Path(script) if Path(script).is_file() else ROOT / script
        if not path.is_file():
            raise SystemExit(f"error: script not found: {script}")
        try:
            entries.append((path, script_args, parse_flags(script_args)))
        except ValueError as e:
            raise SystemExit(f"error: --scripts {entry!r}: {e}")
    runs = []
    for path, script_args, script_flags in entries:
        for variant, vflags in zip(args.variants, variant_flags):
            flags = {**script_flags, **vflags, **extra_flags}  # the order on the command line: later flags win
            avoid = {} if "eval_only" in flags else {"eval_only": [True]}  # evaluating a checkpoint is not training
            siblings = [{**f, **v} for p, _, f in entries if p == path for v in variant_flags]  # same script
            for other in siblings:
                for key, value in other.items():
                    if key not in flags:
                        avoid.setdefault(key, []).append(value)
            tag = re.sub(r"[^A-Za-z0-9.]+", "_", " ".join([*script_args, variant])).strip("_")
            if len(tag) > 60:  # a long flag set: keep the file name short, a hash keeps it apart
                tag = f"{tag[:50]}_{hashlib.sha1(tag.encode()).hexdigest()[:8]}"
            for env_id in args.env_ids:
                env_slug = env_id.replace("/", "_").replace(":", "_")
                for seed in args.seeds:
                    label = f"{path.stem}{'-' + tag if tag else ''}__{env_slug}__{seed}"
                    cmd = [args.python, str(path.resolve()), "--env-id", env_id, "--seed", str(seed), *script_args,
                           *shlex.split(variant), *extra]  # fmt: skip
                    want = {"exp_name": path.stem, "env_id": env_id, "seed": seed, **flags}
                    runs.append(Run(label, cmd, str(runs_dir.parent), str(runs_dir / "logs" / f"{label}.log"),
                                    str(runs_dir), want, avoid, args.threads))  # fmt: skip
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"error: the same run twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return runs


def execute(run, on_start=None):
    """Run the command, appending its output to the run's log; returns the exit status."""
    env = dict(os.environ, OMP_NUM_THREADS=str(run.threads), MKL_NUM_THREADS=str(run.threads), PYTHONUNBUFFERED="1")
    Path(run.log).parent.mkdir(parents=True, exist_ok=True)
    with open(run.log, "a") as log:
        log.write(f"$ {shlex.join(run.cmd)}\n")
        log.flush()
        # a session of its own: a Ctrl-C at the terminal reaches the launcher only, which then stops runs cleanly
        proc = subprocess.Popen(run.cmd, cwd=run.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        if on_start:
            on_start(proc)
        return proc.wait()


def last_progress(log):
    """The last `step=...` line of a log, or ""."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if "step=" in ln]
        return lines[-1].strip() if lines else ""
    except OSError:
        return ""


class View:
    """On a terminal: one line per run (status, last progress line), redrawn in place. Otherwise: a line per change."""

    def __init__(self, runs, status):
        self.runs, self.status, self.tty, self.drawn, self.shown = runs, status, sys.stdout.isatty(), 0, {}

    def show(self):
        if not self.tty:
            for run in self.runs:
                if self.shown.get(run.label) != self.status[run.label]:
                    self.shown[run.label] = self.status[run.label]
                    print(f"{self.status[run.label]:<10} {run.label}", flush=True)
            return
        cols, rows = shutil.get_terminal_size()
        runs = self.runs
        if len(runs) > rows - 2:  # too many to fit: the running and failed ones
            runs = [r for r in runs if self.status[r.label].startswith(("running", "FAILED"))][: rows - 2]
        lines = [f"{self.status[r.label]:<10} {r.label}  {last_progress(r.log)}"[: cols - 1] for r in runs]
        counts = {}
        for s in self.status.values():
            counts[s.split()[0]] = counts.get(s.split()[0], 0) + 1
        lines.append(" ".join(f"{k}={v}" for k, v in counts.items()))
        sys.stdout.write((f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "\n".join(lines) + "\n")
        sys.stdout.flush()
        self.drawn = len(lines)


def run_local(runs, todo, status, workers):
    """Run `todo` on a pool of `workers` threads, each waiting on one subprocess. Ctrl-C sends SIGTERM to the running
    scripts (which checkpoint and exit 75) and drops the queued ones."""
    procs, stopping, view = {}, [], View(runs, status)

    def work(run):
        if stopping:
            status[run.label] = "cancelled"
            return
        status[run.label] = "running"
        rc = execute(run, on_start=lambda p: procs.__setitem__(run.label, p))
        status[run.label] = "done" if rc == 0 else ("stopped" if stopping else f"FAILED rc={rc}")

    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(work, run) for run in todo]
        try:
            while not all(f.done() for f in futures):
                view.show()
                time.sleep(2 if view.tty else 0.2)
        except KeyboardInterrupt:
            stopping.append(True)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would abandon runs writing their checkpoint
            print("interrupted: the running scripts checkpoint and stop (rerun the same command to continue)", flush=True)
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
    view.show()


class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job (picklable). On Slurm's warning signal before the time limit or preemption, submitit
    calls `checkpoint`, which lets the script write its checkpoint and resubmits the command with --resume."""

    def __init__(self):
        self.proc = None

    def __call__(self, run):
        rc = execute(run, on_start=lambda p: setattr(self, "proc", p))
        if rc == PREEMPTED and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # The script was stopped and checkpointed, but this job heard nothing (preemption sends SIGTERM, which
            # submitit ignores). Take submitit's own preemption path: signalling ourselves makes it call
            # `checkpoint` below, save the resubmission and `scontrol requeue` the job, then exit.
            os.kill(os.getpid(), getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))
        return rc

    def checkpoint(self, run):
        # Submitit calls this on the warning signal. Pass it on to the script (if Slurm did too, a second signal
        # only repeats the same stop request), wait for it to write its checkpoint, resubmit with --resume.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        found = previous_run(scan_runs(run.runs_dir), run.want, run.avoid)
        resume = found and found[0] == "resume" and "--resume" not in run.cmd
        cmd = with_resume(run.cmd, found[1]) if resume else run.cmd
        return submitit.helpers.DelayedSubmission(RunJob(), replace(run, cmd=cmd))


def run_submitit(args, todo, status):
    executor = submitit.AutoExecutor(folder=args.slurm_log_dir, cluster=args.slurm_executor)
    params = dict(timeout_min=args.slurm_time_min, cpus_per_task=args.slurm_cpus, name="benchmark")
    if args.slurm_executor == "slurm":
        params.update(gpus_per_node=args.slurm_gpus, slurm_partition=args.slurm_partition,
                      slurm_array_parallelism=args.workers)  # fmt: skip
    executor.update_parameters(**params)
    jobs = executor.map_array(RunJob(), todo)
    for run, job in zip(todo, jobs):
        print(f"job {job.job_id}: {run.label}  log: {run.log}")
    print(f"submitit files (job scripts, stdout/stderr): {args.slurm_log_dir}", flush=True)
    if args.slurm_executor == "slurm":
        return False  # submitted: do not wait
    for run, job in zip(todo, jobs):
        try:
            rc = job.result()
        except Exception as e:  # the job itself broke (not the script)
            rc = f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
        status[run.label] = "done" if rc == 0 else f"FAILED rc={rc}"
        print(f"{status[run.label]:<10} {run.label}", flush=True)
    return True


def main(args):
    runs = plan(args)
    records = scan_runs(args.runs_dir) if Path(args.runs_dir).is_dir() else []
    status, todo = {}, []
    for run in runs:
        found = previous_run(records, run.want, run.avoid)
        if found and found[0] == "done":
            status[run.label] = f"skipped (done: {os.path.relpath(found[1])})"
            continue
        if found:
            run.cmd = with_resume(run.cmd, found[1])
        status[run.label] = "queued"
        todo.append(run)
    if args.dry_run:
        for run in runs:
            queued = status[run.label] == "queued"
            print(shlex.join(run.cmd) if queued else f"# {status[run.label]}: {shlex.join(run.cmd)}")
        return 0
    if args.slurm:
        for run in runs:
            if status[run.label] != "queued":
                print(f"{status[run.label]}  {run.label}")
        if todo and not run_submitit(args, todo, status):
            return 0
    else:
        run_local(runs, todo, status, args.workers)

    failed = [r for r in runs if status[r.label].startswith("FAILED")]
    kinds = ("done", "skipped", "FAILED", "stopped", "cancelled")
    counts = {k: sum(status[r.label].startswith(k) for r in runs) for k in kinds}
    print(f"{len(runs)} runs: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v))
    for run in failed:
        print(f"{status[run.label]}: {run.label}  log: {run.log}")
    return 0 if counts["done"] + counts["skipped"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
