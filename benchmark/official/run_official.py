"""Run the official RFM code (azizanlab/ReverseFlowMatching, JAX) with the configuration that matches a set of
rfm_flow.py flags, and convert its metrics.jsonl into a TensorBoard run folder that benchmark/plot.py overlays with
this repository's runs. Set-up, commands and measured figures: benchmark/official/README.md.

    python benchmark/official/run_official.py --checkout /path/to/ReverseFlowMatching \\
        --env-id dm_control/cartpole-swingup-v0 --seed 1 --total-timesteps 20000 --learning-starts 2000 \\
        --batch-size 128 --eval-every 2000 --eval-episodes 5 --num-particles 8 --num-posterior-samples 32
    python benchmark/official/run_official.py --convert-only logs/cartpole-swingup/rfm/RFM_..._s1 --seed 1 ...

The run folder is `{runs_dir}/{env}__rfm_official-jax__{seed}__{time}`, with the official evaluation returns as
`eval/episodic_return` at the official steps, and a config.json (script, args, resumable, commit, dirty) in which
`args` holds the flags given here and the official overrides they became.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

RUN_NAME = "rfm_official-jax"  # the algorithm field of the run folder's name: the label plot.py shows


@dataclass
class Args:
    checkout: str = os.environ.get("RFM_OFFICIAL", "")  # the official checkout (default: $RFM_OFFICIAL)
    python: str = sys.executable  # interpreter for the official main.py (e.g. a venv with its pinned packages)
    env_id: str = "dm_control/cheetah-run-v0"  # our env id, dm_control/<domain>-<task>-v0
    seed: int = 1  # seed
    total_timesteps: int = 250_000  # -> trainer.max_steps
    learning_starts: int = 10_000  # -> trainer.start_training
    batch_size: int = 256  # -> trainer.batch_size
    buffer_size: int = 250_000  # -> trainer.replay_buffer_size
    eval_every: int = 10_000  # -> trainer.eval_interval
    eval_episodes: int = 25  # -> trainer.num_eval_envs
    num_particles: int = 32  # -> rfm.num_particles_training, _data and _eval
    num_posterior_samples: int = 100  # -> rfm.num_estimator_mc_samples
    runs_dir: str = "runs"  # where the converted run folder goes
    log_dir: str = "runs/official_logs"  # -> logger.log_dir (the official run's own folder goes below it)
    convert_only: str | None = None  # convert this official run folder (holding metrics.jsonl); run nothing
    dry_run: bool = False  # print the official command and exit


# where the code and the files are, not what is computed: runs that differ only here are one configuration
LOCATIONS = {"checkout", "python", "runs_dir", "log_dir", "convert_only"}


def overrides(args):
    """The official `--override key=value` list matched to our flags. The rest of the two configurations already agree
    at their defaults with configs/rfm.yaml (grad-norm clip 10 for actor and critic), which is passed as --config:
    temperature 0.02, 10 Euler steps, t_min 0.01, plug-in lambda with ridge 1e-4 and clip 2, lr 3e-4 / 1e-3,
    gamma 0.99, tau 0.005, two critics of 256 x 2."""
    m = re.fullmatch(r"dm_control/([a-z_]+)-([a-z_]+)-v0", args.env_id)
    if not m:
        raise SystemExit(f"error: --env-id must be dm_control/<domain>-<task>-v0, got {args.env_id!r}")
    n = args.num_particles
    return {
        "algo": "rfm", "seed": args.seed, "env.name": f"{m[1]}-{m[2]}", "trainer.max_steps": args.total_timesteps,
        "trainer.start_training": args.learning_starts, "trainer.batch_size": args.batch_size,
        "trainer.replay_buffer_size": args.buffer_size, "trainer.eval_interval": args.eval_every,
        "trainer.num_eval_envs": args.eval_episodes, "rfm.num_particles_training": n, "rfm.num_particles_data": n,
        "rfm.num_particles_eval": n, "rfm.num_estimator_mc_samples": args.num_posterior_samples,
        "logger.log_dir": str(Path(args.log_dir).resolve()), "logger.wandb_dir": str(Path(args.log_dir).resolve()),
        "logger.debug": True, "logger.save_agent": False,
    }  # fmt: skip


def git(checkout, *cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=checkout, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_official(args, over):
    """Run main.py on one thread; returns the new run folder (the one holding metrics.jsonl) and the wall time."""
    main = Path(args.checkout) / "main.py"
    if not main.is_file():
        raise SystemExit(f"error: no main.py in --checkout {args.checkout!r} (or set RFM_OFFICIAL)")
    cmd = [args.python, str(main), "--config", str(Path(args.checkout) / "configs" / "rfm.yaml")]
    cmd += [f"--override={k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in over.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")  # fmt: skip
    print("OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu XLA_FLAGS=... " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return None, 0.0
    before = set(Path(args.log_dir).rglob("metrics.jsonl"))
    start = time.time()
    proc = subprocess.run(cmd, cwd=args.checkout, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: the official main.py exited with {proc.returncode}")
    new = sorted(set(Path(args.log_dir).rglob("metrics.jsonl")) - before, key=lambda p: p.stat().st_mtime)
    if not new:
        raise SystemExit(f"error: the official run wrote no metrics.jsonl under {args.log_dir}")
    return new[-1].parent, wall


def read_official_config(official_dir):
    """The official run's resolved configuration (its config.yaml), or None if it cannot be read."""
    try:
        import yaml

        return yaml.safe_load((Path(official_dir) / "config.yaml").read_text())
    except (ImportError, OSError):
        return None


