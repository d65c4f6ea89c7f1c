# QVPO (Ding et al., NeurIPS 2024, arXiv 2405.16173) as wadx2019/qvpo runs it (--weighted --aug): docs/baselines.md §0-1
import copy
import json
import logging
import math
import os
import random
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch._dynamo  # noqa: F401  (loads triton before any MuJoCo GL context: the reverse order segfaults with EGL)
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter

# not the user's concern: GLFW's display probe on headless machines, a deprecation in dm_control's own model files
warnings.filterwarnings("ignore", message=".*DISPLAY environment variable is missing")
logging.getLogger("absl").addFilter(lambda record: "settotalmass" not in record.getMessage())


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment
    torch_deterministic: bool = True  # if toggled, `torch.backends.cudnn.deterministic=True`
    cuda: bool = True  # if toggled, cuda will be used when available
    track: bool = False  # if toggled, this experiment will be tracked with Weights and Biases
    wandb_project_name: str = "rfm"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project
    capture_video: bool = False  # whether to capture videos of the agent performances (check out `videos` folder)
    save_model: bool = False  # whether to save the model into the `runs/{run_name}` folder, then reload and evaluate it
    compile: bool = False  # if toggled, the DDPM sampler is compiled with torch.compile
    checkpoint_every: int = 0  # steps between runs/{run_name}/checkpoint.pt writes (0: --eval-every); also at the end
    resume: str | None = None  # continue the run of this checkpoint.pt (or run dir holding it), given the same flags
    eval_only: str | None = None  # no training: evaluate this checkpoint.pt or --save-model file once, in a new run dir

    # Algorithm specific arguments
    env_id: str = "dm_control/cheetah-run-v0"  # gymnasium id, `dm_control/<domain>-<task>-v0`, or `module:Env-v0`
    total_timesteps: int = 1_000_000  # total timesteps of the experiments
    buffer_size: int = 1_000_000  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    tau: float = 0.005  # target smoothing coefficient (critic and actor, every step)
    batch_size: int = 256  # the batch size of sample from the replay memory (critic and policy batch)
    learning_starts: int = 10_000  # timestep to start learning (uniform random actions before)
    eval_every: int = 10_000  # evaluate the policy every this many env steps (and at the end)
    eval_episodes: int = 10  # evaluation episodes, one per vectorised eval env seeded 0..eval_episodes-1
    policy_lr: float = 1e-4  # the learning rate of the diffusion policy optimizer (Adam)
    q_lr: float = 3e-4  # the learning rate of the Q network optimizer (Adam)
    max_grad_norm: float = 2.0  # global gradient-norm clip of both the actor and the critic (inf: no clipping)
    diffusion_steps: int = 20  # DDPM steps T of the cosine schedule (docs/baselines.md §1.1)
    num_action_samples: int = 64  # actions N_d per policy state, the best is kept (docs/baselines.md §1.2)
    num_entropy_samples: int = 10  # uniform actions N_e per policy state, entropy term (docs/baselines.md §1.2)
    behavior_samples: int = 4  # K_b per state, behaviour action = argmax min-Q (docs/baselines.md §1.3)
    target_samples: int = 4  # K_t per next state, target actor, argmax target min-Q (docs/baselines.md §1.2)
    eval_samples: int = 32  # per state, evaluation action = argmax min-Q (docs/baselines.md §1.3)
    entropy_alpha: float = 0.02  # initial entropy weight, decaying to the floor; 0 drops it (docs/baselines.md §1.2)
    entropy_alpha_min: float = 0.002  # entropy weight floor, capped at --entropy-alpha (so 0 alone gives 0)
    timeout_as_terminal: bool = False  # time-limit ends are terminal, as officially (docs/baselines.md §0)
    hidden_layers: int = 3  # hidden layers (256 wide) of the actor and of each critic member
    time_dim: int = 32  # size of the actor's step embedding
    adam_eps: float = 1e-5  # Adam's epsilon, both optimizers
    shared_batch: bool = False  # improve the policy on the critic batch's states instead of on an independent batch


def make_env(env_id, seed, idx, capture_video, run_name):
    def thunk():
        if env_id.startswith("dm_control/"):
            import shimmy  # registers dm_control/<domain>-<task>-v0

            gym.register_envs(shimmy)
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        else:
            env = gym.make(env_id)
        if isinstance(env.observation_space, gym.spaces.Dict):  # DeepMind Control via shimmy
            env = gym.wrappers.FlattenObservation(env)
        env = RecordResetRNG(gym.wrappers.RecordEpisodeStatistics(env))
        env.action_space.seed(seed)
        return env

    return thunk


