"""rfm_diffusion.py: the epsilon-estimator family against exact posterior means, the cosine schedule, the DDPM
sampler, end-to-end runs, bad input, and (slow) learning on a one-step bandit."""

import math

import numpy as np
import pytest
import torch

import rfm_diffusion as rd
from tests.conftest import BANDIT, assert_one_line_error, read_scalars

SCRIPT = "rfm_diffusion.py"
TD = 20  # default --diffusion-steps
C = np.array([0.3, -0.5])  # Q(a) = -4 ||a - c||^2 (docs/rfm.md §12)
TEMP = 0.5
GRID = np.linspace(-12.0, 12.0, 200_001)
HIGH_SNR, MID_SNR, NOISIEST = [0, 2, 5], 10, TD - 1


def q_toy(obs, a):
    return -4.0 * (a - torch.as_tensor(C, dtype=a.dtype)).square().sum(-1)


def log_p1_1d(y, c):
    """Per-dimension log p1 of the tanh-squashed Boltzmann target, unnormalised (docs/rfm.md §1)."""
    log_sech2 = -2.0 * (np.abs(y) + np.log1p(np.exp(-2.0 * np.abs(y))) - math.log(2.0))
    return -4.0 * (np.tanh(y) - c) ** 2 / TEMP + log_sech2


def exact_eps(x, alpha, sigma):
    """E[eps | x] = (x - alpha E[y1 | x]) / sigma by 1-D grid integration per dimension (the target is separable).
    x (n, 2), alpha, sigma (n,)."""
    out = np.empty_like(x)
    for d in range(2):
        lp = log_p1_1d(GRID, C[d])[None] - (x[:, d : d + 1] - alpha[:, None] * GRID[None]) ** 2 / (2 * sigma[:, None] ** 2)
        w = np.exp(lp - lp.max(1, keepdims=True))
        out[:, d] = (x[:, d] - alpha * (w @ GRID) / w.sum(1)) / sigma
    return out


def draw_x(indices, n, seed):
    """n points x_i ~ p_i (y1 ~ p1 by inverse-CDF on the grid) for each index; returns x, alpha, sigma, exact E[eps|x]."""
    rng = np.random.default_rng(seed)
    sched = rd.cosine_schedule(TD)
    idx = np.repeat(indices, n)
    alpha, sigma = sched["alpha"].numpy()[idx], sched["sigma"].numpy()[idx]
    y1 = np.empty((len(idx), 2))
    for d in range(2):
        p = np.exp(log_p1_1d(GRID, C[d]) - log_p1_1d(GRID, C[d]).max())
        cdf = np.cumsum(p) / p.sum()
        y1[:, d] = np.interp(rng.uniform(size=len(idx)), cdf, GRID)
    x = alpha[:, None] * y1 + sigma[:, None] * rng.standard_normal(y1.shape)
    return x, alpha, sigma, exact_eps(x, alpha, sigma)


def estimate(x, alpha, sigma, K, estimator, seed=0, repeats=1, cv_clip=2.0):
    """posterior_noise in float64 on every row of x repeated `repeats` times -> (n, repeats, 2), info."""
    t = lambda v: torch.as_tensor(np.repeat(v, repeats, 0), dtype=torch.float64)  # noqa: E731
    xt, a, s = t(x), t(alpha)[:, None], t(sigma)[:, None]
    torch.manual_seed(seed)
    eps_hat, info = rd.posterior_noise(q_toy, torch.zeros(len(xt), 1, dtype=torch.float64), xt, a, s, K, TEMP, estimator,
                                       1e-4, cv_clip)  # fmt: skip
    return eps_hat.numpy().reshape(len(x), repeats, 2), info


# ---------------------------------------------------------------- the estimator family (docs/rfm.md §11, §3-6)


@pytest.mark.parametrize(
    "estimator,indices", [("noise", [*HIGH_SNR, MID_SNR, NOISIEST]), ("stein", [*HIGH_SNR, MID_SNR, NOISIEST]),
                          ("gradient", HIGH_SNR)],
)  # fmt: skip
def test_estimators_converge_to_exact_posterior_noise(estimator, indices):
    x, alpha, sigma, exact = draw_x(indices, 6, seed=1)
    err = {K: np.abs(estimate(x, alpha, sigma, K, estimator, seed=2)[0][:, 0] - exact) for K in (300, 30_000)}
    assert err[30_000].max() < 0.1, err[30_000].max()
    assert (err[30_000] ** 2).mean() < (err[300] ** 2).mean() / 10


