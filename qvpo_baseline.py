# QVPO (Ding et al., NeurIPS 2024, arXiv 2405.16173) as wadx2019/qvpo runs it (--weighted --aug); spec: baselines §0-1
import copy
import logging
import math
import os
import random
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
    """if toggled, the DDPM sampler is compiled with torch.compile"""

    # Algorithm specific arguments
    env_id: str = "dm_control/cheetah-run-v0"
    """the id of the environment (gymnasium id, `dm_control/<domain>-<task>-v0`, or `module:Env-v0`)"""
    total_timesteps: int = 1_000_000
    """total timesteps of the experiments"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient (critic and actor, every step)"""
    batch_size: int = 256
    """the batch size of sample from the replay memory (critic batch and the independent policy batch)"""
    learning_starts: int = 10_000
    """timestep to start learning (uniform random actions before)"""
    eval_every: int = 10_000
    """evaluate the policy every this many env steps (and at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, one per vectorised eval env seeded 0..eval_episodes-1"""
    policy_lr: float = 1e-4
    """the learning rate of the diffusion policy optimizer"""
    q_lr: float = 3e-4
    """the learning rate of the Q network optimizer"""
    max_grad_norm: float = 2.0
    """global gradient-norm clip of both the actor and the critic"""
    diffusion_steps: int = 20
    """DDPM steps T of the cosine-schedule policy (spec §1.1)"""
    num_action_samples: int = 64
    """actions N_d sampled per policy-batch state; the best one is kept (spec §1.2)"""
    num_entropy_samples: int = 10
    """uniform actions N_e per policy-batch state in the entropy term (spec §1.2)"""
    behavior_samples: int = 4
    """samples K_b per state for the behaviour action, argmax of the current min-Q (spec §1.3)"""
    target_samples: int = 4
    """samples K_t per next state from the target actor, argmax of the target min-Q (spec §1.2)"""
    eval_samples: int = 32
    """samples per state for the evaluation action, argmax of the current min-Q (spec §1.3)"""
    entropy_alpha: float = 0.02
    """initial weight of the uniform entropy rows, decayed linearly over total_timesteps to --entropy-alpha-min.
    0 turns the entropy term off as the official code does: the uniform rows are then dropped, not kept with weight 0,
    so the policy loss is the weighted eps-MSE over the best actions only (not diluted by 1 + N_e). The official rule
    adds the rows while the current weight is > 0; as the floor is capped at this value and the decay stays > 0
    before total_timesteps, that is exactly when --entropy-alpha > 0"""
    entropy_alpha_min: float = 0.002
    """floor of the entropy weight, capped at --entropy-alpha as officially (so --entropy-alpha 0 alone gives 0)"""
    timeout_as_terminal: bool = False
    """if toggled, time-limit truncation is terminal as in the official code (default: bootstrap through it)"""


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
            (args.num_action_samples < 1, "--num-action-samples must be >= 1"),
            (args.num_entropy_samples < 0, "--num-entropy-samples must be >= 0"),
            (args.behavior_samples < 1, "--behavior-samples must be >= 1"),
            (args.target_samples < 1, "--target-samples must be >= 1"),
            (args.eval_samples < 1, "--eval-samples must be >= 1"),
            (not args.entropy_alpha >= 0, "--entropy-alpha must be >= 0"),
            (not args.entropy_alpha_min >= 0, "--entropy-alpha-min must be >= 0"),
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


def mish(x):
    """Mish(x) = x tanh(softplus(x)) = x n / (n + 2) with n = e^x (e^x + 2), exact; the exponent is clamped at 20,
    where n / (n + 2) is 1 in float32. Without autograd ~3x faster than F.mish on CPU (L2-sized); with it, F.mish."""
    if x.requires_grad and torch.is_grad_enabled():
        return F.mish(x)
    e = x.clamp(max=20.0).exp_()
    n = (e + 2.0).mul_(e)
    return n.div_(n + 2.0).mul_(x)


class Mish(nn.Module):
    def forward(self, x):
        return mish(x)