Batch = NamedTuple("Batch", [(k, torch.Tensor) for k in ("obs", "actions", "rewards", "next_obs", "dones")])


class ReplayBuffer:
    """Ring buffer of transitions (s, a in [-1, 1], r, s', done), one row each, on the training device. Done: the
    episode ended in a terminal state (a time limit is not one)."""

    def __init__(self, size, obs_dim, act_dim, device):
        self.size, self.ptr, self.full = size, 0, False
        self.fields = [obs_dim, act_dim, 1, obs_dim, 1]
        self.data = torch.zeros(size, sum(self.fields), device=device)

    def add(self, obs, next_obs, actions, rewards, dones):
        """numpy arrays, one row per env: one host-to-device copy, then row writes."""
        rows = np.concatenate([obs, actions, rewards[:, None], next_obs, dones[:, None]], 1, dtype=np.float32)
        for row in torch.as_tensor(rows, device=self.data.device):
            self.data[self.ptr] = row
            self.ptr = (self.ptr + 1) % self.size
            self.full = self.full or self.ptr == 0

    def sample(self, batch_size):  # uniform, with replacement
        idx = torch.randint(0, self.size if self.full else self.ptr, (batch_size,), device=self.data.device)
        obs, actions, rewards, next_obs, dones = self.data[idx].split(self.fields, dim=1)
        return Batch(obs, actions, rewards[:, 0], next_obs, dones[:, 0])

    def state_dict(self):  # the filled rows, copied (a saved view would save the whole buffer)
        return {"rows": self.data[: self.size if self.full else self.ptr].clone(), "ptr": self.ptr, "full": self.full}

    def load_state_dict(self, state):
        self.data[: len(state["rows"])], self.ptr, self.full = state["rows"], state["ptr"], state["full"]


def init_linear(module):
    """Each Linear: weights N(0, 1/(4 fan_in)), untruncated, bias 0, the official init's effect (docs/baselines.md §0)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=1.0 / (2.0 * math.sqrt(layer.in_features)))
            nn.init.zeros_(layer.bias)


class TwinQ(nn.Module):
    """Two Q-networks [s, a] -> 256 (x layers, Mish) -> 1; min over members everywhere (docs/baselines.md §0)."""

    def __init__(self, obs_dim, act_dim, hidden=256, layers=3, members=2):
        super().__init__()
        widths = [obs_dim + act_dim] + [hidden] * layers
        self.members = nn.ModuleList(
            nn.Sequential(*[m for n_in, n_out in zip(widths, widths[1:]) for m in (nn.Linear(n_in, n_out), nn.Mish())],
                          nn.Linear(hidden, 1))  # fmt: skip
            for _ in range(members)
        )
        init_linear(self)

    def forward(self, obs, act):
        """(M, obs_dim), (M, act_dim) -> (members, M)"""
        x = torch.cat([obs, act], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.members])

    def min_q(self, obs, act):
        """min_j Q_j(s, a), (M,)"""
        return self(obs, act).min(0).values


def sinusoidal_embedding(x, dim=128, max_period=1000.0):
    """[sin(x f_j), cos(x f_j)] with f_j = exp(-ln(max_period) j / (dim/2 - 1)) (docs/baselines.md §0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=x.dtype) / (half - 1))
    arg = x[..., None] * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def cosine_schedule(steps, s=0.008):
    """Cosine DDPM schedule, float64, i = 0..steps-1 (docs/baselines.md §0): x_i = sqrt_ac_i a + sqrt_1m_ac_i eps,
    x0_hat = recip_i x_i - recipm1_i eps, x_{i-1} = c1_i x0_hat + c2_i x_i + sigma_i z (log sigma^2 >= log 1e-20)."""
    u = torch.arange(steps + 1, dtype=torch.float64)
    f = torch.cos((u / steps + s) / (1 + s) * math.pi / 2).square()
    beta = (1 - f[1:] / f[:-1]).clamp(0.0, 0.999)
    ac = torch.cumprod(1 - beta, 0)
    prev = torch.cat([ac.new_ones(1), ac[:-1]])  # alphabar_{i-1}, with alphabar_{-1} = 1
    return {
        "sqrt_ac": ac.sqrt(), "sqrt_1m_ac": (1 - ac).sqrt(), "recip": (1 / ac).sqrt(), "recipm1": (1 / ac - 1).sqrt(),
        "c1": beta * prev.sqrt() / (1 - ac), "c2": (1 - prev) * (1 - beta).sqrt() / (1 - ac),
        "sigma": (0.5 * (beta * (1 - prev) / (1 - ac)).clamp(min=1e-20).log()).exp(),
    }  # fmt: skip


