"""Launch a sweep (scripts x variants x env ids x seeds), one subprocess of an unchanged script per run.

    python benchmark/run.py --env-ids dm_control/cheetah-run-v0 dm_control/walker-walk-v0 --workers 2
    python benchmark/run.py --scripts rfm_flow.py qvpo_baseline.py --env-ids Hopper-v5 --seeds 1 2 3 4 5 \\
        --variants "" " --estimator noise" --extra " --total-timesteps 100000" --dry-run
    python benchmark/run.py --env-ids Hopper-v5 --slurm --slurm-partition gpu --slurm-gpus 1 --workers 32

A variant or --extra value that begins with a dash needs a leading space (" --estimator noise") or the `--extra=...`
form, or the command line would read it as a flag of this launcher. Each requested run is resolved with the script's
own parser and checks to its full configuration, and compared with the config.json of the runs under --runs-dir:
a finished run of the same configuration is skipped, an unfinished one resumed, a live one left alone. See
benchmark/README.md.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
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
HEARTBEAT_S = 60  # a live run's lock file is rewritten this often ...
STALE_S = 300  # ... and counts as live this long after its last write (checked by pid on the same host)
CHECKPOINT_WAIT_S = 60  # on Slurm's warning signal: how long the script may take to write its checkpoint and exit


@dataclass
class Args:
    scripts: list[str] = field(default_factory=lambda: ["rfm_flow.py"])  # scripts (a path, or relative to the repo)
    env_ids: list[str] = field(default_factory=list)  # environment ids, one run each
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # seeds, one run each
    variants: list[str] = field(default_factory=lambda: [""])  # extra flags per variant, e.g. " --estimator noise"
    extra: str = ""  # flags appended to every run, e.g. " --total-timesteps 10000"
    workers: int = 1  # runs at once (locally: subprocesses; with --slurm: array tasks)
    threads: int | None = None  # torch/OpenMP threads per run (default: 1 locally, --slurm-cpus with --slurm)
    runs_dir: str = "runs"  # where the runs write (a folder named `runs`: each run starts in its parent folder)
    dry_run: bool = False  # resolve and check every run, print the commands and exit
    slurm: bool = False  # submit the runs as one submitit job array instead of running them here
    slurm_partition: str | None = None  # Slurm partition
    slurm_account: str | None = None  # Slurm account (sbatch --account)
    slurm_qos: str | None = None  # Slurm quality of service (sbatch --qos)
    slurm_constraint: str | None = None  # node features (sbatch --constraint)
    slurm_mem_gb: int | None = None  # memory per job, GB (default: the cluster's)
    slurm_time_min: int = 1440  # time limit of each job, minutes
    slurm_gpus: int = 0  # GPUs per job
    slurm_cpus: int = 2  # CPUs per job
    slurm_setup: list[str] = field(default_factory=list)  # shell lines run before each job, e.g. "module load cuda"
    slurm_sbatch: list[str] = field(default_factory=list)  # more sbatch parameters as key=value, e.g. mail-type=FAIL
    slurm_job_name: str | None = None  # default: the scripts' names
    slurm_log_dir: str | None = None  # submitit's folder (job scripts, stdout/stderr); default {runs_dir}/slurm
    slurm_executor: Literal["slurm", "local", "debug"] = "slurm"  # local/debug: submitit on this machine (tests)
    python: str = sys.executable  # interpreter for the runs


@dataclass
class Run:
    label: str  # names the log file: {script stem}[-{variant}]__{env slug}__{seed}
    cmd: list[str]  # the command, with `--resume DIR` when an earlier run of it left a checkpoint
    cwd: str  # the parent of runs_dir, so that the script's `runs/` is runs_dir
    log: str
    runs_dir: str
    script: str  # the script's file name, as its config.json records it
    config: dict  # every Args field of the resolved command, as config.json holds them
    resumable: list[str]  # the fields that may differ from an earlier run that this run continues
    threads: int = 1

    def key(self):
        """What identifies the run: the script and every field that may not change on --resume."""
        return identity(self.script, self.config, self.resumable)


def identity(script, config, resumable):
    return {"script": script, **{k: v for k, v in config.items() if k not in resumable}}


def lock_path(run):
    digest = hashlib.sha1(json.dumps(run.key(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(run.runs_dir) / ".live" / f"{digest}.json"


# ---------------------------------------------------------------- resolving a requested run with the script's parser


def load_script(path):
    """Import a training script by path (the scripts run nothing at import); one error line if it is not one."""
    if path.suffix != ".py":
        raise SystemExit(f"error: --scripts {path}: not a training script (a .py file with Args, check_args, check_env)")
    spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # tyro reads Args' source for help
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SystemExit(f"error: cannot import {path}: {type(e).__name__}: {str(e).partition(chr(10))[0]}")
    missing = [n for n in ("Args", "check_args", "check_env", "RESUMABLE") if not hasattr(module, n)]
    if missing:
        raise SystemExit(f"error: --scripts {path}: not a training script (no {', '.join(missing)})")
    return module


def parse_script_flags(module, tokens, what):
    """tyro.cli(module.Args, args=tokens), with tyro's boxed message turned into one error line."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return tyro.cli(module.Args, args=tokens)
    except SystemExit:
        lines = [ln.strip(" │╭╮╰╯|") for ln in out.getvalue().splitlines()]  # a box: title, rule, message, ...
        lines = [ln for ln in lines if ln.strip("-─") and not ln.startswith(("For full helptext", "usage:"))]
        message = lines[1] if len(lines) > 1 else (lines[0] if lines else "cannot parse the flags")
        if "Perhaps you meant:" in lines:
            message += f" (perhaps you meant {lines[lines.index('Perhaps you meant:') + 1].split()[0]})"
        raise SystemExit(f"error: {what}: {message}")


