"""A stand-in for a training script, for tests/test_run.py: the same interface as the real scripts (Args through
tyro, check_args, check_env, RESUMABLE, config.json, eval points, --resume, SIGTERM/SIGUSR1 -> checkpoint and exit
75), in a fraction of the time. Written into the test's folder under a name of the test's choosing."""

FAKE = r'''
import dataclasses, json, os, signal, sys, time

import tyro


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    seed: int = 1
    env_id: str = "toy/Env-v0"
    total_timesteps: int = 100
    eval_every: int = 50
    lr: float = 0.001
    capture_video: bool = False
    eval_only: str | None = None
    fail: bool = False
    step_time: float = 0.0  # seconds per step
    resume: str | None = None


RESUMABLE = {"total_timesteps", "eval_every", "capture_video", "eval_only", "step_time", "resume"}


def check_args(args):
    if args.total_timesteps < 1:
        raise SystemExit("error: --total-timesteps must be >= 1")


def check_env(env_id):
    if not env_id.startswith("toy/"):
        raise SystemExit(f"error: unknown env id {env_id!r}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    check_env(args.env_id)
    from torch.utils.tensorboard import SummaryWriter

    if args.resume:
        run_dir = args.resume
        with open(f"{run_dir}/checkpoint.pt") as f:
            start = json.load(f)["step"]
    else:
        slug = args.env_id.replace("/", "_").replace(":", "_")
        run_dir, start = f"runs/{slug}__{args.exp_name}__{args.seed}__{time.time_ns()}", 0
    os.makedirs(run_dir, exist_ok=True)
    config = dict(script=os.path.basename(__file__), args=vars(args), resumable=sorted(RESUMABLE), commit=None,
                  dirty=None)
    with open(f"{run_dir}/config.json.tmp", "w") as f:
        json.dump(config, f)
    os.replace(f"{run_dir}/config.json.tmp", f"{run_dir}/config.json")
    stop = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    writer = SummaryWriter(run_dir)
    print(f"threads={os.environ.get('OMP_NUM_THREADS')} start={start} pid={os.getpid()} t={time.time():.3f}", flush=True)

    def save(step):
        with open(f"{run_dir}/checkpoint.pt.tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(f"{run_dir}/checkpoint.pt.tmp", f"{run_dir}/checkpoint.pt")

    for step in range(start, args.total_timesteps):
        time.sleep(args.step_time)
        if args.fail and step + 1 == args.total_timesteps:
            save(step)
            print("error: asked to fail", flush=True)
            sys.exit(3)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.total_timesteps:
            writer.add_scalar("eval/episodic_return", 10.0 * args.seed, step + 1)
            writer.flush()
            print(f"eval step={step + 1} return={10.0 * args.seed:.2f}", flush=True)
        if step % 50 == 0:
            print(f"step={step} SPS=100", flush=True)
        if stop:
            save(step + 1)
            print(f"preempted at step {step + 1}", flush=True)
            writer.close()
            sys.exit(75)
    save(args.total_timesteps)
    writer.close()
    print(f"finished t={time.time():.3f}", flush=True)
'''