class Denoiser(nn.Module):
    """eps_theta(x_i, i, s): [x_i, t_emb(i), s] -> 256 (x layers, Mish) -> D, t_emb(i) = sinusoid_{t_dim} of the integer
    step -> Linear(t_dim, 256) -> Mish -> Linear(256, t_dim); with its T-step cosine schedule (docs/baselines.md §0). The
    first layer is W_x x + condition(s, i), the sampler computes the condition once per state and step, not per sample."""

    def __init__(self, obs_dim, act_dim, diffusion_steps, hidden=256, t_dim=32, layers=3):
        super().__init__()
        self.obs_dim, self.act_dim, self.t_dim, self.steps = obs_dim, act_dim, t_dim, diffusion_steps
        self.time_mlp = nn.Sequential(nn.Linear(t_dim, hidden), nn.Mish(), nn.Linear(hidden, t_dim))
        self.inp = nn.Linear(act_dim + t_dim + obs_dim, hidden)
        self.mid = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.out = nn.Linear(hidden, act_dim)
        init_linear(self)
        for name, value in cosine_schedule(diffusion_steps).items():
            self.register_buffer(name, value.float(), persistent=False)

    def condition(self, obs, i):
        """The sample-independent part of the first layer, W_t t_emb(i) + W_s s + b; i integer steps, broadcast."""
        _, w_t, w_s = self.inp.weight.split([self.act_dim, self.t_dim, self.obs_dim], dim=1)
        t_emb = self.time_mlp(sinusoidal_embedding(i.float(), self.t_dim, max_period=1e4))
        return F.linear(t_emb, w_t) + F.linear(obs, w_s, self.inp.bias)

    def head(self, x, cond):
        """The rest of the network, given cond = condition(obs, i) (broadcast over samples)."""
        h = F.mish(F.linear(x, self.inp.weight[:, : self.act_dim]) + cond)
        for layer in self.mid:
            h = F.mish(layer(h))
        return self.out(h)

    def forward(self, x, i, obs):
        """(B, D), (B,) integer steps, (B, obs_dim) -> predicted noise (B, D)"""
        return self.head(x, self.condition(obs, i))


def ddpm_sample(actor, obs, x, z=None):
    """Reverse DDPM chain for i = T-1..0 (docs/baselines.md §0): x0_hat = clamp(recip_i x - recipm1_i eps_theta, -1, 1),
    x <- c1_i x0_hat + c2_i x + 1[i > 0] sigma_i z_i, and a final clamp to [-1, 1]. obs (B, obs_dim), x (B, N, D) the
    initial N(0, I) draw, z (T, B, N, D) the per-step noise (noise_ratio 1, z[0] unused) or None (noise_ratio 0)."""
    cond = actor.condition(obs[:, None], torch.arange(actor.steps, device=x.device)[:, None, None])  # (T, B, 1, H)
    for i in reversed(range(actor.steps)):
        eps = actor.head(x, cond[i])
        x0_hat = (actor.recip[i] * x - actor.recipm1[i] * eps).clamp(-1.0, 1.0)
        x = actor.c1[i] * x0_hat + actor.c2[i] * x
        if i > 0 and z is not None:
            x = x + actor.sigma[i] * z[i]
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def best_of_k(actor, qf, obs, k, sample=ddpm_sample):
    """k samples per state from actor (noise 1), scored by qf.min_q; returns the argmax action (B, D) in [-1, 1] and
    all the scores (B, k) (docs/baselines.md §1.2-1.3). `sample` is ddpm_sample or its compiled version."""
    B, D = obs.shape[0], actor.act_dim
    x = torch.randn(B, k, D, device=obs.device)
    a = sample(actor, obs, x, torch.randn(actor.steps, B, k, D, device=obs.device))
    q = qf.min_q(obs[:, None].expand(-1, k, -1).reshape(B * k, -1), a.reshape(B * k, D)).view(B, k)
    return a[torch.arange(B, device=obs.device), q.argmax(1)], q