def closed_forms(x, alpha, sigma, K, seed):
    """Recompute the reverse samples, weights and scores of posterior_noise independently in float64 (numpy)."""
    torch.manual_seed(seed)
    eps = torch.randn(len(x), K, 2, dtype=torch.float64).numpy()  # the estimator's first random draw
    a, s = alpha[:, None, None], sigma[:, None, None]
    y1 = (x[:, None] - s * eps) / a
    th = np.tanh(y1)
    sech2 = 1.0 - th**2
    log_sech2 = -2.0 * (np.abs(y1) + np.log1p(np.exp(-2.0 * np.abs(y1))) - math.log(2.0))
    logits = -4.0 * ((th - C) ** 2).sum(-1) / TEMP + log_sech2.sum(-1)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w = (w / w.sum(1, keepdims=True))[..., None]
    g = -8.0 * (th - C) * sech2 / TEMP - 2.0 * th  # grad_y log p1
    score = g + a / s * eps
    return eps, y1, w, g, score


def plugin_lambda(y1, w, score, ridge=1e-4):
    """§6: -sum w^2 (y1 - ybar)(s - sbar) / (sum w^2 (s - sbar)^2 + ridge), per dimension, unclipped."""
    dy, ds = y1 - (w * y1).sum(1, keepdims=True), score - (w * score).sum(1, keepdims=True)
    return -(w**2 * dy * ds).sum(1) / ((w**2 * ds**2).sum(1) + ridge)


def test_estimators_equal_their_closed_forms_on_the_same_samples():
    x, alpha, sigma, _ = draw_x([0, 3, 8, 14, NOISIEST], 2, seed=3)
    K, seed = 64, 7
    eps, y1, w, g, score = closed_forms(x, alpha, sigma, K, seed)
    ne = (w * eps).sum(1)
    ge = -(sigma / alpha)[:, None] * (w * g).sum(1)
    got = {e: estimate(x, alpha, sigma, K, e, seed=seed) for e in ("noise", "gradient", "stein")}
    np.testing.assert_allclose(got["noise"][0][:, 0], ne, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["gradient"][0][:, 0], ge, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got["gradient"][1]["cv_weight"].numpy(), np.repeat((sigma / alpha)[:, None] ** 2, 2, 1),
                               rtol=1e-12)  # fmt: skip
    assert np.all(got["noise"][1]["cv_weight"].numpy() == 0)
    lam = np.clip(plugin_lambda(y1, w, score), -2.0, 2.0)
    np.testing.assert_allclose(got["stein"][1]["cv_weight"].numpy(), lam, rtol=1e-8, atol=1e-10)
    # the family is the line through NE (mu = 0) and GE (mu = 1), mu = lambda alpha^2 / sigma^2
    mu = lam * (alpha / sigma)[:, None] ** 2
    np.testing.assert_allclose(got["stein"][0][:, 0], (1 - mu) * ne + mu * ge, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got["stein"][1]["ess"].numpy(), 1.0 / (w[..., 0] ** 2).sum(1), rtol=1e-10)


def test_plugin_lambda_respects_the_clip():
    x, alpha, sigma, _ = draw_x([0, 6, 12, NOISIEST], 4, seed=4)
    K, seed, clip = 64, 5, 0.05
    _, y1, w, _, score = closed_forms(x, alpha, sigma, K, seed)
    raw = plugin_lambda(y1, w, score)
    assert (np.abs(raw) > clip).any() and (np.abs(raw) < clip).any()
    lam = estimate(x, alpha, sigma, K, "stein", seed=seed, cv_clip=clip)[1]["cv_weight"].numpy()
    assert np.abs(lam).max() <= clip
    np.testing.assert_allclose(lam, np.clip(raw, -clip, clip), rtol=1e-8, atol=1e-12)


