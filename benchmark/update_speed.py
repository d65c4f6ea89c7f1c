"""Time one training update of each script at its default hyperparameters on random replay data.

    python benchmark/update_speed.py                       # every script, DMC cheetah-run sizes (obs 17, act 6)
    python benchmark/update_speed.py --scripts rfm_flow --obs-dim 11 --act-dim 3

Prints one line per script: `<script>: <median> ms/update` (median of --repeats updates after --warmup).
"""

import argparse
import copy
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_batch(n, obs_dim, act_dim, device):
    return (
        torch.randn(n, obs_dim, device=device),
        torch.rand(n, act_dim, device=device) * 2 - 1,
        torch.rand(n, 1, device=device),
        torch.randn(n, obs_dim, device=device),
        torch.zeros(n, 1, device=device),
    )


def timed(fn, warmup, repeats, device):
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_rfm_flow(obs_dim, act_dim, device, warmup, repeats):
    m = importlib.import_module("rfm_flow")
    args = m.Args()
    actor = m.VelocityField(obs_dim, act_dim).to(device)
    qf = m.TwinQ(obs_dim, act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.q_lr)
    batch = random_batch(args.batch_size, obs_dim, act_dim, device)
    if COMPILE:
        m.integrate_flow = torch.compile(m.integrate_flow)
    ms = timed(lambda: m.update(batch, actor, qf, qf_target, actor_opt, q_opt, args), warmup, repeats, device)
    obs1 = torch.randn(1, obs_dim, device=device)
    with torch.no_grad():
        act_ms = timed(lambda: m.act(actor, qf, obs1, args), warmup, repeats * 4, device)
    return f"rfm_flow: {ms:.1f} ms/update ({act_ms:.2f} ms/action)"


BENCHES = {"rfm_flow": bench_rfm_flow}
COMPILE = False

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--scripts", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--obs-dim", type=int, default=17)
    p.add_argument("--act-dim", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cpu", action="store_true", help="time on the CPU even when a GPU is present")
    a = p.parse_args()
    COMPILE = a.compile
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} obs_dim={a.obs_dim} act_dim={a.act_dim}")
    for name in a.scripts.split(","):
        print(BENCHES[name](a.obs_dim, a.act_dim, device, a.warmup, a.repeats), flush=True)