def init_linear_layers(module):
    """Every Linear: untruncated N(0, (1 / (2 sqrt(fan_in)))^2) weights, zero bias, the official init's effect (spec §0)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=1.0 / (2.0 * math.sqrt(layer.in_features)))
            nn.init.zeros_(layer.bias)


class TwinQ(nn.Module):
    """Two Q-networks [s, a] -> 256 -> 256 -> 256 -> 1 (Mish); min over members is used everywhere (spec §0)."""

    def __init__(self, obs_dim, act_dim, hidden=256, members=2):
        super().__init__()
        self.members = nn.ModuleList(
            nn.Sequential(
                nn.Linear(obs_dim + act_dim, hidden), Mish(), nn.Linear(hidden, hidden), Mish(),
                nn.Linear(hidden, hidden), Mish(), nn.Linear(hidden, 1),
            )  # fmt: skip
            for _ in range(members)
        )
        init_linear_layers(self)

    def forward(self, obs, act):
        """(M, obs_dim), (M, act_dim) -> (members, M)"""
        x = torch.cat([obs, act], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.members])

    def min_q(self, obs, act):
        return self.forward(obs, act).min(0).values


def sinusoidal_embedding(x, dim=32, max_period=1e4):
    """[sin(x f_j), cos(x f_j)] with f_j = exp(-ln(max_period) j / (dim/2 - 1)) (spec §0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=x.dtype) / (half - 1))
    arg = x[..., None] * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def cosine_beta_schedule(steps, s=0.008):
    """beta_i = clip(1 - f(i+1) / f(i), 0, 0.999), f(u) = cos^2((u/T + s) / (1 + s) pi/2), u = 0..T (spec §0); float64."""
    f = np.cos((np.arange(steps + 1, dtype=np.float64) / steps + s) / (1 + s) * np.pi / 2) ** 2
    return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)