def test_estimator_errors_by_snr():
    """K = 100, median over 16 x_t of the MSE over 200 replicates (docs/rfm.md §12 analogue): at high SNR the plug-in beats
    both special cases; at the noisiest index GE is useless while NE and the clipped plug-in stay fine."""
    indices = [0, 2, NOISIEST]
    x, alpha, sigma, exact = draw_x(indices, 16, seed=6)
    mse = {}
    for e in ("noise", "gradient", "stein"):
        est = estimate(x, alpha, sigma, 100, e, seed=8, repeats=200)[0]
        per_x = ((est - exact[:, None]) ** 2).sum(-1).mean(1)
        mse[e] = np.median(per_x.reshape(len(indices), -1), axis=1)
    for j in range(2):  # high SNR, alpha > 0.96
        assert mse["stein"][j] <= 0.2 * min(mse["noise"][j], mse["gradient"][j]), mse
    assert mse["gradient"][2] > 1e3 * mse["noise"][2], mse
    assert mse["stein"][2] <= 2 * mse["noise"][2], mse


# ---------------------------------------------------------------- schedule, networks, sampler


@pytest.mark.parametrize("steps", [1, 3, 20, 100])
def test_cosine_schedule(steps):
    s = 0.008
    u = np.arange(steps + 1)
    f = np.cos((u / steps + s) / (1 + s) * np.pi / 2) ** 2
    beta = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    alphabar = np.cumprod(1 - beta)
    prev = np.concatenate([[1.0], alphabar[:-1]])
    sched = {k: v.numpy() for k, v in rd.cosine_schedule(steps).items()}
    np.testing.assert_allclose(sched["beta"], beta, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sched["alphabar"], alphabar, rtol=1e-12)
    np.testing.assert_allclose(sched["alphabar"][:-1], f[1:-1] / f[0], rtol=1e-12)  # telescoping, before the clip
    assert sched["beta"][-1] == 0.999  # f(steps) ~ 0: the last beta is clipped
    np.testing.assert_allclose(sched["alpha"] ** 2 + sched["sigma"] ** 2, 1.0, rtol=1e-14)
    assert np.all(np.diff(sched["alpha"]) < 0) and np.all(np.diff(sched["sigma"]) > 0)
    np.testing.assert_allclose(sched["c1"], beta * np.sqrt(prev) / (1 - alphabar), rtol=1e-12)
    np.testing.assert_allclose(sched["c2"], (1 - prev) * np.sqrt(1 - beta) / (1 - alphabar), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sched["std"] ** 2, beta * (1 - prev) / (1 - alphabar), rtol=1e-12, atol=1e-15)
    assert sched["c1"][0] == pytest.approx(1.0) and sched["c2"][0] == 0 and sched["std"][0] == 0
    if steps == 20:  # docs/rfm.md §11: alpha ~ 2.5e-3 at the noisiest index
        assert sched["alpha"][-1] == pytest.approx(2.46e-3, rel=0.01)
    net = rd.NoiseNet(3, 2, steps)
    for k, v in sched.items():
        torch.testing.assert_close(getattr(net, k), torch.as_tensor(v, dtype=torch.float32))
    assert not any(k in net.state_dict() for k in sched)  # derived, not saved


def test_noise_net_matches_plain_mlp():
    torch.manual_seed(0)
    net = rd.NoiseNet(5, 3, TD)
    obs, x, i = torch.randn(7, 5), torch.randn(7, 3), torch.randint(0, TD, (7, 1)).float()
    inp = torch.cat([obs, x, rd.sinusoidal_embedding(i[:, 0]), rd.sinusoidal_embedding(torch.full((7,), 0.3))], -1)
    h = torch.nn.functional.gelu(net.inp(inp), approximate="tanh")
    for block in net.blocks:
        h = h + torch.nn.functional.gelu(block(h), approximate="tanh")
    torch.testing.assert_close(net(obs, x, i, 0.3), net.out(h))


