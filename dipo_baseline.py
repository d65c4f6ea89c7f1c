# DIPO (Yang et al., arXiv 2305.13122) as the official code (BellmanTimeHut/DIPO) runs it; spec: baselines.md §0, §2
import copy
import dataclasses
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass

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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "rfm"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder)"""
    save_model: bool = False
    """whether to save the model into the `runs/{run_name}` folder, then reload and evaluate it"""
    compile: bool = False
    """if toggled, the denoising chain is compiled with torch.compile"""

    # Algorithm specific arguments
    env_id: str = "dm_control/cheetah-run-v0"
    """the id of the environment (gymnasium id, `dm_control/<domain>-<task>-v0`, or `module:Env-v0`)"""
    total_timesteps: int = 1_000_000
    """total timesteps of the experiments"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (and the diffusion memory size)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int = 10_000
    """timestep to start learning (uniform random actions before)"""
    eval_every: int = 10_000
    """evaluate the policy every this many env steps (and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, one per vectorised eval env seeded 0..eval_episodes-1"""
    policy_lr: float = 3e-4
    """the learning rate of the denoiser optimizer (Adam, eps 1e-5)"""
    q_lr: float = 3e-4
    """the learning rate of the Q network optimizer (Adam, eps 1e-5)"""
    max_grad_norm: float | None = None
    """global gradient-norm clip of both the actor and the critic; None: per-env table (Hopper 1, Ant 0.8), else 2"""
    diffusion_steps: int = 100
    """DDPM steps T of the cosine schedule (spec §2.1)"""
    action_lr: float = 0.03
    """learning rate of the fresh Adam that ascends min-Q over the memory actions (spec §2.2)"""
    action_gradient_steps: int | None = None
    """Adam steps of the action ascent per update; None: per-env table (HalfCheetah 40), else 20"""
    action_grad_ratio: float | None = None
    """batch-global action-gradient clip = ratio * act_dim; None: per-env table (Hopper 0.3, Walker2d 0.08, ...), else 0.1"""
    update_actor_target_every: int | None = None
    """Polyak-update the actor target every this many updates; None: per-env table (HalfCheetah 2), else 1"""
    timeout_as_terminal: bool = False
    """treat time-limit truncation as terminal, as the official code does (spec §0); default bootstraps through it"""
    write_back: bool = False
    """write the improved actions back into the diffusion memory, as the DIPO paper describes, so a resampled pair
    keeps improving; default (the official code's effective behaviour): nothing is written, every update restarts the
    ascent from the stored behaviour actions"""


# per-environment settings of the official README (spec §2.3): max_grad_norm, action_grad_ratio, action_gradient_steps,
# update_actor_target_every; any version of the Gym MuJoCo task (Hopper-v3, Hopper-v5, ...)
ENV_TABLE = {
    "Hopper": (1.0, 0.3, 20, 1),
    "Walker2d": (2.0, 0.08, 20, 1),
    "Ant": (0.8, 0.1, 20, 1),
    "HalfCheetah": (2.0, 0.08, 40, 2),
    "Humanoid": (2.0, 0.1, 20, 1),
}
GENERAL_DEFAULTS = (2.0, 0.1, 20, 1)
TABLE_FIELDS = ("max_grad_norm", "action_grad_ratio", "action_gradient_steps", "update_actor_target_every")


def env_defaults(env_id):
    """The per-env table row for a Gym MuJoCo id (any version, optional `module:` prefix), else the general defaults."""
    match = re.fullmatch(r"(?:.*:)?(\w+)-v\d+", env_id)
    return ENV_TABLE.get(match.group(1), GENERAL_DEFAULTS) if match else GENERAL_DEFAULTS


def resolve_args(args):
    """Fill the `None` table fields from env_defaults; explicit flags win."""
    row = dict(zip(TABLE_FIELDS, env_defaults(args.env_id)))
    return dataclasses.replace(args, **{k: v for k, v in row.items() if getattr(args, k) is None})


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
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env.action_space.seed(seed)
        return env

    return thunk


def check_env(env_id):
    """Fail before training, in one line, on an id gymnasium cannot make or spaces the policy cannot drive."""
    try:
        env = make_env(env_id, 0, 0, False, "")()
    except (gym.error.Error, ImportError) as e:
        raise SystemExit(f"error: unknown env id {env_id!r}: {e}")
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(act_space, gym.spaces.Box):
        raise SystemExit(f"error: {env_id} has a {type(act_space).__name__} action space; only continuous Box is supported")
    if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
        raise SystemExit(f"error: {env_id} has unbounded actions; the policy needs finite bounds to rescale [-1, 1]")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise SystemExit(f"error: {env_id} observations are {obs_space}; a flat Box (or a Dict of them) is required")


