# Reverse Flow Matching (Li, Tang, Azizan, ICML 2026, arXiv 2601.08136) with a DDPM (epsilon) policy; math: docs/rfm.md
#
# The update is rfm_flow.py's (pseudocode in its header) with x = alpha_i y1 + sigma_i eps for the flow path: the
# posterior target is E[eps | x] (posterior_noise) and the network regresses eps (docs/rfm.md §11).
import copy
import functools
import hashlib
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
from typing import Literal, NamedTuple

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
    compile: bool = False  # torch.compile the particle sampler and the posterior estimator (docs/speed.md)
    checkpoint_every: int = 0  # steps between runs/{run_name}/checkpoint.pt writes (0: --eval-every); also at the end
    resume: str | None = None  # continue the run of this checkpoint.pt (or run dir holding it), given the same flags
    eval_only: str | None = None  # no training: evaluate this checkpoint.pt or --save-model file once, in a new run dir

    # Algorithm specific arguments
    env_id: str = "dm_control/cheetah-run-v0"  # gymnasium id, `dm_control/<domain>-<task>-v0`, or `module:Env-v0`
    total_timesteps: int = 250_000  # total timesteps of the experiments
    buffer_size: int = 250_000  # the replay memory buffer size
    gamma: float = 0.99  # the discount factor gamma
    tau: float = 0.005  # target smoothing coefficient
    batch_size: int = 256  # the batch size of sample from the replay memory
    learning_starts: int = 10_000  # timestep to start learning (uniform random actions before)
    eval_every: int = 10_000  # evaluate the policy every this many env steps (and at the end)
    eval_episodes: int = 25  # evaluation episodes, one per vectorised eval env seeded 0..eval_episodes-1
    policy_lr: float = 3e-4  # the learning rate of the policy network optimizer
    q_lr: float = 1e-3  # the learning rate of the Q network optimizer
    max_grad_norm: float = 10.0  # gradient-norm clip of the actor, and of each critic member separately
    temperature: float = 0.02  # Boltzmann temperature T of the target exp(Q/T) (docs/rfm.md §1)
    diffusion_steps: int = 20  # DDPM steps T_d of the cosine schedule, i = 0 near the data (docs/rfm.md §11)
    x0_clip: float = 5.0  # clamp of the sampler's x0 prediction in latent units, tanh(5) = 0.99991 (docs/rfm.md §11)
    num_particles: int = 32  # policy particles per state for acting, TD targets and evaluation (docs/rfm.md §7.1)
    num_posterior_samples: int = 100  # reverse proposals K per (state, x_i) (docs/rfm.md §11)
    # lambda, the weight of the posterior score added to the proposals (docs/rfm.md §5, §11): stein = the
    # per-dimension variance-minimising plug-in (§6), noise = 0, gradient = sigma^2/alpha^2
    estimator: Literal["stein", "noise", "gradient"] = "stein"
    cv_ridge: float = 1e-4  # ridge rho of the plug-in control-variate coefficient (docs/rfm.md §6)
    cv_clip: float = 2.0  # clip c of the plug-in control-variate coefficient (docs/rfm.md §6)


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


class TwinQ(nn.Module):
    """Two Q-networks [s, a] -> 256 -> 256 -> 1 (ReLU); min over members is used everywhere (docs/rfm.md §8)."""

    def __init__(self, obs_dim, act_dim, hidden=256, members=2):
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(
                nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
            for _ in range(members)
        )
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
                nn.init.zeros_(layer.bias)

    def forward(self, obs, act):
        """(M, obs_dim), (M, act_dim) -> (members, M)"""
        x = torch.cat([obs, act], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.members])

    def min_q(self, obs, act):
        """min_j Q_j(s, a), (M,)"""
        return self(obs, act).min(0).values