def reference_sampler(net, obs, x, temperature, z):
    """DDPM ancestral sampling written out with the DDPM formulas and net.forward, float64, the x0 prediction
    clamped to +-net.x0_clip; the per-step noise of step i is z[:, i] when z (B, steps, N, D) is given."""
    steps = net.alpha.shape[0]
    sched = {k: v.numpy() for k, v in rd.cosine_schedule(steps).items()}
    abar = sched["alphabar"]
    B, N, D = x.shape
    obs_n = obs[:, None].expand(B, N, -1).reshape(B * N, -1)
    for i in reversed(range(steps)):
        prev = abar[i - 1] if i > 0 else 1.0
        beta = 1 - abar[i] / prev
        eps = net(obs_n, x.reshape(B * N, D), torch.full((B * N, 1), float(i), dtype=x.dtype), temperature).view(B, N, D)
        x0 = ((x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])).clamp(-net.x0_clip, net.x0_clip)
        x = beta * math.sqrt(prev) / (1 - abar[i]) * x0 + (1 - prev) * math.sqrt(1 - beta) / (1 - abar[i]) * x
        if i > 0:
            noise = torch.randn_like(x) if z is None else z[:, i]
            x = x + math.sqrt(beta * (1 - prev) / (1 - abar[i])) * noise
    return x


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("fixed_noise", [False, True])
@pytest.mark.parametrize("x0_clip", [math.inf, 0.5])
def test_sampler_matches_reference_ddpm(steps, fixed_noise, x0_clip):
    torch.manual_seed(0)
    net = rd.NoiseNet(4, 2, steps, x0_clip=x0_clip).double()
    for k, v in rd.cosine_schedule(steps).items():  # exact float64 coefficients instead of the float32 buffers
        setattr(net, k, v)
    obs, x = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    z = torch.randn(3, steps, 5, 2, dtype=torch.float64) if fixed_noise else None
    torch.manual_seed(1)
    got = rd.ddpm_sample(net, obs, x, 0.02, z)
    torch.manual_seed(1)
    want = reference_sampler(net, obs, x, 0.02, z)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_sampler_with_zero_network():
    """eps = 0: each ancestral step is x <- (c1/alpha + c2) x + sqrt(beta~) z, so the output is N(0, v) with v from the
    DDPM posterior-mean recursion; with given per-step noise, the output is a function of the inputs."""
    net = rd.NoiseNet(2, 2, TD, hidden=8, x0_clip=math.inf).double()
    torch.nn.init.zeros_(net.out.weight)
    torch.nn.init.zeros_(net.out.bias)
    for k, v in rd.cosine_schedule(TD).items():  # exact float64 coefficients instead of the float32 buffers
        setattr(net, k, v)
    sched = {k: v.numpy() for k, v in rd.cosine_schedule(TD).items()}
    v = 1.0
    for i in reversed(range(TD)):
        v = (sched["c1"][i] / sched["alpha"][i] + sched["c2"][i]) ** 2 * v + sched["std"][i] ** 2
    torch.manual_seed(0)
    noise = torch.randn(1, 40_000, 2, dtype=torch.float64)
    with torch.no_grad():
        y = rd.ddpm_sample(net, torch.zeros(1, 2, dtype=torch.float64), noise, 0.02)
        z = torch.randn(2, TD, 5, 2, dtype=torch.float64)
        fixed = [rd.ddpm_sample(net, torch.zeros(2, 2, dtype=torch.float64), noise[:, :5].expand(2, -1, -1), 0.02, z)
                 for _ in range(2)]  # fmt: skip
    assert abs(y.mean().item()) < 4 * math.sqrt(v / y.numel())
    assert y.var().item() == pytest.approx(v, rel=0.03)
    assert torch.equal(fixed[0], fixed[1]) and not torch.equal(fixed[0][0], fixed[0][1])


def test_sampler_clamps_the_x0_prediction():
    """A network that predicts eps = -100 makes every x0 prediction huge; the clamp keeps the latent output at
    +-x0_clip exactly (the last step returns the clamped x0 prediction itself: c1_0 = 1, c2_0 = 0)."""
    net = rd.NoiseNet(2, 2, TD, hidden=8, x0_clip=3.0).double()
    torch.nn.init.zeros_(net.out.weight)
    torch.nn.init.constant_(net.out.bias, -100.0)
    for k, v in rd.cosine_schedule(TD).items():
        setattr(net, k, v)
    with torch.no_grad():
        y = rd.ddpm_sample(net, torch.zeros(3, 2, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64), 0.02)
    torch.testing.assert_close(y, torch.full_like(y, 3.0))