def convert(args, over, official_dir, wall):
    """metrics.jsonl -> {runs_dir}/{env}__rfm_official-jax__{seed}__{time}/ (event file + config.json)."""
    from torch.utils.tensorboard import SummaryWriter

    path = Path(official_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no metrics.jsonl in {official_dir}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    official_config = read_official_config(official_dir)
    if not records:
        raise SystemExit(f"error: {path} holds no evaluation")
    env_name = args.env_id.replace("/", "_").replace(":", "_")
    run_dir = Path(args.runs_dir) / f"{env_name}__{RUN_NAME}__{args.seed}__{int(time.time())}"
    run_dir.mkdir(parents=True)
    writer = SummaryWriter(str(run_dir))
    for r in records:
        writer.add_scalar("eval/episodic_return", r["episode_reward"], r["step"])
    if wall:
        writer.add_scalar("charts/wall_time_s", wall, records[-1]["step"])
    writer.close()
    config = {
        "script": "ReverseFlowMatching/main.py",
        "launcher": "benchmark/official/run_official.py",  # args are its flags
        "args": {k: v for k, v in asdict(args).items() if k != "dry_run"},
        "official": {"overrides": over, "run_dir": str(Path(official_dir).resolve()), "wall_time_s": round(wall, 1),
                     "config": official_config},
        "resumable": sorted(LOCATIONS),
        "commit": git(args.checkout, "rev-parse", "HEAD") if args.checkout else None,
        "dirty": None if not args.checkout or git(args.checkout, "rev-parse", "HEAD") is None
        else bool(git(args.checkout, "status", "--porcelain", "--untracked-files=no")),
    }  # fmt: skip
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, run_dir / "config.json")
    last = records[-1]
    print(f"{run_dir}: {len(records)} evaluations, last step={last['step']} return={last['episode_reward']:.2f}"
          + (f", wall {wall:.0f} s" if wall else ""))  # fmt: skip
    return run_dir


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.convert_only:  # the env and seed are those of the converted run
        cfg = read_official_config(args.convert_only) or {}
        if "env" in cfg and "seed" in cfg:
            args.env_id, args.seed = f"dm_control/{cfg['env']['name']}-v0", int(cfg["seed"])
        convert(args, overrides(args), args.convert_only, 0.0)
    else:
        if not args.checkout:
            raise SystemExit("error: give --checkout (or set RFM_OFFICIAL): the official ReverseFlowMatching checkout")
        over = overrides(args)
        official_dir, wall = run_official(args, over)
        if official_dir is not None:
            convert(args, over, official_dir, wall)