def resolve(module, args, env_id, seed, what, checked_envs):
    """The parsed flags with this env id and seed, checked as the script checks them, as config.json holds them."""
    args = replace(args, env_id=env_id, seed=seed)
    args = getattr(module, "resolve_args", lambda a: a)(args)  # per-env defaults filled in (dipo_baseline.py)
    try:
        module.check_args(args)
        if env_id not in checked_envs:  # once per env id: making an env takes a while, and the scripts share check_env
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module.check_env(env_id)
            checked_envs.add(env_id)
    except SystemExit as e:
        raise SystemExit(f"{e.code} ({what})" if str(e.code).startswith("error:") else f"error: {what}: {e.code}")
    return json.loads(json.dumps(vars(args), default=str))  # tuples as lists, None as null


# ---------------------------------------------------------------- the runs already under runs_dir


def read_eval_steps(run_dir):
    """The steps of every EVAL_TAG point in the run's event files. The files are TFRecords (an 8-byte length, its
    4-byte CRC, the data, its 4-byte CRC); only the records that contain the tag are parsed, as the losses logged every
    100 steps are most of a file. The CRCs are not checked: a record cut short by a writer stops the reading."""
    from tensorboard.compat.proto.event_pb2 import Event

    steps, tag = set(), EVAL_TAG.encode()
    for f in sorted(run_dir.glob("events.out.tfevents*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            record, pos = data[pos + 12 : pos + 12 + length], pos + 16 + length
            if pos > len(data):
                break
            if tag in record:
                event = Event.FromString(record)
                if any(v.tag == EVAL_TAG for v in event.summary.value):
                    steps.add(event.step)
    return sorted(steps)


def index_runs(runs_dir):
    """Every run folder under runs_dir that has a config.json, oldest first: dict(dir, config, eval_steps,
    checkpoint). Reading event files is the slow part, so their eval steps are kept in runs_dir/.index.json, keyed
    by the event files' names, sizes and modification times, and read again only when those change."""
    runs_dir = Path(runs_dir).resolve()
    cache_file = runs_dir / ".index.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    records, fresh, unconfigured = [], {}, 0
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        events = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.glob("events.out.tfevents*"))]
        try:
            config = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            unconfigured += bool(events)
            continue
        entry = cache.get(d.name)
        if entry is None or entry["events"] != events:
            entry = {"events": events, "eval_steps": read_eval_steps(d)}
        fresh[d.name] = entry
        records.append(dict(dir=d, config=config, eval_steps=set(entry["eval_steps"]),
                            checkpoint=(d / "checkpoint.pt").exists(), mtime=(d / "config.json").stat().st_mtime))  # fmt: skip
    if fresh != cache:
        with contextlib.suppress(OSError):  # a read-only runs folder: no cache, the same answer
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache_file)
    if unconfigured:
        print(f"note: {unconfigured} run folders under {runs_dir} have no config.json and are not matched", flush=True)
    return sorted(records, key=lambda r: r["mtime"])


