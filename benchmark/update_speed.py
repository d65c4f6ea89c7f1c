"""Time one training update (and one action) of each script at its default hyperparameters on random replay data.

    python benchmark/update_speed.py                                   # every script, cheetah-run / HalfCheetah sizes
    python benchmark/update_speed.py --obs-dim 11 --act-dim 3          # Hopper sizes
    python benchmark/update_speed.py --scripts dipo_baseline --env-id HalfCheetah-v5   # DIPO at a per-env table row

Prints one line per script: `<script>: <median> ms/update (...)`, the median of --repeats updates after --warmup,
and the median batch-1 action latency. Runs on the GPU when one is present (--cpu forces the CPU).
"""

import copy
import importlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import tyro

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


def bench_rfm(a, device, script):
    """rfm_flow / rfm_diffusion: the same update around a different policy network and sampler."""
    m = importlib.import_module(script)
    args = m.Args()
    if script == "rfm_flow":
        actor = m.VelocityField(a.obs_dim, a.act_dim).to(device)
    else:
        actor = m.NoiseNet(a.obs_dim, a.act_dim, args.diffusion_steps).to(device)
    qf = m.TwinQ(a.obs_dim, a.act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.q_lr)
    batch = m.Batch(*random_batch(args.batch_size, a.obs_dim, a.act_dim, device))
    batch = batch._replace(rewards=batch.rewards[:, 0], dones=batch.dones[:, 0])
    sample = torch.compile(m.sample_particles) if a.compile else m.sample_particles
    ms = timed(lambda: m.update(batch, actor, qf, qf_target, actor_opt, q_opt, args, sample), a.warmup, a.repeats, device)
    obs1 = torch.randn(1, a.obs_dim, device=device)
    with torch.no_grad():
        act_ms = timed(lambda: m.act(actor, qf, obs1, args, sample), a.warmup, a.repeats * 4, device)
    return f"{script}: {ms:.1f} ms/update ({act_ms:.2f} ms/action)"


def bench_qvpo_baseline(a, device):
    m = importlib.import_module("qvpo_baseline")
    args = m.Args()
    actor = m.Denoiser(a.obs_dim, a.act_dim, args.diffusion_steps).to(device)
    actor_target = copy.deepcopy(actor)
    qf = m.TwinQ(a.obs_dim, a.act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, eps=1e-5)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.q_lr, eps=1e-5)
    batch = m.Batch(*random_batch(args.batch_size, a.obs_dim, a.act_dim, device))
    batch = batch._replace(rewards=batch.rewards[:, 0], dones=batch.dones[:, 0])
    policy_obs = random_batch(args.batch_size, a.obs_dim, a.act_dim, device)[0]
    agent = SimpleNamespace(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target, actor_optimizer=actor_opt,
                            q_optimizer=q_opt)
    sample = torch.compile(m.ddpm_sample) if a.compile else m.ddpm_sample

    def one_update():
        m.update(agent, batch, policy_obs, args.entropy_alpha, args, sample)

    ms = timed(one_update, a.warmup, a.repeats, device)
    obs1 = torch.randn(1, a.obs_dim, device=device)
    with torch.no_grad():
        act_ms = timed(lambda: m.act(actor, qf, obs1, args, sample), a.warmup, a.repeats * 4, device)
        eval_ms = timed(lambda: m.act_eval(actor, qf, obs1, args, sample), a.warmup, a.repeats * 4, device)
    return f"qvpo_baseline: {ms:.1f} ms/update ({act_ms:.2f} ms/behaviour action, {eval_ms:.2f} ms/eval action)"


def bench_dipo_baseline(a, device):
    m = importlib.import_module("dipo_baseline")
    args = m.resolve_args(m.Args(**({"env_id": a.env_id} if a.env_id else {})))
    actor = m.Denoiser(a.obs_dim, a.act_dim, args.diffusion_steps).to(device)
    actor_target = copy.deepcopy(actor)
    qf = m.TwinQ(a.obs_dim, a.act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, eps=1e-5)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.q_lr, eps=1e-5)
    memory = m.DiffusionMemory(2560, a.obs_dim, a.act_dim, device)
    obs, actions, rewards, next_obs, dones = [x.cpu().numpy() for x in random_batch(2560, a.obs_dim, a.act_dim, device)]
    memory.add(obs, next_obs, actions, rewards[:, 0], dones[:, 0])
    batch = m.Batch(*random_batch(args.batch_size, a.obs_dim, a.act_dim, device))
    batch = batch._replace(rewards=batch.rewards[:, 0], dones=batch.dones[:, 0])
    sample = torch.compile(m.ddpm_sample) if a.compile else m.ddpm_sample
    step = iter(range(10**9))
    agent = SimpleNamespace(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target, actor_optimizer=actor_opt,
                            q_optimizer=q_opt)

    def one_update():
        m.update(agent, batch, memory, next(step), args, sample)

    ms = timed(one_update, a.warmup, a.repeats, device)
    obs1 = torch.randn(1, a.obs_dim, device=device)
    with torch.no_grad():
        act_ms = timed(lambda: m.act(actor, obs1, sample), a.warmup, a.repeats * 4, device)
        eval_ms = timed(lambda: m.act(actor, obs1, sample, noise=False), a.warmup, a.repeats * 4, device)
    row = f", {args.action_gradient_steps} action-gradient steps"
    return f"dipo_baseline: {ms:.1f} ms/update ({act_ms:.2f} ms/behaviour action, {eval_ms:.2f} ms/eval action{row})"