def check_args(args):
    problems = [
        msg
        for bad, msg in [
            (args.total_timesteps < 1, "--total-timesteps must be >= 1"),
            (args.buffer_size < 1, "--buffer-size must be >= 1"),
            (args.batch_size < 1, "--batch-size must be >= 1"),
            (args.learning_starts < 0, "--learning-starts must be >= 0"),
            (args.eval_every < 1, "--eval-every must be >= 1"),
            (args.eval_episodes < 1, "--eval-episodes must be >= 1"),
            (not 0.0 <= args.gamma <= 1.0, "--gamma must be in [0, 1]"),
            (not 0.0 < args.tau <= 1.0, "--tau must be in (0, 1]"),
            (args.policy_lr <= 0 or args.q_lr <= 0, "--policy-lr and --q-lr must be > 0"),
            (args.max_grad_norm <= 0, "--max-grad-norm must be > 0"),
            (args.diffusion_steps < 1, "--diffusion-steps must be >= 1"),
            (args.action_lr <= 0, "--action-lr must be > 0"),
            (args.action_gradient_steps < 0, "--action-gradient-steps must be >= 0"),
            (args.action_grad_ratio <= 0, "--action-grad-ratio must be > 0"),
            (args.update_actor_target_every < 1, "--update-actor-target-every must be >= 1"),
        ]
        if bad
    ]
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# ALGO LOGIC: initialize agent here:
class ReplayBuffer:
    """Ring buffer of (s, a in [-1, 1], r, s', terminated) tensors on the training device."""

    def __init__(self, size, obs_dim, act_dim, device):
        self.size, self.ptr, self.full, self.device = size, 0, False, device
        self.obs = torch.zeros(size, obs_dim, device=device)
        self.next_obs = torch.zeros(size, obs_dim, device=device)
        self.actions = torch.zeros(size, act_dim, device=device)
        self.rewards = torch.zeros(size, 1, device=device)
        self.dones = torch.zeros(size, 1, device=device)

    def add(self, obs, next_obs, actions, rewards, terminations):
        for buf, x in zip(
            (self.obs, self.next_obs, self.actions, self.rewards, self.dones),
            (obs, next_obs, actions, rewards[:, None], terminations[:, None]),
        ):
            idx = (self.ptr + torch.arange(len(x))) % self.size
            buf[idx] = torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
        self.full = self.full or self.ptr + len(obs) >= self.size
        self.ptr = (self.ptr + len(obs)) % self.size

    def sample(self, batch_size):
        idx = torch.randint(0, self.size if self.full else self.ptr, (batch_size,), device=self.device)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.dones[idx]


class DiffusionMemory:
    """Persistent (s, a in [-1, 1]) copies of every env step, own ring indices. Sampled actions are improved by the
    action ascent. The official code's write-back (np.copyto onto best_actions[idxs], a fancy-indexed copy) writes
    nothing, so by default the stored actions stay the behaviour actions; with --write-back, write_back stores the
    improved ones and they keep improving each time they are resampled (the DIPO paper's description)."""

    def __init__(self, size, obs_dim, act_dim, device):
        self.size, self.ptr, self.full, self.device = size, 0, False, device
        self.obs = torch.zeros(size, obs_dim, device=device)
        self.actions = torch.zeros(size, act_dim, device=device)

    def add(self, obs, actions):
        idx = (self.ptr + torch.arange(len(obs))) % self.size
        self.obs[idx] = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
        self.actions[idx] = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=self.device)
        self.full = self.full or self.ptr + len(obs) >= self.size
        self.ptr = (self.ptr + len(obs)) % self.size

    def sample(self, batch_size):
        """Uniform with replacement, independent of the replay batch; returns (obs, actions, idx)."""
        idx = torch.randint(0, self.size if self.full else self.ptr, (batch_size,), device=self.device)
        return self.obs[idx], self.actions[idx], idx

    def write_back(self, idx, actions):
        self.actions[idx] = actions


