"""Time one training update (and one action) of each script at its default hyperparameters on random replay data,
optionally beside the official RFM JAX update in the same process.

    python benchmark/update_speed.py                                   # every script, cheetah-run / HalfCheetah sizes
    python benchmark/update_speed.py --obs-dim 11 --act-dim 3          # Hopper sizes
    python benchmark/update_speed.py --scripts dipo_baseline --env-id HalfCheetah-v5   # DIPO at a per-env table row
    python benchmark/update_speed.py --cpu --modes eager,compile --scripts rfm_flow \
        --official /path/to/ReverseFlowMatching                        # ratios to the official update, one thread

Prints one line per script and mode: `<script>: <median> ms/update (...)` (`<script> --compile: ...` for the compiled
mode), the median of --repeats updates after --warmup, and the median batch-1 action latency. The variants are timed
interleaved (one update of each in turn), so that a machine's drift hits them alike. With --official PATH (a checkout
of the official RFM code, its JAX/Flax/Optax importable) its jitted update at its default config is timed in the same
rounds, every line gets its ratio to it, and the machine's float32 matmul rate and the floor it implies for the
rfm_flow update (its FLOPs over that rate) are printed. Runs on the GPU when one is present (--cpu forces the CPU).
"""

import copy
import functools
import importlib
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def random_batch(n, obs_dim, act_dim, device):
    return (
        torch.randn(n, obs_dim, device=device),
        torch.rand(n, act_dim, device=device) * 2 - 1,
        torch.rand(n, 1, device=device),
        torch.randn(n, obs_dim, device=device),
        torch.zeros(n, 1, device=device),
    )


def timed_interleaved(fns, warmup, repeats, device):
    """fns {name: fn}: warm-up calls of each, then `repeats` rounds calling each once in turn; median ms per name."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def script_sampler(m, fn, compile, device):
    """The script's sampler (or RFM posterior) as its __main__ runs it: compiled by the script's own set-up or eager,
    and on CPU 32 states at a time where the script has that wrapper."""
    fn = m.compiled(fn, device) if compile else fn
    return m.in_state_chunks(fn, 32) if device.type == "cpu" and hasattr(m, "in_state_chunks") else fn


def setup_rfm(a, device, script, compile):
    """rfm_flow / rfm_diffusion: the same update around a different policy network and sampler, compiled as the
    script's --compile does it (the sampler and the posterior estimator)."""
    m = importlib.import_module(script)
    posterior = m.posterior_mean if script == "rfm_flow" else m.posterior_noise
    posterior = script_sampler(m, posterior, compile, device)
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
    sample = script_sampler(m, m.sample_particles, compile, device)
    obs1 = torch.randn(1, a.obs_dim, device=device)

    @torch.no_grad()
    def action():
        m.act(actor, qf, obs1, args, sample)

    return {"update": lambda: m.update(batch, actor, qf, qf_target, actor_opt, q_opt, args, sample, posterior),
            "action": action}


def setup_qvpo_baseline(a, device, compile):
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
    sample = script_sampler(m, m.ddpm_sample, compile, device)
    obs1 = torch.randn(1, a.obs_dim, device=device)

    def one_update():
        m.update(agent, batch, policy_obs, args.entropy_alpha, args, sample)

    return {
        "update": one_update,
        "behaviour action": torch.no_grad()(lambda: m.act(actor, qf, obs1, args, sample)),
        "eval action": torch.no_grad()(lambda: m.act_eval(actor, qf, obs1, args, sample)),
    }


def setup_dipo_baseline(a, device, compile):
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
    sample = script_sampler(m, m.ddpm_sample, compile, device)
    step = iter(range(10**9))
    obs1 = torch.randn(1, a.obs_dim, device=device)
    agent = SimpleNamespace(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target, actor_optimizer=actor_opt,
                            q_optimizer=q_opt)

    def one_update():
        m.update(agent, batch, memory, next(step), args, sample)

    return {
        "update": one_update,
        "behaviour action": torch.no_grad()(lambda: m.act(actor, obs1, sample)),
        "eval action": torch.no_grad()(lambda: m.act(actor, obs1, sample, noise=False)),
        "note": f"{args.action_gradient_steps} action-gradient steps",
    }