def same_run(record, run):
    """The record is a run of this configuration: the same script and every field equal, except those allowed to
    change on --resume; an --eval-only run is never a training run."""
    cfg = record["config"]
    if cfg.get("script") != run.script or not isinstance(cfg.get("args"), dict):
        return False
    if bool(cfg["args"].get("eval_only")) != bool(run.config.get("eval_only")):
        return False
    return identity(run.script, cfg["args"], run.resumable) == run.key()


def previous_run(records, run):
    """("done", dir) for a matching run with an evaluation at the requested total_timesteps, else ("resume", dir) for
    the newest matching one that left a checkpoint before that step (a finished shorter run is extended), else None."""
    total = run.config["total_timesteps"]
    found = [r for r in records if same_run(r, run)]
    done = [r for r in found if total in r["eval_steps"]]
    if done:
        return "done", done[-1]["dir"]
    resumable = [r for r in found if r["checkpoint"] and max(r["eval_steps"], default=0) < total]
    return ("resume", resumable[-1]["dir"]) if resumable else None


def with_resume(cmd, run_dir):
    """Continue from the checkpoint the scripts leave in run_dir."""
    return [*cmd, "--resume", str(run_dir)]


# ---------------------------------------------------------------- live runs: a lock file per configuration


def write_lock(run, pid=None, slurm_job=None):
    path = lock_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = dict(label=run.label, host=socket.gethostname(), pid=pid, time=time.time(), slurm_job=slurm_job)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def live(run):
    """A description of the process or Slurm job that holds this run's configuration, or None."""
    try:
        info = json.loads(lock_path(run).read_text())
    except (OSError, ValueError):
        return None
    if info.get("slurm_job") and shutil.which("squeue"):  # queued, running or requeued: squeue lists it
        out = subprocess.run(["squeue", "-h", "-j", str(info["slurm_job"]), "-o", "%T"], capture_output=True, text=True)
        state = out.stdout.strip().splitlines()
        return f"Slurm job {info['slurm_job']} {state[0].lower()}" if out.returncode == 0 and state else None
    if info.get("host") == socket.gethostname() and info.get("pid"):
        try:
            os.kill(info["pid"], 0)  # alive, stopped (SIGSTOP) included
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"pid {info['pid']}"
    age = time.time() - info.get("time", 0)
    if age < STALE_S:  # on another host (or no squeue here): trusted while its heartbeat is recent
        who = f"Slurm job {info['slurm_job']}" if info.get("slurm_job") else f"pid {info.get('pid')} on {info.get('host')}"
        return f"{who}, lock {age:.0f} s old"
    return None


# ---------------------------------------------------------------- the sweep


def plan(args):
    """Every run of the sweep, in order, each resolved to its full configuration and checked by its script."""
    runs_dir = Path(args.runs_dir).resolve()
    if runs_dir.name != "runs":
        raise SystemExit(f"error: --runs-dir must be a folder named runs (the scripts write ./runs), not {args.runs_dir}")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise SystemExit(f"error: --runs-dir {args.runs_dir} is not a folder")
    if not args.env_ids:
        raise SystemExit("error: give at least one --env-ids")
    if args.workers < 1:
        raise SystemExit("error: --workers must be >= 1")
    try:
        extra = shlex.split(args.extra)
        variants = [shlex.split(v) for v in args.variants]
        entries = [shlex.split(entry) for entry in args.scripts]  # "qvpo_baseline.py --shared-batch": its own flags
    except ValueError as e:
        raise SystemExit(f"error: --scripts/--variants/--extra: {e}")
    threads = args.threads or (args.slurm_cpus if args.slurm else 1)
    runs, modules, checked_envs = [], {}, set()
    for entry, (script, *script_args) in zip(args.scripts, entries):
        path = Path(script) if Path(script).is_file() else ROOT / script
        if not path.is_file():
            raise SystemExit(f"error: script not found: {script}")
        path = path.resolve()
        module = modules[path] = modules.get(path) or load_script(path)
        for variant, variant_args in zip(args.variants, variants):
            tokens = [*script_args, *variant_args, *extra]
            what = shlex.join([path.name, *tokens])
            for flag in ("--env-id", "--seed", "--resume"):
                if any(t == flag or t.startswith(flag + "=") for t in tokens):
                    raise SystemExit(f"error: {what}: {flag} is set by the launcher (--env-ids, --seeds; resuming is "
                                     "automatic)")  # fmt: skip
            parsed = parse_script_flags(module, tokens, what)  # once per flag set: env id and seed are set below
            tag = re.sub(r"[^A-Za-z0-9.]+", "_", " ".join([*script_args, variant])).strip("_")
            if len(tag) > 60:  # a long flag set: keep the file name short, a hash keeps it apart
                tag = f"{tag[:50]}_{hashlib.sha1(tag.encode()).hexdigest()[:8]}"
            for env_id in args.env_ids:
                env_slug = env_id.replace("/", "_").replace(":", "_")
                for seed in args.seeds:
                    config = resolve(module, parsed, env_id, seed, what, checked_envs)
                    label = f"{path.stem}{'-' + tag if tag else ''}__{env_slug}__{seed}"
                    cmd = [args.python, str(path), "--env-id", env_id, "--seed", str(seed), *tokens]
                    runs.append(Run(label, cmd, str(runs_dir.parent), str(runs_dir / "logs" / f"{label}.log"),
                                    str(runs_dir), path.name, config, sorted(module.RESUMABLE), threads))  # fmt: skip
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"error: the same run twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    keys = [json.dumps(run.key(), sort_keys=True) for run in runs]
    if len(set(keys)) < len(keys):
        twins = sorted({run.label for run, k in zip(runs, keys) if keys.count(k) > 1})
        raise SystemExit(f"error: runs with the same configuration under different flags: {twins}")
    return runs