def sinusoidal_embedding(x, dim=128, max_period=1000.0):
    """[sin(x f_j), cos(x f_j)] with f_j = exp(-ln(max_period) j / (dim/2 - 1)) (docs/rfm.md §8)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=x.dtype) / (half - 1))
    arg = x[..., None] * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def cosine_schedule(steps, s=0.008):
    """Cosine DDPM schedule and ancestral-step coefficients (docs/baselines.md §0), float64, i = 0..steps-1 (0: data).

    x_i = alpha_i y1 + sigma_i eps; x_{i-1} = c1_i x0_hat + c2_i x_i + std_i z, std_i^2 the posterior variance beta~_i.
    """
    u = torch.arange(steps + 1, dtype=torch.float64)
    f = torch.cos((u / steps + s) / (1 + s) * math.pi / 2).square()
    beta = (1 - f[1:] / f[:-1]).clamp(0.0, 0.999)
    alphabar = torch.cumprod(1 - beta, 0)
    prev = torch.cat([alphabar.new_ones(1), alphabar[:-1]])  # alphabar_{i-1}, with alphabar_{-1} = 1
    return {
        "beta": beta, "alphabar": alphabar, "alpha": alphabar.sqrt(), "sigma": (1 - alphabar).sqrt(),
        "c1": beta * prev.sqrt() / (1 - alphabar), "c2": (1 - prev) * (1 - beta).sqrt() / (1 - alphabar),
        "std": (beta * (1 - prev) / (1 - alphabar)).sqrt(),
    }  # fmt: skip


class NoiseNet(nn.Module):
    """eps(x_i, i, s, T): [s, x_i, emb(i), emb(T)] -> 256 -> 2 residual GELU blocks -> D (docs/rfm.md §8, §11).

    `forward` is that network; the sampler computes the same first layer W [s, y, emb(t), emb(T)] + b as a sum of its
    four input blocks (`state_term`, `time_term`, W_y y), the state and temperature term once per state and the time
    term once per step, not per particle: an exact saving, equal up to float rounding.
    Time is the step index i itself (float 0..T_d-1, as in DDPM); the schedule is precomputed in buffers.
    """

    def __init__(self, obs_dim, act_dim, diffusion_steps, hidden=256, emb_dim=128, x0_clip=5.0):
        super().__init__()
        self.obs_dim, self.act_dim, self.emb_dim, self.x0_clip = obs_dim, act_dim, emb_dim, x0_clip
        self.inp = nn.Linear(obs_dim + act_dim + 2 * emb_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.out = nn.Linear(hidden, act_dim)
        for layer in [self.inp, *self.blocks, self.out]:
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
            nn.init.zeros_(layer.bias)
        for name, value in cosine_schedule(diffusion_steps).items():
            self.register_buffer(name, value.float(), persistent=False)

    def forward(self, obs, y, t, temperature):
        """(B, obs_dim), (B, D), (B, 1) -> (B, D)"""
        temperature_emb = sinusoidal_embedding(torch.full_like(t[:, 0], temperature), self.emb_dim)
        x = torch.cat([obs, y, sinusoidal_embedding(t[:, 0], self.emb_dim), temperature_emb], -1)
        return self.after_first_layer(self.inp(x))

    def after_first_layer(self, h):
        h = F.gelu(h, approximate="tanh")  # Flax's default GELU
        for block in self.blocks:
            h = h + F.gelu(block(h), approximate="tanh")
        return self.out(h)

    def input_weights(self):
        """The first layer's weight split by input: W_s, W_y, W_t, W_T."""
        return self.inp.weight.split([self.obs_dim, self.act_dim, self.emb_dim, self.emb_dim], dim=1)

    def state_term(self, obs, temperature):
        """W_s s + W_T emb(T) + b: the first layer's terms that depend on neither the particle nor the time."""
        w_s, _, _, w_temperature = self.input_weights()
        temperature_emb = sinusoidal_embedding(obs.new_full(obs.shape[:-1], temperature), self.emb_dim)
        return F.linear(obs, w_s, self.inp.bias) + F.linear(temperature_emb, w_temperature)

    def time_term(self, t):
        """W_t emb(t)."""
        return F.linear(sinusoidal_embedding(t, self.emb_dim), self.input_weights()[2])


def ddpm_sample(actor, obs, y, temperature, z=None):
    """Ancestral DDPM from x_{T_d-1} = y ~ N(0, I) down to the latent y1 (docs/rfm.md §11). obs (B, obs), y (B, N, D).

    x0_hat = (x - sigma_i eps)/alpha_i, clamped to +-x0_clip in latent space; x <- c1_i x0_hat + c2_i x + std_i z_i, z_i
    only for i > 0: drawn fresh, or z[:, i] of a given per-step noise z (B, T_d, N, D). At i = 0, c1 = 1 and c2 = 0:
    the result is the last clamped x0_hat, so every latent lies within +-x0_clip.
    """
    steps = actor.alpha.shape[0]
    w_y = actor.input_weights()[1]
    state_term = actor.state_term(obs, temperature)[:, None]  # (B, 1, H), shared by the N particles
    time_terms = actor.time_term(torch.arange(steps, device=y.device, dtype=y.dtype))  # (steps, H)
    for i in reversed(range(steps)):
        eps = actor.after_first_layer(F.linear(y, w_y) + (state_term + time_terms[i]))
        x0_hat = ((y - actor.sigma[i] * eps) / actor.alpha[i]).clamp(-actor.x0_clip, actor.x0_clip)
        y = actor.c1[i] * x0_hat + actor.c2[i] * y
        if i > 0:
            y = y + actor.std[i] * (torch.randn_like(y) if z is None else z[:, i])
    return y