def ddpm_coefficients(betas):
    """Noising and posterior coefficients of the DDPM (spec §0), float64, indexed by the step i = 0..T-1."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "sqrt_abar": np.sqrt(abar),  # x_i = sqrt_abar a + sqrt_1m_abar eps
        "sqrt_1m_abar": np.sqrt(1.0 - abar),
        "recip": np.sqrt(1.0 / abar),  # x0_hat = recip x_i - recipm1 eps
        "recipm1": np.sqrt(1.0 / abar - 1.0),
        "c1": betas * np.sqrt(abar_prev) / (1.0 - abar),  # posterior mean = c1 x0_hat + c2 x_i
        "c2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        "sigma": np.exp(0.5 * np.log(np.maximum(posterior_var, 1e-20))),  # log variance clamped at log(1e-20)
    }


class Denoiser(nn.Module):
    """eps_theta(x_i, i, s): [x, t_emb(i), s] -> 256 -> 256 -> 256 -> D with Mish, where t_emb of the integer step i is
    sinusoid_32 -> Linear(32, 256) -> Mish -> Linear(256, 32); carries its cosine DDPM schedule of T steps (spec §0).

    The first layer is split by input so that the sampler computes the state term (W_s s + b, once per state) and the
    step term (W_t t_emb(i), once per step) once, not per sample (exact: a Linear of a concatenation is a sum).
    """

    def __init__(self, obs_dim, act_dim, diffusion_steps=20, hidden=256, t_dim=32):
        super().__init__()
        self.obs_dim, self.act_dim, self.t_dim, self.steps = obs_dim, act_dim, t_dim, diffusion_steps
        self.time_mlp = nn.Sequential(nn.Linear(t_dim, hidden), Mish(), nn.Linear(hidden, t_dim))
        self.inp = nn.Linear(act_dim + t_dim + obs_dim, hidden)
        self.mid = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.out = nn.Linear(hidden, act_dim)
        init_linear_layers(self)
        coef = ddpm_coefficients(cosine_beta_schedule(diffusion_steps))
        self.coef = {k: v.tolist() for k, v in coef.items()}  # Python floats for the sampler
        for k in ("sqrt_abar", "sqrt_1m_abar"):  # tensors for the training loss
            self.register_buffer(k, torch.tensor(coef[k], dtype=torch.float32), persistent=False)

    def split_input_weight(self):
        return self.inp.weight.split([self.act_dim, self.t_dim, self.obs_dim], dim=1)

    def time_embedding(self, i):
        return self.time_mlp(sinusoidal_embedding(i.float(), self.t_dim))

    def condition(self, obs):
        """Sample- and step-independent part of the first layer: W_s s + b."""
        return F.linear(obs, self.split_input_weight()[2], self.inp.bias)

    def step_terms(self):
        """W_t t_emb(i) for every step i = 0..T-1, (T, H)."""
        i = torch.arange(self.steps, device=self.inp.weight.device)
        return F.linear(self.time_embedding(i), self.split_input_weight()[1])

    def forward(self, obs, x, i):
        """(B, obs_dim), (B, D), (B,) integer steps -> predicted noise (B, D), the unsplit form."""
        h = mish(self.inp(torch.cat([x, self.time_embedding(i), obs], -1)))
        for layer in self.mid:
            h = mish(layer(h))
        return self.out(h)


def ddpm_sample(actor, obs, x, noise):
    """Reverse DDPM chain for i = T-1..0 (spec §0): x0_hat = clamp(recip_i x - recipm1_i eps_theta, -1, 1),
    x <- c1_i x0_hat + c2_i x + 1[i > 0] sigma_i z_i; the final x is clamped to [-1, 1]; noise_ratio 1.

    obs (B, obs_dim), x (B, N, D) the initial N(0, I) draw, noise (T, B, N, D) the z_i (noise[0] unused).
    """
    c = actor.coef
    B, N, D = x.shape
    cond = actor.condition(obs).repeat_interleave(N, 0)  # (B N, H), one row per sample
    step_terms = actor.step_terms()  # (T, H)
    # (in, out)-contiguous weights and addmm: the trunk of actor.head with fewer kernel launches (acting is batch 4)
    w_x = actor.split_input_weight()[0].t().contiguous()
    (w2, b2), (w3, b3), (w4, b4) = [(layer.weight.t().contiguous(), layer.bias) for layer in (*actor.mid, actor.out)]
    x = x.reshape(B * N, D)
    for i in reversed(range(actor.steps)):
        h = mish(torch.addmm(cond, x, w_x).add_(step_terms[i]))
        h = mish(torch.addmm(b2, h, w2))
        h = mish(torch.addmm(b3, h, w3))
        eps = torch.addmm(b4, h, w4)
        x0 = torch.sub(x * c["recip"][i], eps, alpha=c["recipm1"][i]).clamp_(-1.0, 1.0)
        x = x0.mul_(c["c1"][i]).add_(x, alpha=c["c2"][i])
        if i > 0:
            x.add_(noise[i].reshape(B * N, D), alpha=c["sigma"][i])
    return x.clamp_(-1.0, 1.0).view(B, N, D)


CPU_CHUNK_ROWS = 512  # samples per sampler chunk on CPU: 512 x 256 activations stay in L2 (2x faster than one chunk)


@torch.no_grad()
def best_of_k(actor, qf, obs, k):
    """k samples per state from actor (noise 1), scored by qf.min_q; returns the argmax action (B, D) in [-1, 1] and
    all the scores (B, k) (spec §1.2-1.3). On CPU the states are processed in chunks of CPU_CHUNK_ROWS samples."""
    B, D = obs.shape[0], actor.act_dim
    per_chunk = max(1, CPU_CHUNK_ROWS // k) if obs.device.type == "cpu" else B
    best, scores = [], []
    for o in obs.split(per_chunk):
        b = o.shape[0]
        x = torch.randn(b, k, D, device=o.device)
        a = ddpm_sample(actor, o, x, torch.randn(actor.steps, b, k, D, device=o.device))
        q = qf.min_q(o[:, None].expand(b, k, o.shape[-1]).reshape(b * k, -1), a.reshape(b * k, D)).view(b, k)
        best.append(a[torch.arange(b, device=o.device), q.argmax(1)])
        scores.append(q)
    return torch.cat(best), torch.cat(scores)


def qadv_weight(q):
    """qadv: w(s) = max(max_n q - mean_n q, 0), raw Q units, not normalised (spec §1.2). q (B, N) -> (B,)"""
    return (q.max(1).values - q.mean(1)).clamp(min=0.0)


def entropy_coef(step, total_timesteps, alpha, alpha_min):
    """alpha_ent = min(alpha, max(alpha_min, alpha (1 - step / total_timesteps))), the official schedule: a linear
    decay to the floor alpha_min, never above alpha (so 0 when alpha is 0, and constant alpha if alpha < alpha_min)."""
    return min(alpha, max(alpha_min, alpha * (1.0 - step / total_timesteps)))


def weighted_eps_loss(actor, obs, actions, weights, i=None, noise=None):
    """Weighted eps-MSE (spec §0): per row i ~ U{0..T-1}, eps ~ N(0, I), x_i = sqrt(abar_i) a + sqrt(1 - abar_i) eps;
    the mean over all rows and dims of w (eps_theta(x_i, i, s) - eps)^2. obs (N, obs_dim), actions (N, D), weights (N,)."""
    if i is None:
        i = torch.randint(0, actor.steps, (actions.shape[0],), device=actions.device)
    if noise is None:
        noise = torch.randn_like(actions)
    x = actor.sqrt_abar[i, None] * actions + actor.sqrt_1m_abar[i, None] * noise
    return (weights[:, None] * (actor(obs, x, i) - noise).square()).mean()


def policy_rows(obs, best, weight, num_uniform, entropy_alpha):
    """Rows of the policy loss (spec §1.2): each state's best action with weight w(s), then num_uniform U(-1, 1)^D
    actions per state with weight entropy_alpha w(s). Returns (obs, actions, weights) of B (1 + num_uniform) rows.
    With entropy_alpha 0 the uniform rows are left out (B rows), as the official code adds them only when its
    entropy weight is > 0: zero-weight rows would otherwise still count in the loss mean and dilute it."""
    if not entropy_alpha > 0:
        return obs, best, weight
    B, D = best.shape
    uniform = torch.rand(B * num_uniform, D, device=best.device) * 2 - 1
    return (
        torch.cat([obs, obs.repeat_interleave(num_uniform, 0)]),
        torch.cat([best, uniform]),
        torch.cat([weight, (entropy_alpha * weight).repeat_interleave(num_uniform)]),
    )


def soft_update(target, online, tau):
    with torch.no_grad():
        for tp, p in zip(target.parameters(), online.parameters()):
            tp.lerp_(p, tau)


def update(batch, policy_obs, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, entropy_alpha, args):
    """One QVPO iteration (spec §1.2): critic on batch, then the policy on the states of a second, independent batch.
    Returns device tensors of diagnostics."""
    obs, actions, rewards, next_obs, dones = batch
    # critic target: best of K_t target-actor samples under the target min-Q
    with torch.no_grad():
        _, next_q = best_of_k(actor_target, qf_target, next_obs, args.target_samples)
        target_q = rewards.flatten() + (1 - dones.flatten()) * args.gamma * next_q.max(1).values  # no entropy term

    # critic: the gradient is that of MSE(Q1, y) + MSE(Q2, y); qf_loss logs their mean as CleanRL does
    qs = qf(obs, actions)
    qf1_loss, qf2_loss = F.mse_loss(qs[0], target_q), F.mse_loss(qs[1], target_q)
    qf_loss = (qf1_loss + qf2_loss) / 2
    q_optimizer.zero_grad()
    (qf1_loss + qf2_loss).backward()
    nn.utils.clip_grad_norm_(qf.parameters(), args.max_grad_norm)
    q_optimizer.step()

    # policy: best of N_d current-actor samples under the just-updated critic, qadv-weighted, plus the entropy rows
    best, q = best_of_k(actor, qf, policy_obs, args.num_action_samples)
    weight = qadv_weight(q)
    rows = policy_rows(policy_obs, best, weight, args.num_entropy_samples, entropy_alpha)
    actor_loss = weighted_eps_loss(actor, *rows)
    actor_optimizer.zero_grad()
    actor_loss.backward()
    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
    actor_optimizer.step()

    # update the target networks
    soft_update(qf_target, qf, args.tau)
    soft_update(actor_target, actor, args.tau)
    return {
        "losses/qf1_values": qs[0].mean(), "losses/qf2_values": qs[1].mean(),
        "losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss, "losses/qf_loss": qf_loss,
        "losses/actor_loss": actor_loss, "qvpo/weight_mean": weight.mean(),
    }  # fmt: skip


def act(actor, qf, obs, args):
    """Behaviour action: best of K_b samples under the current min-Q (spec §1.3). obs (E, obs_dim) -> (E, D) in [-1, 1]."""
    return best_of_k(actor, qf, obs, args.behavior_samples)[0]


def act_eval(actor, qf, obs, args):
    """Evaluation action: best of 32 samples with sampling noise under the current min-Q, as officially (spec §1.3)."""
    return best_of_k(actor, qf, obs, args.eval_samples)[0]


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
    args = tyro.cli(Args)
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

    actor = Denoiser(obs_dim, act_dim, args.diffusion_steps).to(device)
    actor_target = copy.deepcopy(actor)
    qf = TwinQ(obs_dim, act_dim).to(device)
    qf_target = copy.deepcopy(qf)
    actor_optimizer = optim.Adam(actor.parameters(), lr=args.policy_lr, eps=1e-5)
    q_optimizer = optim.Adam(qf.parameters(), lr=args.q_lr, eps=1e-5)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    if args.compile:  # the 20-step chains are most of an update; compiling fuses their elementwise work
        ddpm_sample = torch.compile(ddpm_sample)

    def policy_eval(o):
        return act_eval(actor, qf, o, args)

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
                norm = act(actor, qf, torch.as_tensor(obs, dtype=torch.float32, device=device), args)
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

        # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
        obs = next_obs

        # ALGO LOGIC: training.
        if global_step >= args.learning_starts:
            alpha = entropy_coef(global_step, args.total_timesteps, args.entropy_alpha, args.entropy_alpha_min)
            logs = update(
                rb.sample(args.batch_size), rb.sample(args.batch_size)[0],
                actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, alpha, args,
            )  # fmt: skip
            losses = {k: v for k, v in logs.items() if k.startswith("losses/")}
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            if bad:
                raise SystemExit(f"error: non-finite {', '.join(bad)} at step {global_step}")
            if global_step % 100 == 0:
                for k, v in logs.items():
                    writer.add_scalar(k, v.item(), global_step)
                writer.add_scalar("qvpo/entropy_alpha", alpha, global_step)
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