class MishFunction(torch.autograd.Function):
    """mish(x) = x t, t = tanh(softplus(x)) = n / (n + 2), n = e^x (e^x + 2); mish'(x) = t + 4 x e^x (1 + e^x) / (n + 2)^2.

    Exact identities in fewer passes than F.mish, whose CPU forward is ~2x and backward ~5x slower on 256-wide layers.
    The exponent is clamped at 20, where t is 1 in float32.
    """

    @staticmethod
    def forward(ctx, x):
        e = x.clamp(max=20.0).exp_()
        n = (e + 2.0).mul_(e)
        p = (n + 2.0).reciprocal_()
        t = n.mul_(p)
        ctx.save_for_backward(x, e, p, t)
        return x * t

    @staticmethod
    def backward(ctx, grad):
        x, e, p, t = ctx.saved_tensors
        return torch.addcmul(t, x, (e + 1.0).mul_(e).mul_(p).mul_(p), value=4.0).mul_(grad)


def mish(x):
    """F.mish on small tensors (one call is cheaper at batch 1), MishFunction's identity on large ones."""
    if x.numel() < 4096:
        return F.mish(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return MishFunction.apply(x)
    e = x.clamp(max=20.0).exp_()
    n = (e + 2.0).mul_(e)
    return n.div_(n + 2.0).mul_(x)


def init_linear(layer):
    """The effective official init: untruncated N(0, (1 / (2 sqrt(fan_in)))^2), zero bias (spec §0)."""
    nn.init.normal_(layer.weight, std=1.0 / (2.0 * math.sqrt(layer.in_features)))
    nn.init.zeros_(layer.bias)


class TwinQ(nn.Module):
    """Two Q-networks [s, a] -> 256 -> 256 -> 256 -> 1 (Mish) as one batched ensemble; min over members (spec §0).

    The first layer is split by input: W_s s + b is computed once while the actions change (action ascent).
    """

    def __init__(self, obs_dim, act_dim, hidden=256, members=2):
        super().__init__()
        self.obs_dim, self.members = obs_dim, members
        sizes = [obs_dim + act_dim, hidden, hidden, hidden, 1]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(members, n_in, n_out) / (2.0 * math.sqrt(n_in))) for n_in, n_out in zip(sizes, sizes[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, n_out)) for n_out in sizes[1:])

    def condition(self, obs):
        """(M, obs_dim) -> (members, M, H): W_s s + b of every member."""
        return torch.baddbmm(self.biases[0], obs.expand(self.members, -1, -1), self.weights[0][:, : self.obs_dim])

    def head(self, act, cond):
        """(M, act_dim), condition -> (members, M)"""
        h = mish(torch.baddbmm(cond, act.expand(self.members, -1, -1), self.weights[0][:, self.obs_dim :]))
        for w, b in zip(self.weights[1:-1], self.biases[1:-1]):
            h = mish(torch.baddbmm(b, h, w))
        return torch.baddbmm(self.biases[-1], h, self.weights[-1]).squeeze(-1)

    def forward(self, obs, act):
        """(M, obs_dim), (M, act_dim) -> (members, M)"""
        return self.head(act, self.condition(obs))

    def min_q(self, obs, act):
        return self.forward(obs, act).min(0).values