def test_act_eval_is_deterministic_in_the_state():
    torch.manual_seed(0)
    args = rd.Args(num_particles=8, diffusion_steps=5)
    net, qf = rd.NoiseNet(3, 2, args.diffusion_steps), rd.TwinQ(3, 2)
    obs = torch.randn(4, 3)
    with torch.no_grad():
        a1 = rd.act_eval(net, qf, obs, args)
        torch.randn(100)  # other draws in between must not matter
        a2 = rd.act_eval(net, qf, obs, args)
        a3 = rd.act_eval(net, qf, obs[2:3], args)
        b = rd.act(net, qf, obs, args)
        # reference: initial noise z[:, 0] and per-step noise z[:, i] from the state, argmax of min-Q
        z = rd.state_noise(obs, (5, 8, 2), args.seed)
        y = rd.ddpm_sample(net, obs, z[:, 0], args.temperature, z)
        q = qf(obs.repeat_interleave(8, 0), torch.tanh(y).reshape(-1, 2)).min(0).values.view(4, 8)
    assert torch.equal(a1, a2)
    torch.testing.assert_close(a3[0], a1[2])
    torch.testing.assert_close(a1, torch.tanh(y[torch.arange(4), q.argmax(1)]))
    assert a1.shape == b.shape == (4, 2) and a1.abs().max() <= 1 and b.abs().max() <= 1


def test_update_recomputed_by_hand():
    """Replays update()'s random stream: critic TD target without entropy from Boltzmann-resampled a' (pre-update
    critic); actor loss = mean((eps_theta(x_i, i, s, T) - eps_hat)^2) with i ~ U{0..T_d-1}, x_i = alpha_i y1 + sigma_i eps
    and eps_hat from posterior_noise with the just-updated critic; Polyak on the target critic."""
    import copy

    torch.manual_seed(0)
    B, O, D = 16, 3, 2
    args = rd.Args(batch_size=B, num_particles=4, num_posterior_samples=8, diffusion_steps=6, gamma=0.9, tau=0.3,
                   q_lr=0.05)  # fmt: skip
    actor, qf = rd.NoiseNet(O, D, args.diffusion_steps), rd.TwinQ(O, D)
    actor.out.weight.data.mul_(0.01)  # eps ~ 0: unsaturated particles, so that the target depends on the critic
    qf_target = copy.deepcopy(qf)
    for p in qf_target.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    a_opt, q_opt = torch.optim.Adam(actor.parameters(), lr=1e-3), torch.optim.Adam(qf.parameters(), lr=args.q_lr)
    obs, next_obs = torch.randn(B, O), torch.randn(B, O)
    batch = rd.Batch(obs, torch.rand(B, D) * 2 - 1, torch.rand(B), next_obs, (torch.rand(B) < 0.3).float())
    actor_pre, qf_pre, target_pre = (copy.deepcopy(m) for m in (actor, qf, qf_target))
    torch.manual_seed(42)
    logs = rd.update(batch, actor, qf, qf_target, a_opt, q_opt, args)

    torch.manual_seed(42)
    with torch.no_grad():
        both = torch.cat([obs, next_obs])
        y = rd.ddpm_sample(actor_pre, both, torch.randn(2 * B, args.num_particles, D), args.temperature)
        q = qf_pre.min_q(both.repeat_interleave(args.num_particles, 0), torch.tanh(y).reshape(-1, D))
        y1, next_y = rd.boltzmann_pick(y, q.view(2 * B, -1), args.temperature).split(B)
        target = batch.rewards + args.gamma * (1 - batch.dones) * target_pre.min_q(next_obs, torch.tanh(next_y))
        qs = qf_pre(obs, batch[1])
    for j in range(2):
        torch.testing.assert_close(logs[f"losses/qf{j + 1}_loss"], ((qs[j] - target) ** 2).mean(), rtol=1e-5, atol=1e-6)
    i = torch.randint(0, args.diffusion_steps, (B, 1))
    alpha, sigma = actor_pre.alpha[i], actor_pre.sigma[i]
    x_t = alpha * y1 + sigma * torch.randn_like(y1)
    rng = torch.get_rng_state()

    def actor_loss_with(critic):
        torch.set_rng_state(rng)
        eps_hat, _ = rd.posterior_noise(critic.min_q, obs, x_t, alpha, sigma, args.num_posterior_samples,
                                        args.temperature, args.estimator, args.cv_ridge, args.cv_clip)  # fmt: skip
        with torch.no_grad():
            return ((actor_pre(obs, x_t, i.float(), args.temperature) - eps_hat) ** 2).mean(), eps_hat

    loss, eps_hat = actor_loss_with(qf)
    torch.testing.assert_close(logs["losses/actor_loss"], loss, rtol=1e-4, atol=1e-6)
    assert (actor_loss_with(qf_pre)[1] - eps_hat).abs().max() > 1e-2  # the stale critic gives another target
    for old, new, online in zip(target_pre.parameters(), qf_target.parameters(), qf.parameters()):
        torch.testing.assert_close(new, old + args.tau * (online - old), rtol=1e-6, atol=1e-6)
    assert all((a != b).any() for a, b in zip(actor_pre.parameters(), actor.parameters()))