def setup_sac_reference(a, device, compile):
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

    return {"update": one_update}


def setup_official(path, obs_dim, act_dim, seed=0):
    """The official RFM agent at its default config (configs/default.yaml overlaid with configs/rfm.yaml), imported
    from the checkout at `path` at run time; returns its jitted update on a fixed random batch (blocking on the
    result). Its update keeps its own replay-free signature: states, actions, rewards, masks, next_states."""
    import jax
    import numpy as np
    import yaml

    sys.path.insert(0, os.path.abspath(path))
    from src.agent.rfm import RFM

    cfg = {}
    for name in ["default.yaml", "rfm.yaml"]:
        with open(os.path.join(path, "configs", name)) as f:
            for section, values in (yaml.safe_load(f) or {}).items():
                cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    actor, critic, rfm, trainer = cfg["actor"], cfg["critic"], cfg["rfm"], cfg["trainer"]
    agent = RFM(
        sample_dim=act_dim, state_dim=obs_dim,
        critic_config=dict(state_dim=obs_dim, action_dim=act_dim, hidden_size=critic["hidden_size"],
                           hidden_layers=critic["hidden_layers"], num_q=critic["num_q"], discount=critic["discount"],
                           tau=critic["tau"], target_update_period=critic["target_update_period"], lr=critic["lr"],
                           max_grad_norm=critic["max_grad_norm"], seed=seed),
        actor_hidden_size=actor["hidden_size"], actor_hidden_layers=actor["hidden_layers"],
        actor_emb_size=actor["emb_size"], actor_lr=actor["lr"], actor_max_grad_norm=actor["max_grad_norm"],
        num_estimator_mc_samples=rfm["num_estimator_mc_samples"], num_integration_steps=rfm["num_integration_steps"],
        batch_size=trainer["batch_size"], cv_weight=rfm["cv_weight"], cv_weight_autotune=rfm["cv_weight_autotune"],
        cv_ridge=rfm["cv_ridge"], cv_clip=rfm["cv_clip"], rfm_on_policy=rfm["rfm_on_policy"],
        init_temperature=rfm["init_temperature"], final_temperature=rfm["final_temperature"],
        temperature_steps=rfm["temperature_steps"], num_particles_training=rfm["num_particles_training"],
        num_particles_data=rfm["num_particles_data"], num_particles_eval=rfm["num_particles_eval"],
        sampler_method=rfm["sampler_method"], t_min=rfm["t_min"], seed=seed,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    n = trainer["batch_size"]
    states, next_states = rng.standard_normal((2, n, obs_dim), dtype=np.float32)
    actions = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
    rewards, masks = rng.uniform(0, 1, n).astype(np.float32), np.ones(n, np.float32)
    return {"update": lambda: jax.block_until_ready(agent.update(states, actions, rewards, masks, next_states))}


def matmul_ms(device, repeats=20):
    """Median time of one 16384x256 @ 256x256 float32 matmul: the shape of the sampler's hidden layers."""
    x, w = torch.randn(16384, 256, device=device), torch.randn(256, 256, device=device)
    return timed_interleaved({"mm": lambda: x @ w}, 3, repeats, device)["mm"]


def update_flops(setup):
    """FLOPs of one eager update (matmuls and the other ops torch's counter knows), from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        setup["update"]()
    return counter.get_total_flops()


SETUPS = {
    "rfm_flow": functools.partial(setup_rfm, script="rfm_flow"),
    "rfm_diffusion": functools.partial(setup_rfm, script="rfm_diffusion"),
    "qvpo_baseline": setup_qvpo_baseline,
    "dipo_baseline": setup_dipo_baseline,
    "sac_reference": setup_sac_reference,
}


@dataclass
class Args:
    scripts: str = ",".join(SETUPS)
    """comma-separated subset of rfm_flow, rfm_diffusion, qvpo_baseline, dipo_baseline, sac_reference"""
    obs_dim: int = 17
    """observation size of the random replay data (Hopper 11, HalfCheetah and cheetah-run 17)"""
    act_dim: int = 6
    """action size (Hopper 3, HalfCheetah and cheetah-run 6)"""
    env_id: str | None = None
    """DIPO only: time at this env's per-env table row (e.g. HalfCheetah-v5)"""
    warmup: int = 3
    """untimed updates of each variant first"""
    repeats: int = 10
    """timed rounds; the median is printed"""
    modes: str = "eager"
    """comma-separated subset of eager, compile (each script's sampler compiled as its --compile does)"""
    compile: bool = False
    """shorthand for --modes compile"""
    official: str | None = None
    """path of an official RFM checkout: time its jitted update at its default config in the same rounds"""
    threads: int = 0
    """intra-op threads for torch and XLA (0: torch's default); the paired comparison uses 1"""
    cpu: bool = False
    """time on the CPU even when a GPU is present"""


if __name__ == "__main__":
    a = tyro.cli(Args)
    names, modes = a.scripts.split(","), ["compile"] if a.compile else a.modes.split(",")
    if unknown := set(names) - set(SETUPS):
        raise SystemExit(f"error: unknown --scripts {sorted(unknown)}; choose from {','.join(SETUPS)}")
    if unknown := set(modes) - {"eager", "compile"}:
        raise SystemExit(f"error: unknown --modes {sorted(unknown)}; choose from eager,compile")
    if a.official and not os.path.isfile(os.path.join(a.official, "src", "agent", "rfm.py")):
        raise SystemExit(f"error: --official {a.official} is not a checkout of the official RFM code (no src/agent/rfm.py)")
    if a.threads:  # before JAX starts: XLA reads its flags once
        torch.set_num_threads(a.threads)
        if a.threads == 1:
            os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} obs_dim={a.obs_dim} act_dim={a.act_dim}")
    setups = {}
    for name in names:
        for mode in modes:
            label = name if mode == "eager" else f"{name} --compile"
            setups[label] = SETUPS[name](a, device, compile=mode == "compile")
    if a.official:
        try:
            setups["official RFM (JAX)"] = setup_official(a.official, a.obs_dim, a.act_dim)
        except ImportError as e:
            raise SystemExit(f"error: cannot import the official RFM code from {a.official}: {e}")
    # the SAC yardstick is ~50x faster than the rest: 10 of its updates count as one call of it
    calls = {k: (lambda f=s["update"]: [f() for _ in range(10)]) if k.startswith("sac_reference") else s["update"]
             for k, s in setups.items()}  # fmt: skip
    ms = timed_interleaved(calls, a.warmup, a.repeats, device)
    ms = {k: v / 10 if k.startswith("sac_reference") else v for k, v in ms.items()}
    actions = {(k, what): fn for k, s in setups.items() for what, fn in s.items() if what not in ("update", "note")}
    action_ms = timed_interleaved(actions, a.warmup, a.repeats * 4, device)
    official = ms.get("official RFM (JAX)")
    for label, s in setups.items():
        extras = [f"{action_ms[label, what]:.2f} ms/{what}" for what in s if what not in ("update", "note")]
        extras += [s["note"]] if "note" in s else []
        ratio = f", {ms[label] / official:.2f}x official" if official and label != "official RFM (JAX)" else ""
        print(f"{label}: {ms[label]:.1f} ms/update{ratio}" + (f" ({', '.join(extras)})" if extras else ""), flush=True)
    if official:
        mm = matmul_ms(device)
        rate = 2 * 16384 * 256 * 256 / mm / 1e6  # GFLOP/s
        print(f"matmul 16384x256x256 float32: {mm:.2f} ms = {rate:.1f} GFLOP/s")
        if "rfm_flow" in names:
            flops = update_flops(SETUPS["rfm_flow"](a, device, compile=False))
            print(f"rfm_flow update: {flops / 1e9:.1f} GFLOP, floor at that rate {flops / rate / 1e6:.0f} ms "
                  f"({flops / rate / 1e6 / official:.2f}x official)")  # fmt: skip