def sinusoidal_embedding(i, dim=32):
    """[sin(i f_j), cos(i f_j)] of the integer step index, f_j = exp(-ln(1e4) j / (dim/2 - 1)) (spec §0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=i.device) / (half - 1))
    arg = i.float()[..., None] * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


class Denoiser(nn.Module):
    """eps_theta(x_i, i, s): [x, t_emb(i), s] -> 256 -> 256 -> 256 -> D with Mish, t_emb = sinusoid(32) -> Linear(32, 256)
    -> Mish -> Linear(256, 32) (spec §0).

    The first layer is split by input so that the state term W_s s + b and the time term W_t t_emb(i) are computed
    once per sampler call (exact: a Linear of a concatenation is a sum).
    """

    def __init__(self, obs_dim, act_dim, hidden=256, t_dim=32):
        super().__init__()
        self.obs_dim, self.act_dim, self.t_dim = obs_dim, act_dim, t_dim
        self.time_mlp = nn.ModuleList([nn.Linear(t_dim, hidden), nn.Linear(hidden, t_dim)])
        self.inp = nn.Linear(act_dim + t_dim + obs_dim, hidden)
        self.mid = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.out = nn.Linear(hidden, act_dim)
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                init_linear(layer)

    def split_input_weight(self):
        return self.inp.weight.split([self.act_dim, self.t_dim, self.obs_dim], dim=1)

    def condition(self, obs):
        """Step-independent part of the first layer: W_s s + b."""
        return F.linear(obs, self.split_input_weight()[2], self.inp.bias)

    def time_term(self, i):
        """W_t t_emb(i) for integer steps i."""
        t_emb = self.time_mlp[1](mish(self.time_mlp[0](sinusoidal_embedding(i, self.t_dim))))
        return F.linear(t_emb, self.split_input_weight()[1])

    def head(self, x, pre):
        """The rest of the network, given pre = condition + time_term."""
        h = mish(F.linear(x, self.split_input_weight()[0]) + pre)
        for layer in self.mid:
            h = mish(layer(h))
        return self.out(h)

    def forward(self, x, i, obs):
        """(B, D), (B,) int, (B, obs_dim) -> predicted noise (B, D)"""
        return self.head(x, self.condition(obs) + self.time_term(i))


def cosine_beta_schedule(T, s=0.008):
    """beta_i = clip(1 - f(i+1)/f(i), 0, 0.999), f(u) = cos^2((u/T + s)/(1 + s) pi/2), i = 0..T-1 (spec §0). float64."""
    u = np.arange(T + 1, dtype=np.float64)
    f = np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0, 0.999)


class DDPMSchedule:
    """Cosine-schedule DDPM coefficients (spec §0): device tensors for the training loss, Python floats for the sampler."""

    def __init__(self, T, device):
        betas = cosine_beta_schedule(T)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        self.T = T
        self.sqrt_ac = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32, device=device)
        self.sqrt_1m_ac = torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32, device=device)
        self.recip = np.sqrt(1.0 / alphas_cumprod).tolist()  # x0_hat = recip x - recipm1 eps
        self.recipm1 = np.sqrt(1.0 / alphas_cumprod - 1.0).tolist()
        self.c1 = (betas * np.sqrt(prev) / (1.0 - alphas_cumprod)).tolist()  # posterior mean = c1 x0_hat + c2 x
        self.c2 = ((1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)).tolist()
        variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.sigma = np.exp(0.5 * np.log(np.maximum(variance, 1e-20))).tolist()


@torch.no_grad()
def ddpm_sample(actor, obs, sched, noise_ratio):
    """x ~ N(0, I); for i = T-1..0: x0_hat = clamp(recip x - recipm1 eps, -1, 1), x = c1 x0_hat + c2 x
    + 1[i>0] sigma_i z noise_ratio; final clamp (spec §0). obs (B, obs_dim) -> (B, D) in [-1, 1]."""
    B, D, T = obs.shape[0], actor.act_dim, sched.T
    x = torch.randn(B, D, device=obs.device)
    cond = actor.condition(obs)
    time_terms = actor.time_term(torch.arange(T, device=obs.device)).unbind(0)
    z = torch.randn(T, B, D, device=obs.device).unbind(0) if noise_ratio else None
    # (in, out)-contiguous weights: addmm is faster with them at small batch (acting, eval)
    w_x = actor.split_input_weight()[0].t().contiguous()
    (w2, b2), (w3, b3), (w4, b4) = [(layer.weight.t().contiguous(), layer.bias) for layer in (*actor.mid, actor.out)]
    recip, recipm1, c1, c2, sigma = sched.recip, sched.recipm1, sched.c1, sched.c2, sched.sigma
    for i in range(T - 1, -1, -1):
        h = mish(torch.addmm(cond, x, w_x).add_(time_terms[i]))
        h = mish(torch.addmm(b2, h, w2))
        h = mish(torch.addmm(b3, h, w3))
        eps = torch.addmm(b4, h, w4)
        x0 = torch.sub(x * recip[i], eps, alpha=recipm1[i]).clamp_(-1.0, 1.0)
        x = x0.mul_(c1[i]).add_(x, alpha=c2[i])
        if i > 0 and noise_ratio:
            x.add_(z[i], alpha=sigma[i] * noise_ratio)
    return x.clamp_(-1.0, 1.0)


def diffusion_loss(actor, sched, obs, actions):
    """Unweighted eps-MSE: x_i = sqrt(ab_i) a + sqrt(1 - ab_i) eps, i ~ U{0..T-1}, mean over rows and dims (spec §0)."""
    i = torch.randint(0, sched.T, (actions.shape[0],), device=actions.device)
    eps = torch.randn_like(actions)
    x = sched.sqrt_ac[i, None] * actions + sched.sqrt_1m_ac[i, None] * eps
    return F.mse_loss(actor(x, i, obs), eps)


def improve_actions(qf, obs, actions, steps, lr, max_norm):
    """Action ascent (spec §2.2): a fresh Adam(lr, eps 1e-5) over the action tensor, `steps` times: loss
    -sum min(Q1, Q2)(s, a), clip the global L2 norm of the whole batch's gradient at max_norm, Adam step, clamp to
    [-1, 1]. Returns the improved actions (detached) and the mean min-Q gain."""
    with torch.no_grad():
        cond = qf.condition(obs)  # the critic is fixed here: its state term is computed once
        q_before = qf.head(actions, cond).min(0).values
    a = actions.clone().requires_grad_(True)
    optimizer = optim.Adam([a], lr=lr, eps=1e-5)
    for _ in range(steps):
        loss = -qf.head(a, cond).min(0).values.sum()
        (a.grad,) = torch.autograd.grad(loss, a)
        nn.utils.clip_grad_norm_([a], max_norm)
        optimizer.step()
        with torch.no_grad():
            a.clamp_(-1.0, 1.0)
    a = a.detach()
    with torch.no_grad():
        q_gain = (qf.head(a, cond).min(0).values - q_before).mean()
    return a, q_gain


def soft_update(target, online, tau):
    with torch.no_grad():
        for tp, p in zip(target.parameters(), online.parameters()):
            tp.lerp_(p, tau)


def update(batch, memory, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, sched, num_updates, args):
    """One DIPO iteration (spec §2.2, §8); num_updates counts the previous ones. Returns device tensors of diagnostics."""
    obs, actions, rewards, next_obs, dones = batch
    # critic: y = r + gamma (1 - done) min Q'(s', a'), a' one target-actor sample with noise 1
    with torch.no_grad():
        next_actions = ddpm_sample(actor_target, next_obs, sched, 1.0)
        next_q = qf_target.min_q(next_obs, next_actions)
        target_q = rewards.flatten() + (1 - dones.flatten()) * args.gamma * next_q
    qs = qf(obs, actions)
    qf1_loss, qf2_loss = F.mse_loss(qs[0], target_q), F.mse_loss(qs[1], target_q)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    nn.utils.clip_grad_norm_(qf.parameters(), args.max_grad_norm)
    q_optimizer.step()

    # action gradient on a diffusion-memory batch with the just-updated critic; stored only with --write-back
    mem_obs, mem_actions, idx = memory.sample(args.batch_size)
    improved, q_gain = improve_actions(
        qf, mem_obs, mem_actions, args.action_gradient_steps, args.action_lr, args.action_grad_ratio * actions.shape[1]
    )
    if args.write_back:
        memory.write_back(idx, improved)

    # behaviour cloning of the improved actions
    actor_loss = diffusion_loss(actor, sched, mem_obs, improved)
    actor_optimizer.zero_grad()
    actor_loss.backward()
    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    actor_optimizer.step()

    # update the target networks
    if num_updates % args.update_actor_target_every == 0:
        soft_update(actor_target, actor, args.tau)
    soft_update(qf_target, qf, args.tau)
    return {
        "losses/qf1_values": qs[0].mean(), "losses/qf2_values": qs[1].mean(),
        "losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss, "losses/qf_loss": (qf1_loss + qf2_loss) / 2,
        "losses/actor_loss": actor_loss, "dipo/q_gain": q_gain,
    }  # fmt: skip


def act(actor, obs, sched):
    """Behaviour action: one DDPM sample with per-step noise 1, no best-of-K (spec §2.1). obs (E, obs_dim) -> (E, D)."""
    return ddpm_sample(actor, obs, sched, 1.0)


def act_eval(actor, obs, sched):
    """Evaluation action: no per-step noise (noise_ratio 0); the initial x is still random (spec §2.1)."""
    return ddpm_sample(actor, obs, sched, 0.0)


def evaluate(policy, envs, action_scale, action_bias, device):
    """One episode on each eval env (seeded 0..n-1); returns the mean undiscounted return."""
    obs, _ = envs.reset(seed=list(range(envs.num_envs)))
    returns, done = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=bool)
    while not done.all():
        with torch.no_grad():
            actions = policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
        env_actions = (actions * action_scale + action_bias).cpu().numpy().astype(envs.single_action_space.dtype)
        obs, rewards, terminations, truncations, _ = envs.step(env_actions)
        returns += np.where(done, 0.0, rewards)
        done |= terminations | truncations
    return float(returns.mean())


if __name__ == "__main__":
    args = resolve_args(tyro.cli(Args))
    check_args(args)
    check_env(args.env_id)
    run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup: one training env; evaluation envs seeded 0..eval_episodes-1
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, args.seed, 0, args.capture_video, run_name)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    eval_envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, i, i, False, run_name) for i in range(args.eval_episodes)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(np.prod(envs.single_action_space.shape))
    low = torch.as_tensor(envs.single_action_space.low, dtype=torch.float32, device=device)
    high = torch.as_tensor(envs.single_action_space.high, dtype=torch.float32, device=device)
    action_scale, action_bias = (high - low) / 2, (high + low) / 2

    actor = Denoiser(obs_dim, act_dim).to(device)
    actor_target = copy.deepcopy(actor)
    qf = TwinQ(obs_dim, act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_optimizer = optim.Adam(actor.parameters(), lr=args.policy_lr, eps=1e-5)
    q_optimizer = optim.Adam(qf.parameters(), lr=args.q_lr, eps=1e-5)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    memory = DiffusionMemory(args.buffer_size, obs_dim, act_dim, device)
    sched = DDPMSchedule(args.diffusion_steps, device)
    if args.compile:  # the 100-step chain is most of an update and of every action
        ddpm_sample = torch.compile(ddpm_sample)

    def policy_eval(o):
        return act_eval(actor, o, sched)

    start_time = time.time()
    last_return = float("nan")

    # TRY NOT TO MODIFY: start the game
    obs, _ = envs.reset(seed=args.seed)
    for global_step in range(args.total_timesteps):
        # ALGO LOGIC: put action logic here
        if global_step < args.learning_starts:
            actions = np.array([envs.single_action_space.sample() for _ in range(envs.num_envs)])
            norm_actions = (actions - action_bias.cpu().numpy()) / action_scale.cpu().numpy()
        else:
            with torch.no_grad():
                norm = act(actor, torch.as_tensor(obs, dtype=torch.float32, device=device), sched)
            norm_actions = norm.cpu().numpy()
            actions = (norm * action_scale + action_bias).cpu().numpy().astype(envs.single_action_space.dtype)

        # TRY NOT TO MODIFY: execute the game and log data.
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        if "final_info" in infos:
            fi = infos["final_info"]
            for i in np.flatnonzero(fi.get("_episode", [])):
                last_return = float(fi["episode"]["r"][i])
                writer.add_scalar("charts/episodic_return", last_return, global_step)
                writer.add_scalar("charts/episodic_length", fi["episode"]["l"][i], global_step)

        # TRY NOT TO MODIFY: save data to replay buffer; handle `final_obs`; truncation is not termination
        real_next_obs = next_obs.copy()
        if "final_obs" in infos:
            for i in np.flatnonzero(infos["_final_obs"]):
                real_next_obs[i] = infos["final_obs"][i]
        dones = terminations | truncations if args.timeout_as_terminal else terminations  # official: timeouts terminal
        rb.add(obs, real_next_obs, norm_actions, rewards, dones)
        memory.add(obs, norm_actions)

        # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
        obs = next_obs

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts:
            logs = update(
                rb.sample(args.batch_size), memory, actor, actor_target, qf, qf_target,
                actor_optimizer, q_optimizer, sched, global_step - args.learning_starts, args,
            )  # fmt: skip
            losses = {k: v for k, v in logs.items() if k.startswith("losses/")}
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            if bad:
                raise SystemExit(f"error: non-finite {', '.join(bad)} at step {global_step}")
            if global_step % 100 == 0:
                for k, v in logs.items():
                    writer.add_scalar(k, v.item(), global_step)
        if global_step % 100 == 0:
            sps = int(global_step / (time.time() - start_time))
            print(f"step={global_step} SPS={sps} last_return={last_return:.1f}")
            writer.add_scalar("charts/SPS", sps, global_step)

        if (global_step + 1) % args.eval_every == 0 or global_step + 1 == args.total_timesteps:
            eval_return = evaluate(policy_eval, eval_envs, action_scale, action_bias, device)
            writer.add_scalar("eval/episodic_return", eval_return, global_step + 1)
            print(f"eval step={global_step + 1} return={eval_return:.2f}")

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save({"actor": actor.state_dict(), "qf": qf.state_dict(), "args": vars(args)}, model_path)
        print(f"model saved to {model_path}")
        saved = torch.load(model_path, map_location=device)
        actor.load_state_dict(saved["actor"])
        qf.load_state_dict(saved["qf"])
        eval_return = evaluate(policy_eval, eval_envs, action_scale, action_bias, device)
        writer.add_scalar("eval/saved_model_episodic_return", eval_return, args.total_timesteps)
        print(f"saved model eval return={eval_return:.2f}")

    envs.close()
    eval_envs.close()
    writer.close()