def bench_sac_reference(a, device):
    """A CleanRL-style SAC update (twin 2x256 ReLU critics, 2x256 tanh-Gaussian actor, autotuned alpha, batch 256):
    the machine-speed reference whose time on the official-timing machines is known (10.8 ms at 17/6)."""
    nn, F = torch.nn, torch.nn.functional

    def mlp(n_in, n_out):
        return nn.Sequential(nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, n_out)).to(device)

    qs, actor = [mlp(a.obs_dim + a.act_dim, 1) for _ in range(2)], mlp(a.obs_dim, 2 * a.act_dim)
    targets = [copy.deepcopy(q) for q in qs]
    log_alpha = torch.zeros(1, requires_grad=True, device=device)
    q_opt = torch.optim.Adam([p for q in qs for p in q.parameters()], lr=1e-3)
    pi_opt, a_opt = torch.optim.Adam(actor.parameters(), lr=3e-4), torch.optim.Adam([log_alpha], lr=1e-3)
    obs, actions, rewards, next_obs, dones = random_batch(256, a.obs_dim, a.act_dim, device)

    def pi(o):
        mean, log_std = actor(o).chunk(2, -1)
        std = torch.tanh(log_std).add(1).mul(3.5).sub(5).exp()
        u = mean + std * torch.randn_like(mean)
        logp = (-0.5 * ((u - mean) / std) ** 2 - std.log() - 0.919).sum(-1) - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum(-1)
        return torch.tanh(u), logp

    def one_update():
        alpha = log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = pi(next_obs)
            x2 = torch.cat([next_obs, a2], -1)
            y = rewards.flatten() + (1 - dones.flatten()) * 0.99 * (torch.min(*[t(x2).flatten() for t in targets]) - alpha * logp2)
        x = torch.cat([obs, actions], -1)
        q_loss = sum(F.mse_loss(q(x).flatten(), y) for q in qs)
        q_opt.zero_grad()
        q_loss.backward()
        q_opt.step()
        a_new, logp = pi(obs)
        x = torch.cat([obs, a_new], -1)
        pi_loss = (alpha * logp - torch.min(*[q(x).flatten() for q in qs])).mean()
        pi_opt.zero_grad()
        pi_loss.backward()
        pi_opt.step()
        alpha_loss = (-log_alpha.exp() * (logp.detach() - a.act_dim)).mean()
        a_opt.zero_grad()
        alpha_loss.backward()
        a_opt.step()
        with torch.no_grad():
            for t, q in zip(targets, qs):
                for tp, p in zip(t.parameters(), q.parameters()):
                    tp.lerp_(p, 0.005)

    ms = timed(one_update, a.warmup * 10, a.repeats * 10, device)
    return f"sac_reference: {ms:.1f} ms/update"


BENCHES = {
    "rfm_flow": lambda a, device: bench_rfm(a, device, "rfm_flow"),
    "rfm_diffusion": lambda a, device: bench_rfm(a, device, "rfm_diffusion"),
    "qvpo_baseline": bench_qvpo_baseline,
    "dipo_baseline": bench_dipo_baseline,
    "sac_reference": bench_sac_reference,
}

@dataclass
class Args:
    scripts: str = ",".join(BENCHES)
    """comma-separated subset of rfm_flow, rfm_diffusion, qvpo_baseline, dipo_baseline, sac_reference"""
    obs_dim: int = 17
    """observation size of the random replay data (Hopper 11, HalfCheetah and cheetah-run 17)"""
    act_dim: int = 6
    """action size (Hopper 3, HalfCheetah and cheetah-run 6)"""
    env_id: str | None = None
    """DIPO only: time at this env's per-env table row (e.g. HalfCheetah-v5)"""
    warmup: int = 3
    """untimed updates first"""
    repeats: int = 10
    """timed updates; the median is printed"""
    compile: bool = False
    """torch.compile each script's sampler, as its --compile does"""
    cpu: bool = False
    """time on the CPU even when a GPU is present"""


if __name__ == "__main__":
    a = tyro.cli(Args)
    unknown = set(a.scripts.split(",")) - set(BENCHES)
    if unknown:
        raise SystemExit(f"error: unknown --scripts {sorted(unknown)}; choose from {','.join(BENCHES)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} obs_dim={a.obs_dim} act_dim={a.act_dim}")
    for name in a.scripts.split(","):
        print(BENCHES[name](a, device), flush=True)