def sample_particles(actor, qf, obs, noise, args, z=None):
    """N particles per state through the policy's sampler, scored by the online min-Q. obs (B, obs), noise (B, N, D)."""
    B, N, D = noise.shape
    y = ddpm_sample(actor, obs, noise, args.temperature, z)
    q = qf.min_q(obs[:, None].expand(-1, N, -1).reshape(B * N, -1), torch.tanh(y).reshape(B * N, D))
    return y, q.view(B, N)


def boltzmann_pick(y, q, temperature):
    """One particle per state drawn from softmax_n(Q/T), no Jacobian term (docs/rfm.md §7.1), by Gumbel-max:
    argmax_n(Q_n/T + G_n), G = -log E, E ~ Exp(1); unlike torch.multinomial, no host sync. Returns its latent."""
    idx = (q / temperature - torch.empty_like(q).exponential_().log()).argmax(1)
    return y[torch.arange(y.shape[0], device=y.device), idx]


def posterior_noise(q_fn, obs, x_t, alpha, sigma, num_samples, temperature, estimator, cv_ridge, cv_clip):
    """Estimate E[eps | x_t] under p1(y|s) ∝ exp(Q(s, tanh y)/T) prod sech^2(y) on the VP path (docs/rfm.md §11, §3-6).

    obs (B, obs_dim), x_t = alpha y1 + sigma eps (B, D), alpha, sigma (B, 1); q_fn(obs (M, obs_dim), actions (M, D)) ->
    (M,) or (M, 1). Returns eps_hat (B, D) and info {ess (B,), cv_weight (B, D)}.
    """
    B, D = x_t.shape
    K = num_samples  # (docs/rfm.md §3)
    alpha_k, sigma_k = alpha[:, None], sigma[:, None]  # (B, 1, 1), broadcast over the K proposals
    eps_k = torch.randn(B, K, D, device=x_t.device, dtype=x_t.dtype)
    y1k = (x_t[:, None] - sigma_k * eps_k) / alpha_k  # reverse proposals ~ N(x_t/alpha, (sigma/alpha)^2 I), (B, K, D)
    need_grad = estimator != "noise"  # lambda = 0 never touches the score
    obs_k = obs[:, None].expand(-1, K, -1).reshape(B * K, -1)
    with torch.enable_grad():  # the caller may run under no_grad; the score needs dQ/dy
        y1k_leaf = y1k.detach().requires_grad_(need_grad)
        q = q_fn(obs_k, torch.tanh(y1k_leaf).reshape(B * K, D)).reshape(B, K)
        grad_q = torch.autograd.grad(q.sum(), y1k_leaf)[0] if need_grad else None
    q = q.detach()
    log_sech2 = -2.0 * (torch.logaddexp(y1k, -y1k) - math.log(2.0))  # tanh Jacobian, stable form (docs/rfm.md §1)
    w = torch.softmax(q / temperature + log_sech2.sum(-1), dim=1)[..., None]  # (B, K, 1)
    eps_bar = (w * eps_k).sum(1)
    if need_grad:
        g = grad_q / temperature - 2.0 * torch.tanh(y1k)  # grad_y log p1 (docs/rfm.md §1)
        sk = g + alpha_k / sigma_k * eps_k  # posterior score in y1, zero posterior mean (docs/rfm.md §11)
        s_bar = (w * sk).sum(1)
    if estimator == "noise":
        lam = torch.zeros_like(y1k[:, 0])
    elif estimator == "gradient":
        lam = (sigma / alpha).square().expand(B, D)
    elif estimator == "stein":  # variance-minimising per-dimension plug-in on (y1, score) (docs/rfm.md §6)
        w2 = w.square()
        dy, ds = y1k - (w * y1k).sum(1, keepdim=True), sk - s_bar[:, None]
        lam = (-(w2 * dy * ds).sum(1) / ((w2 * ds.square()).sum(1) + cv_ridge)).clamp(-cv_clip, cv_clip)
    eps_hat = eps_bar - alpha / sigma * lam * s_bar if need_grad else eps_bar
    ess = 1.0 / w.squeeze(-1).square().sum(1)
    return eps_hat.detach(), {"ess": ess, "cv_weight": lam}