def execute(run, on_start=None):
    """Run the command, appending its output to the run's log; returns the exit status. A thread reaps the child, so
    that a signal handler in this (main) thread can wait for it too; the lock file is refreshed meanwhile."""
    env = dict(os.environ, OMP_NUM_THREADS=str(run.threads), MKL_NUM_THREADS=str(run.threads), PYTHONUNBUFFERED="1")
    Path(run.log).parent.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    with open(run.log, "a") as log:
        log.write(f"$ {shlex.join(run.cmd)}\n")
        log.flush()
        # a session of its own: a Ctrl-C at the terminal reaches the launcher only, which then stops runs cleanly
        proc = subprocess.Popen(run.cmd, cwd=run.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        reaper = threading.Thread(target=proc.wait, daemon=True)
        reaper.start()
        write_lock(run, proc.pid, job)
        if on_start:
            on_start(proc, reaper)
        while reaper.is_alive():
            reaper.join(HEARTBEAT_S)
            if reaper.is_alive():
                write_lock(run, proc.pid, job)
    if proc.returncode != PREEMPTED:  # a preempted run keeps its lock: requeued, its job is still live
        lock_path(run).unlink(missing_ok=True)
    return proc.returncode


def last_lines(log, pattern="", n=4096):
    """The lines of the log's last n bytes that contain pattern."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            return [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if pattern in ln and ln.strip()]
    except OSError:
        return []


def last_error(log):
    """The script's `error: ...` line, else the last line of a traceback, else the last line of the log."""
    lines = last_lines(log)
    errors = [ln for ln in lines if ln.startswith("error:") or re.match(r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or [""])[-1]


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
        lines = [f"{self.status[r.label]:<10} {r.label}  {(last_lines(r.log, 'step=') or [''])[-1]}"[: cols - 1]
                 for r in runs]  # fmt: skip
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
        if holder := live(run):  # started meanwhile by another launcher
            status[run.label] = f"running ({holder})"
            return
        status[run.label] = "running"
        rc = execute(run, on_start=lambda p, _: procs.__setitem__(run.label, p))
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


def find_checkpoint(run):
    """The newest run folder of this configuration holding a checkpoint.pt (config.json files only: fast)."""
    found = []
    for d in Path(run.runs_dir).iterdir():
        try:
            record = dict(config=json.loads((d / "config.json").read_text()))
        except (OSError, ValueError):
            continue
        if same_run(record, run) and (d / "checkpoint.pt").exists():
            found.append(((d / "checkpoint.pt").stat().st_mtime, d))
    return max(found)[1] if found else None


class RunJob(submitit.helpers.Checkpointable):
    """One run as a submitit job (picklable). On Slurm's warning signal before the time limit or preemption, submitit
    calls `checkpoint`, which lets the script write its checkpoint and resubmits the command with --resume."""

    def __init__(self):
        self.child = None  # (Popen, the thread that reaps it)

    def __call__(self, run):
        rc = execute(run, on_start=lambda p, reaper: setattr(self, "child", (p, reaper)))
        if rc == PREEMPTED and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # The script was stopped and checkpointed, but this job heard nothing (preemption sends SIGTERM, which
            # submitit ignores). Take submitit's own preemption path: signalling ourselves makes it call
            # `checkpoint` below, save the resubmission and `scontrol requeue` the job, then exit.
            os.kill(os.getpid(), getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))
        return rc

    def checkpoint(self, run):
        # Submitit calls this in the main thread, from a signal handler. Pass the signal on to the script (if Slurm
        # did too, a second one only repeats the stop request) and wait for the reaper thread: the script writes its
        # checkpoint and exits 75. Then resubmit with --resume.
        if self.child is not None and self.child[1].is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child[0].pid, signal.SIGUSR1)
            self.child[1].join(CHECKPOINT_WAIT_S)
        if "--resume" not in run.cmd and (run_dir := find_checkpoint(run)) is not None:
            run = replace(run, cmd=with_resume(run.cmd, run_dir))
        return submitit.helpers.DelayedSubmission(RunJob(), run)