# ---------------------------------------------------------------- end to end

SMALL = ["--learning-starts", 100, "--batch-size", 32, "--num-particles", 4, "--num-posterior-samples", 8,
         "--diffusion-steps", 3]  # fmt: skip


@pytest.mark.parametrize("env_id", ["Hopper-v5", "dm_control/cartpole-swingup-v0"])
def test_end_to_end_env(run, env_id):
    proc, run_dir = run(SCRIPT, "--env-id", env_id, "--total-timesteps", 300, *SMALL, "--eval-every", 150,
                        "--eval-episodes", 2, "--save-model")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir)
    for tag in ["losses/qf_loss", "losses/qf1_loss", "losses/actor_loss", "rfm/ess", "rfm/cv_weight"]:
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert [s for s, _ in scalars["eval/episodic_return"]] == [150, 300]
    assert "eval/saved_model_episodic_return" in scalars
    assert (run_dir / "rfm_diffusion.pt").exists()


def test_end_to_end_compile(run):
    proc, run_dir = run(SCRIPT, "--env-id", BANDIT, "--total-timesteps", 300, *SMALL, "--eval-every", 300,
                        "--eval-episodes", 2, "--compile")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir)
    for tag in ["losses/qf_loss", "losses/actor_loss", "rfm/ess", "rfm/cv_weight"]:
        assert [s for s, _ in scalars[tag]] == [100, 200] and all(math.isfinite(v) for _, v in scalars[tag]), tag


@pytest.mark.parametrize("estimator", ["stein", "noise", "gradient"])
def test_estimator_flags_on_bandit(run, estimator):
    proc, run_dir = run(SCRIPT, "--env-id", BANDIT, "--total-timesteps", 201, *SMALL, "--eval-every", 1000,
                        "--eval-episodes", 2, "--estimator", estimator)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir)
    assert len(scalars["rfm/ess"]) == 2 and len(scalars["eval/episodic_return"]) == 1
    cv = [v for _, v in scalars["rfm/cv_weight"]]
    if estimator == "noise":
        assert all(v == 0 for v in cv)
    elif estimator == "gradient":
        assert all(v > 0 for v in cv)  # sigma^2 / alpha^2
    else:
        assert all(abs(v) <= 2.0 for v in cv)


@pytest.mark.parametrize(
    "args",
    [["--env-id", "NoSuchEnv-v0"], ["--env-id", "CartPole-v1"], ["--env-id", "tests.toy_envs:Unbounded-v0"],
     ["--env-id", BANDIT, "--diffusion-steps", 0], ["--env-id", BANDIT, "--temperature", 0],
     ["--env-id", BANDIT, "--num-posterior-samples", 0], ["--env-id", BANDIT, "--x0-clip", 0]],
)  # fmt: skip
def test_bad_input_fails_in_one_line_before_training(run, args):
    assert_one_line_error(*run(SCRIPT, *args, timeout=120))