def soft_update(target, online, tau):
    with torch.no_grad():
        for tp, p in zip(target.parameters(), online.parameters()):
            tp.lerp_(p, tau)


def update(batch, actor, qf, qf_target, actor_optimizer, q_optimizer, args, sample=sample_particles,
           posterior=posterior_noise):
    """One RFM update (docs/rfm.md §7.2, the pseudocode at the top of this file). `sample` and `posterior` are
    sample_particles and posterior_noise or their compiled versions; returns diagnostics as device tensors (no sync)."""
    B, D = batch.actions.shape
    # on-policy y1 at s and next actions a' at s', Boltzmann-resampled with the pre-update critic, one sampler call
    with torch.no_grad():
        obs_and_next_obs = torch.cat([batch.obs, batch.next_obs])
        noise = torch.randn(2 * B, args.num_particles, D, device=batch.obs.device)
        y, q = sample(actor, qf, obs_and_next_obs, noise, args)
        y1, next_y = boltzmann_pick(y, q, args.temperature).split(B)
        next_q = qf_target.min_q(batch.next_obs, torch.tanh(next_y))
        target_q = batch.rewards + (1 - batch.dones) * args.gamma * next_q  # no entropy term

    # critic: each member has its own MSE and its own grad-norm clip, as if trained alone (the official update is
    # vmapped over members); Adam is elementwise, so one optimizer over both is the same as one per member
    qs = qf(batch.obs, batch.actions)
    qf1_loss, qf2_loss = F.mse_loss(qs[0], target_q), F.mse_loss(qs[1], target_q)
    qf_loss = (qf1_loss + qf2_loss) / 2  # logged as the mean (as CleanRL does)
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()  # the sum: member j's weights get the gradient of its own loss, unscaled
    for member in qf.members:
        nn.utils.clip_grad_norm_(member.parameters(), args.max_grad_norm)
    q_optimizer.step()

    # posterior target with the just-updated critic, then noise regression (docs/rfm.md §11)
    i = torch.randint(0, args.diffusion_steps, (B, 1), device=y1.device)
    alpha, sigma = actor.alpha[i], actor.sigma[i]  # (B, 1)
    x_t = alpha * y1 + sigma * torch.randn_like(y1)
    eps_hat, info = posterior(
        qf.min_q, batch.obs, x_t, alpha, sigma, num_samples=args.num_posterior_samples, temperature=args.temperature,
        estimator=args.estimator, cv_ridge=args.cv_ridge, cv_clip=args.cv_clip,
    )  # fmt: skip
    actor_loss = F.mse_loss(actor(batch.obs, x_t, i.to(x_t.dtype), args.temperature), eps_hat)
    actor_optimizer.zero_grad()
    actor_loss.backward()
    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    actor_optimizer.step()

    # update the target networks
    soft_update(qf_target, qf, args.tau)
    return {
        "losses/qf1_values": qs[0].mean(), "losses/qf2_values": qs[1].mean(),
        "losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss, "losses/qf_loss": qf_loss,
        "losses/actor_loss": actor_loss, "rfm/ess": info["ess"].mean(), "rfm/cv_weight": info["cv_weight"].mean(),
        "rfm/q_mean": q.mean(), "rfm/q_std": q.std(),  # pooled over the 2B states' particles
    }  # fmt: skip


def act(actor, qf, obs, args, sample=sample_particles):
    """Behaviour action: Boltzmann resampling among N particles (docs/rfm.md §7.1). obs (E, obs) -> (E, D) in [-1, 1]."""
    noise = torch.randn(obs.shape[0], args.num_particles, actor.act_dim, device=obs.device)
    y, q = sample(actor, qf, obs, noise, args)
    return torch.tanh(boltzmann_pick(y, q, args.temperature))


def state_noise(obs, shape, seed):
    """N(0, I) noise of shape (E, *shape) that is a deterministic function of each observation and the seed: one
    generator per state, seeded by a hash of the observation's bytes. Evaluation is then reproducible, and different
    states get independent draws. obs (E, obs_dim)."""
    keys = [hashlib.blake2b(row.tobytes(), digest_size=8, key=str(seed).encode()).digest() for row in obs.cpu().numpy()]
    gens = [torch.Generator().manual_seed(int.from_bytes(k, "little")) for k in keys]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(obs.device)