def qadv_weight(q):
    """qadv: w(s) = max(max_n q - mean_n q, 0), raw Q units, not normalised (docs/baselines.md §1.2). q (B, N) -> (B,)"""
    return (q.max(1).values - q.mean(1)).clamp(min=0.0)


def entropy_coef(step, total_timesteps, alpha, alpha_min):
    """alpha_ent = min(alpha, max(alpha_min, alpha (1 - step / total_timesteps))), the official schedule: a linear
    decay to the floor alpha_min, never above alpha (so 0 when alpha is 0, and constant alpha if alpha < alpha_min)."""
    return min(alpha, max(alpha_min, alpha * (1.0 - step / total_timesteps)))


def policy_rows(obs, best, weight, num_uniform, entropy_alpha):
    """Rows (obs, actions, weights) of the policy loss (docs/baselines.md §1.2): each state's best action with weight
    w(s), then num_uniform U(-1, 1)^D actions per state with weight entropy_alpha w(s). Officially the uniform rows
    exist only while entropy_alpha > 0: at 0 they are left out, not kept with weight 0 to dilute the loss mean."""
    if not entropy_alpha > 0:
        return obs, best, weight
    uniform = torch.rand(best.shape[0] * num_uniform, best.shape[1], device=best.device) * 2 - 1
    repeat = lambda x: x.repeat_interleave(num_uniform, 0)  # noqa: E731
    return torch.cat([obs, repeat(obs)]), torch.cat([best, uniform]), torch.cat([weight, entropy_alpha * repeat(weight)])


def weighted_eps_loss(actor, obs, actions, weights):
    """Weighted eps-MSE (docs/baselines.md §0): per row i ~ U{0..T-1}, eps ~ N(0, I), x_i = sqrt_ac_i a + sqrt_1m_ac_i
    eps; the mean over all rows and dims of w (eps_theta(x_i, i, s) - eps)^2. obs (N, obs), actions (N, D), weights (N,)."""
    i = torch.randint(0, actor.steps, (actions.shape[0],), device=actions.device)
    eps = torch.randn_like(actions)
    x = actor.sqrt_ac[i, None] * actions + actor.sqrt_1m_ac[i, None] * eps
    return (weights[:, None] * (actor(x, i, obs) - eps).square()).mean()


def soft_update(target, online, tau):
    with torch.no_grad():
        for tp, p in zip(target.parameters(), online.parameters()):
            tp.lerp_(p, tau)


def update(agent, batch, policy_obs, entropy_alpha, args, sample=ddpm_sample):
    """One QVPO iteration (docs/baselines.md §1.2): critic on batch, then the policy on the states of a second,
    independent batch; agent holds the networks and optimizers, `sample` is ddpm_sample or its compiled version.
    Returns device tensors of diagnostics."""
    actor, actor_target, qf, qf_target = agent.actor, agent.actor_target, agent.qf, agent.qf_target
    obs, actions, rewards, next_obs, dones = batch
    # critic target: best of K_t target-actor samples under the target min-Q
    with torch.no_grad():
        _, next_q = best_of_k(actor_target, qf_target, next_obs, args.target_samples, sample)
        target_q = rewards + (1 - dones) * args.gamma * next_q.max(1).values  # no entropy term

    # critic: the gradient is that of MSE(Q1, y) + MSE(Q2, y); qf_loss logs their mean as CleanRL does
    qs = qf(obs, actions)
    qf1_loss, qf2_loss = F.mse_loss(qs[0], target_q), F.mse_loss(qs[1], target_q)
    qf_loss = (qf1_loss + qf2_loss) / 2
    agent.q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()  # the sum: each member gets the gradient of its own loss, unscaled
    nn.utils.clip_grad_norm_(qf.parameters(), args.max_grad_norm)
    agent.q_optimizer.step()

    # policy: best of N_d current-actor samples under the just-updated critic, qadv-weighted, plus the entropy rows
    best, q = best_of_k(actor, qf, policy_obs, args.num_action_samples, sample)
    weight = qadv_weight(q)
    rows = policy_rows(policy_obs, best, weight, args.num_entropy_samples, entropy_alpha)
    actor_loss = weighted_eps_loss(actor, *rows)
    agent.actor_optimizer.zero_grad()
    actor_loss.backward()
    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    agent.actor_optimizer.step()

    # update the target networks
    soft_update(qf_target, qf, args.tau)
    soft_update(actor_target, actor, args.tau)
    return {
        "losses/qf1_values": qs[0].mean(), "losses/qf2_values": qs[1].mean(),
        "losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss, "losses/qf_loss": qf_loss,
        "losses/actor_loss": actor_loss, "qvpo/weight_mean": weight.mean(),
    }  # fmt: skip