def run_submitit(args, todo, status):
    if args.slurm_executor == "slurm" and not shutil.which("sbatch"):
        raise SystemExit("error: --slurm: sbatch not found (Slurm is not installed here); run without --slurm")
    folder = args.slurm_log_dir or str(Path(args.runs_dir) / "slurm")
    executor = submitit.AutoExecutor(folder=folder, cluster=args.slurm_executor)
    name = args.slurm_job_name or "-".join(dict.fromkeys(Path(shlex.split(s)[0]).stem for s in args.scripts))
    params = dict(timeout_min=args.slurm_time_min, cpus_per_task=args.slurm_cpus, name=name)
    if args.slurm_executor == "slurm":
        try:
            extra = dict(kv.split("=", 1) for kv in args.slurm_sbatch)
        except ValueError:
            raise SystemExit(f"error: --slurm-sbatch takes key=value pairs, got {args.slurm_sbatch}")
        params.update(gpus_per_node=args.slurm_gpus, slurm_partition=args.slurm_partition, slurm_account=args.slurm_account,
                      slurm_qos=args.slurm_qos, slurm_constraint=args.slurm_constraint, slurm_setup=args.slurm_setup,
                      slurm_additional_parameters=extra, slurm_array_parallelism=args.workers)  # fmt: skip
        if args.slurm_mem_gb:
            params["mem_gb"] = args.slurm_mem_gb
    else:
        params["local_setup"] = args.slurm_setup
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    if args.slurm_executor == "slurm":
        jobs = executor.map_array(RunJob(), todo)
        for run, job in zip(todo, jobs):
            write_lock(run, slurm_job=job.job_id)  # a pending job has no run folder yet: a resubmission skips it
            print(f"job {job.job_id}: {run.label}  log: {run.log}")
        print(f"submitit files (job scripts, stdout/stderr): {folder}", flush=True)
        return False  # submitted: do not wait
    pending, running = list(todo), []  # on this machine: at most --workers jobs at once
    while pending or running:
        while pending and len(running) < args.workers:
            run = pending.pop(0)
            job = executor.submit(RunJob(), run)
            print(f"job {job.job_id}: {run.label}  log: {run.log}", flush=True)
            running.append((run, job))
        time.sleep(0.2)
        for run, job in [x for x in running if x[1].done()]:
            running.remove((run, job))
            try:
                rc = job.result()
            except Exception as e:  # the job itself broke (not the script)
                rc = f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
            status[run.label] = "done" if rc == 0 else f"FAILED rc={rc}"
            print(f"{status[run.label]:<10} {run.label}", flush=True)
    print(f"submitit files (job scripts, stdout/stderr): {folder}", flush=True)
    return True


def main(args):
    runs = plan(args)
    records = index_runs(args.runs_dir) if Path(args.runs_dir).is_dir() else []
    status, todo = {}, []
    for run in runs:
        found = previous_run(records, run)
        if found and found[0] == "done":
            status[run.label] = f"skipped (done: {os.path.relpath(found[1])})"
        elif holder := live(run):
            status[run.label] = f"running ({holder})"
        else:
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
    kinds = ("done", "skipped", "running", "FAILED", "stopped", "cancelled")
    counts = {k: sum(status[r.label].startswith(k) for r in runs) for k in kinds}
    print(f"{len(runs)} runs: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v))
    for run in failed:
        print(f"{status[run.label]}: {run.label}  log: {run.log}\n    {last_error(run.log)}")
    return 0 if counts["done"] + counts["skipped"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