def act_eval(actor, qf, obs, args, sample=sample_particles):
    """Deterministic action: the argmax-Q particle, its initial and per-step noise a function of the state (docs/rfm.md
    §7.1; ancestral DDPM with fixed noise, not DDIM: more robust to eps errors). Slot 0 of z is the initial noise."""
    z = state_noise(obs, (args.diffusion_steps, args.num_particles, actor.act_dim), args.seed)
    y, q = sample(actor, qf, obs, z[:, 0], args, z)
    return torch.tanh(y[torch.arange(y.shape[0], device=y.device), q.argmax(1)])


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


def in_state_chunks(fn, states):
    """fn (the sampler or the posterior estimator) run on `states` states at a time, CPU only (docs/speed.md). Each
    state's outputs depend on its own inputs alone, so this is the same function, its activations small enough to stay
    in cache: tensor arguments are split along their first (state) dimension, fresh draws are made chunk by chunk."""

    def chunked(*inputs, **options):
        n = next(x for x in inputs if torch.is_tensor(x)).shape[0]
        parts = [fn(*(x[i : i + states] if torch.is_tensor(x) else x for x in inputs), **options)
                 for i in range(0, n, states)]  # fmt: skip
        return tuple(join(outputs) for outputs in zip(*parts))

    def join(xs):  # the chunks' outputs, tensors or dicts of tensors, concatenated along the states
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.cat(xs)

    return chunked


# input checks: one `error:` line and exit 1 before training, never a silent wrong run
def check_args(args):
    at_least = {1: ["total_timesteps", "buffer_size", "batch_size", "eval_every", "eval_episodes", "diffusion_steps",
                    "num_particles", "num_posterior_samples"],
                0: ["learning_starts", "checkpoint_every", "cv_ridge", "cv_clip"]}  # fmt: skip
    problems = [f"--{k.replace('_', '-')} must be >= {bound}" for bound, keys in at_least.items() for k in keys
                if not getattr(args, k) >= bound]  # fmt: skip
    problems += [msg for bad, msg in [
        (args.eval_only is not None and args.resume is not None, "--eval-only PATH and --resume exclude each other"),
        (not 0.0 <= args.gamma <= 1.0, "--gamma must be in [0, 1]"),
        (not 0.0 < args.tau <= 1.0, "--tau must be in (0, 1]"),
        (args.policy_lr <= 0 or args.q_lr <= 0, "--policy-lr and --q-lr must be > 0"),
        (args.max_grad_norm <= 0, "--max-grad-norm must be > 0"),
        (not args.temperature > 0, "--temperature must be > 0"),
        (not args.x0_clip > 0, "--x0-clip must be > 0"),
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
    env_name = args.env_id.replace("/", "_").replace(":", "_")
    run_name = f"{env_name}__{args.exp_name}-{args.estimator}__{args.seed}__{int(time.time())}"  # variants apart
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
    torch.backends.cuda.matmul.allow_tf32 = True  # CUDA only; the official JAX code runs at XLA's default TF32

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

    actor = NoiseNet(obs_dim, act_dim, args.diffusion_steps, x0_clip=args.x0_clip).to(device)
    qf = TwinQ(obs_dim, act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_optimizer = optim.Adam(actor.parameters(), lr=args.policy_lr)
    q_optimizer = optim.Adam(qf.parameters(), lr=args.q_lr)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    stateful = dict(actor=actor, qf=qf, qf_target=qf_target, actor_optimizer=actor_optimizer, q_optimizer=q_optimizer,
                    rb=rb)  # all a checkpoint restores
    # --compile: the particle sampler (most of an update) and the posterior estimator, its ∇Q in the same graph
    sample = compiled(sample_particles, device) if args.compile else sample_particles
    posterior = compiled(posterior_noise, device) if args.compile else posterior_noise
    if device.type == "cpu":  # CPU only: 32 states at a time, their activations in cache (docs/speed.md)
        sample, posterior = in_state_chunks(sample, 32), in_state_chunks(posterior, 32)
    policy_eval = functools.partial(act_eval, actor, qf, args=args, sample=sample)  # obs -> deterministic action

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
        rb.add(obs, real_next_obs, norm_actions, rewards, terminations)
        obs = next_obs  # TRY NOT TO MODIFY: CRUCIAL step easy to overlook

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts:
            if global_step == first_update:
                update_start_time = time.time()
            batch = rb.sample(args.batch_size)
            logs = update(batch, actor, qf, qf_target, actor_optimizer, q_optimizer, args, sample, posterior)
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
                writer.add_scalar("charts/temperature", args.temperature, global_step)
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