def act(actor, qf, obs, args, sample=ddpm_sample):
    """Behaviour action: best of K_b samples under the current min-Q (docs/baselines.md §1.3). obs (E, obs) -> (E, D)."""
    return best_of_k(actor, qf, obs, args.behavior_samples, sample)[0]


def act_eval(actor, qf, obs, args, sample=ddpm_sample):
    """Evaluation action: best of 32 samples (noise 1) under the current min-Q, as officially (docs/baselines.md §1.3)."""
    return best_of_k(actor, qf, obs, args.eval_samples, sample)[0]


def evaluate(policy, envs, action_scale, action_bias, device):
    """One episode on each eval env (seeded 0..n-1); returns the mean undiscounted return."""
    obs, _ = envs.reset(seed=list(range(envs.num_envs)))
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not done.all():
        with torch.no_grad():
            actions = policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        env_actions = (actions * action_scale + action_bias).astype(envs.single_action_space.dtype)
        obs, rewards, terminations, truncations, _ = envs.step(env_actions)
        returns += np.where(done, 0.0, rewards)
        done |= terminations | truncations
    return float(returns.mean())


# ======================================================================================================================
# Plumbing, not part of the algorithm: --compile set-up, input checks, run config, checkpoints, resume, preemption
# ======================================================================================================================
def compiled(fn, device):
    """fn under torch.compile, as --compile runs it (docs/speed.md): static shapes, matmuls autotuned (inductor's own
    GEMM kernels may fuse bias and activation), random draws from torch's generator as in eager; on CUDA with CUDA
    graphs, as the step is launch-bound there; on CPU with tanh emitted as 2 / (1 + exp(-2x)) - 1, as inductor's CPU
    tanh costs about three exps."""
    torch._dynamo.config.trace_autograd_ops = True  # torch.autograd.grad traced into the graph, not a graph break
    device_options = {"triton.cudagraphs": True} if device.type == "cuda" else {"cpp.use_decompose_tanh": True}
    return torch.compile(fn, dynamic=False, options={"max_autotune": True, "fallback_random": True, **device_options})


def in_state_chunks(sample, states):
    """The DDPM chain run on `states` states at a time (CPU only, docs/speed.md): the same function of each state's
    inputs, its activations small enough to stay in cache. z (T, B, N, D) is split along its states."""

    def chunked(actor, obs, x, z=None):
        zs = [None] * len(obs.split(states)) if z is None else z.split(states, dim=1)
        return torch.cat([sample(actor, o, x_, z_) for o, x_, z_ in zip(obs.split(states), x.split(states), zs)])

    return chunked


# input checks: one `error:` line and exit 1 before training, never a silent wrong run
def check_args(args):
    at_least = {1: ["total_timesteps", "buffer_size", "batch_size", "eval_every", "eval_episodes", "diffusion_steps",
                    "hidden_layers"],
                0: ["learning_starts", "checkpoint_every", "num_entropy_samples", "entropy_alpha",
                    "entropy_alpha_min"]}  # fmt: skip
    problems = [f"--{k.replace('_', '-')} must be >= {bound}" for bound, keys in at_least.items() for k in keys
                if not getattr(args, k) >= bound]  # fmt: skip
    problems += [msg for bad, msg in [
        (args.eval_only is not None and args.resume is not None, "--eval-only PATH and --resume exclude each other"),
        (not 0.0 <= args.gamma <= 1.0, "--gamma must be in [0, 1]"),
        (not 0.0 < args.tau <= 1.0, "--tau must be in (0, 1]"),
        (args.policy_lr <= 0 or args.q_lr <= 0, "--policy-lr and --q-lr must be > 0"),
        (args.max_grad_norm <= 0, "--max-grad-norm must be > 0"),
        (args.time_dim < 4 or args.time_dim % 2, "--time-dim must be even and >= 4"),
        (not args.adam_eps > 0, "--adam-eps must be > 0"),
        (min(args.num_action_samples, args.behavior_samples, args.target_samples, args.eval_samples) < 1,
         "--num-action-samples, --behavior-samples, --target-samples and --eval-samples must be >= 1"),
        ] if bad]  # fmt: skip
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def check_env(env_id):
    try:
        env = make_env(env_id, 0, 0, False, "")()
    except (gym.error.Error, ImportError) as e:
        raise SystemExit(f"error: unknown env id {env_id!r}: {e}")
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Box) or not np.isfinite([act_space.low, act_space.high]).all():
        raise SystemExit(f"error: {env_id} actions are {act_space}; a Box with finite bounds is required")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise SystemExit(f"error: {env_id} observations are {obs_space}; a flat Box (or a Dict of them) is required")


# the flags that may change on --resume and --eval-only: they leave the algorithm as it was
RESUMABLE = {"total_timesteps", "eval_every", "eval_episodes", "checkpoint_every", "resume", "eval_only", "save_model",
             "capture_video", "track", "wandb_project_name", "wandb_entity", "cuda", "compile", "torch_deterministic"}
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: SIGTERM or SIGUSR1 stopped the run after a checkpoint


def write_config(run_dir, args):  # atomically; commit and dirty are null outside a git checkout
    git = "git rev-parse HEAD && git status --porcelain --untracked-files=no"
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(git, shell=True, cwd=here, capture_output=True, text=True)
    commit, *changed = out.stdout.splitlines() if out.returncode == 0 else [None]
    config = dict(script=os.path.basename(__file__), args=vars(args),
                  resumable=sorted(RESUMABLE), commit=commit,
                  dirty=bool(changed) if commit else None)
    os.makedirs(run_dir, exist_ok=True)
    with open(f"{run_dir}/config.json.tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(f"{run_dir}/config.json.tmp", f"{run_dir}/config.json")


def rng_state(rng):  # of a numpy Generator, or of a RandomState (np.random, dm_control's envs), as plain data
    state = rng.bit_generator.state if isinstance(rng, np.random.Generator) else rng.get_state(legacy=False)
    return {**state, "state": {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in state["state"].items()}}


def set_rng_state(rng, state):
    if isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state
    else:
        rng.set_state(state)


class RecordResetRNG(gym.Wrapper):  # the env's random state and seed at its last reset, for --resume to replay
    def reset(self, *, seed=None, options=None):
        self.last_reset = rng_state(self.np_random), seed
        return super().reset(seed=seed, options=options)


def save_checkpoint(path, stateful, envs, **loop_state):
    """Atomically (a crash mid-write keeps the last file): state dicts, random streams, loop state."""
    rng = {"python": random.getstate(), "numpy": rng_state(np.random), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
           "action_space": rng_state(envs.single_action_space.np_random),
           "env_resets": [env.last_reset for env in envs.envs]}  # fmt: skip
    torch.save({**{k: v.state_dict() for k, v in stateful.items()}, "rng": rng, **loop_state}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, args):
    """The checkpoint at path (or path/checkpoint.pt) or a --save-model file, and its path; else one `error:` line."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data, never code
        changed = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} -> {v}" for k, v in vars(args).items()
                   if k not in RESUMABLE and ckpt["args"].get(k) != v]  # fmt: skip
    except Exception as e:  # missing, truncated, not a checkpoint
        raise SystemExit(f"error: cannot load {path}: {type(e).__name__}: {str(e).partition(chr(10))[0]}")
    if changed:  # so is another script's checkpoint: its flags differ, --exp-name at least
        raise SystemExit(f"error: {path} was made with other flags or by another script: {', '.join(changed)} (only "
                         "--total-timesteps and the evaluation, checkpoint, logging and device flags may change)")
    if args.resume and not ckpt.get("global_step", math.inf) <= args.total_timesteps:  # a --save-model file has none
        raise SystemExit(f"error: --resume needs a checkpoint.pt from at most --total-timesteps {args.total_timesteps}")
    return ckpt, path


def restore_checkpoint(ckpt, stateful, envs, device):
    """Load all, replay the env's last reset (an unfinished episode starts over); -> obs, next step, last return."""
    for k, v in stateful.items():
        v.load_state_dict(ckpt[k])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    set_rng_state(np.random, rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    set_rng_state(envs.single_action_space.np_random, rng["action_space"])
    for env, (state, _) in zip(envs.envs, rng["env_resets"]):
        set_rng_state(env.np_random, state)
    return envs.reset(seed=[seed for _, seed in rng["env_resets"]])[0], ckpt["global_step"], ckpt["last_return"]


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    if args.resume or args.eval_only:
        ckpt, ckpt_path = load_checkpoint(args.resume or args.eval_only, args)
    check_env(args.env_id)
    run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = f"runs/eval__{run_name}" if args.eval_only else f"runs/{run_name}"
    if args.resume:  # the stopped run's folder, whose name is the run's name
        run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    run_name = os.path.basename(run_dir)
    write_config(run_dir, args)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True, id=run_name, resume="allow")  # fmt: skip
    writer = SummaryWriter(run_dir, purge_step=ckpt["global_step"] + 1 if args.resume else None)  # hides later steps
    hyperparameters = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    if not args.resume:  # logged once per run dir
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # CUDA only; the official code's GPUs run TF32 by default too

    # env setup: one training env; evaluation envs seeded 0..eval_episodes-1. SAME_STEP autoreset: the step that ends
    # an episode returns the next episode's first observation (its last is in infos), so every step is a transition
    same_step = gym.vector.AutoresetMode.SAME_STEP
    video_training, video_eval = args.capture_video and not args.eval_only, args.capture_video and bool(args.eval_only)
    train_env = make_env(args.env_id, args.seed, 0, video_training, run_name)
    envs = gym.vector.SyncVectorEnv([train_env], autoreset_mode=same_step)
    eval_env_fns = [make_env(args.env_id, i, i, video_eval, run_name) for i in range(args.eval_episodes)]
    eval_envs = gym.vector.SyncVectorEnv(eval_env_fns, autoreset_mode=same_step)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(np.prod(envs.single_action_space.shape))
    low, high = envs.single_action_space.low, envs.single_action_space.high
    action_scale, action_bias = (high - low) / 2, (high + low) / 2  # the policy acts in [-1, 1]

    actor = Denoiser(obs_dim, act_dim, args.diffusion_steps, t_dim=args.time_dim, layers=args.hidden_layers)
    actor = actor.to(device)
    actor_target = copy.deepcopy(actor)
    qf = TwinQ(obs_dim, act_dim, layers=args.hidden_layers).to(device)
    qf_target = copy.deepcopy(qf)
    actor_optimizer = optim.Adam(actor.parameters(), lr=args.policy_lr, eps=args.adam_eps)
    q_optimizer = optim.Adam(qf.parameters(), lr=args.q_lr, eps=args.adam_eps)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    agent = SimpleNamespace(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target,
                            actor_optimizer=actor_optimizer, q_optimizer=q_optimizer)
    stateful = dict(vars(agent), rb=rb)  # all a checkpoint restores
    # the DDPM chains are most of an update and of every action; compiling fuses their elementwise work
    sample = compiled(ddpm_sample, device) if args.compile else ddpm_sample
    if device.type == "cpu":  # CPU only: the chain 32 states at a time, in cache (docs/speed.md)
        sample = in_state_chunks(sample, 32)
    policy_eval = lambda o: act_eval(actor, qf, o, args, sample)  # noqa: E731  (obs -> evaluation action)

    if args.eval_only:  # no training: the loaded weights, evaluated once at the step they were saved at
        actor.load_state_dict(ckpt["actor"])
        qf.load_state_dict(ckpt["qf"])
        step = ckpt.get("global_step", ckpt["args"]["total_timesteps"])  # a --save-model file: its run's end
        eval_return = evaluate(policy_eval, eval_envs, action_scale, action_bias, device)
        writer.add_scalar("eval/episodic_return", eval_return, step)
        print(f"eval step={step} return={eval_return:.2f}")
        eval_envs.close()
        writer.close()
        raise SystemExit(0)

    preempted = []  # signals received: finish the step, write the checkpoint, exit PREEMPTED_EXIT
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: preempted.append(signum))
    loss_names = ["losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss"]
    first_bad_step = torch.full((len(loss_names),), -1, device=device)  # read every 100 steps: no sync per step

    # TRY NOT TO MODIFY: start the game
    obs, _ = envs.reset(seed=args.seed)
    start_step, last_return = 0, math.nan
    if args.resume:
        obs, start_step, last_return = restore_checkpoint(ckpt, stateful, envs, device)
    first_update = max(start_step, args.learning_starts)  # the ETA times this process's updates
    start_time = time.time()
    for global_step in range(start_step, args.total_timesteps):
        # ALGO LOGIC: put action logic here
        if global_step < args.learning_starts:
            actions = np.array([envs.single_action_space.sample() for _ in range(envs.num_envs)])
            norm_actions = (actions - action_bias) / action_scale
        else:
            with torch.no_grad():
                action = act(actor, qf, torch.as_tensor(obs, dtype=torch.float32, device=device), args, sample)
            norm_actions = action.cpu().numpy()  # the step's one device-to-host copy
            actions = (norm_actions * action_scale + action_bias).astype(envs.single_action_space.dtype)

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        if "final_info" in infos:
            final_info = infos["final_info"]
            for i in np.flatnonzero(final_info.get("_episode", [])):
                last_return = float(final_info["episode"]["r"][i])
                writer.add_scalar("charts/episodic_return", last_return, global_step)
                writer.add_scalar("charts/episodic_length", final_info["episode"]["l"][i], global_step)

        # TRY NOT TO MODIFY: save data to replay buffer; handle `final_obs`; truncation is not termination
        real_next_obs = next_obs.copy()
        if "final_obs" in infos:
            for i in np.flatnonzero(infos["_final_obs"]):
                real_next_obs[i] = infos["final_obs"][i]
        dones = terminations | truncations if args.timeout_as_terminal else terminations  # official: timeouts terminal
        rb.add(obs, real_next_obs, norm_actions, rewards, dones)
        obs = next_obs  # TRY NOT TO MODIFY: CRUCIAL step easy to overlook

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts:
            if global_step == first_update:
                update_start_time = time.time()
            alpha = entropy_coef(global_step, args.total_timesteps, args.entropy_alpha, args.entropy_alpha_min)
            batch = rb.sample(args.batch_size)
            policy_obs = batch.obs if args.shared_batch else rb.sample(args.batch_size).obs  # two independent batches
            logs = update(agent, batch, policy_obs, alpha, args, sample)
            finite = torch.isfinite(torch.stack([logs[k] for k in loss_names]))
            first_bad_step = torch.where(finite | (first_bad_step >= 0), first_bad_step, global_step)
        last_step = global_step + 1 == args.total_timesteps
        save = last_step or preempted or (global_step + 1) % (args.checkpoint_every or args.eval_every) == 0
        if global_step % 100 == 0 or save:  # a NaN loss stops the run, unsaved, naming its first step
            bad = [(s, k) for s, k in zip(first_bad_step.tolist(), loss_names) if s >= 0]
            if bad:
                raise SystemExit(f"error: non-finite {', '.join(k for _, k in bad)} at step {min(bad)[0]}")
        if global_step % 100 == 0:
            if global_step >= args.learning_starts:
                for k, v in logs.items():
                    writer.add_scalar(k, v.item(), global_step)
                writer.add_scalar("qvpo/entropy_alpha", alpha, global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))  # since this process started
            eta = "?"  # until updates have run: the random warm-up is far faster
            if global_step > first_update:
                step_time = (time.time() - update_start_time) / (global_step - first_update)
                eta = "{}h{:02d}m".format(*divmod(int((args.total_timesteps - global_step) * step_time) // 60, 60))
            print(f"step={global_step}/{args.total_timesteps} SPS={sps} ETA={eta} last_return={last_return:.1f}")
            writer.add_scalar("charts/SPS", sps, global_step)

        if (global_step + 1) % args.eval_every == 0 or last_step:
            eval_return = evaluate(policy_eval, eval_envs, action_scale, action_bias, device)
            writer.add_scalar("eval/episodic_return", eval_return, global_step + 1)
            print(f"eval step={global_step + 1} return={eval_return:.2f}")
        if save:
            save_checkpoint(f"{run_dir}/checkpoint.pt", stateful, envs, args=vars(args), global_step=global_step + 1,
                            last_return=last_return)  # fmt: skip
            if preempted:  # tested only after a checkpoint: a signal may come at any line
                print(f"preempted at step {global_step + 1}: checkpoint in {run_dir}, continue with --resume {run_dir}")
                writer.close()
                raise SystemExit(PREEMPTED_EXIT)

    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.pt"
        torch.save({"actor": actor.state_dict(), "qf": qf.state_dict(), "args": vars(args)}, model_path)
        saved = torch.load(model_path, map_location=device, weights_only=True)
        actor.load_state_dict(saved["actor"])
        qf.load_state_dict(saved["qf"])
        eval_return = evaluate(policy_eval, eval_envs, action_scale, action_bias, device)
        writer.add_scalar("eval/saved_model_episodic_return", eval_return, args.total_timesteps)
        print(f"model saved to {model_path}; reloaded, its eval return={eval_return:.2f}")

    envs.close()
    eval_envs.close()
    writer.close()
