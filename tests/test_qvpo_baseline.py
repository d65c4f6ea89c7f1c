"""Tests of qvpo_baseline.py (docs/baselines.md §0-1):

1. the pieces with known answers: qadv weights, the weighted eps-MSE, the loss rows, the entropy schedule, the
   cosine schedule and DDPM posterior coefficients, the init, the replay buffer;
2. the networks and the sampler against plain references (unsplit first layer, a literal DDPM loop), clamping, and
   the compiled sampler against the eager one;
3. one update: best-of-K selection, critic-before-policy order, Polyak targets, the actor-loss rows (entropy weight
   0 drops the uniform rows);
4. the script end to end (envs, --save-model, --timeout-as-terminal, bad input, a non-finite loss) and, marked slow,
   a bandit learned with single-sample acting and evaluation.
"""

import copy
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qvpo_baseline as qv
from tests.conftest import BANDIT, assert_one_line_error, check_ok, run_script, single_run_dir


TIMEOUT_ENV = "tests.toy_envs:OneStepTimeout-v0"


# ---------------------------------------------------------------------------------------------------------------
# 1. Known answers
# ---------------------------------------------------------------------------------------------------------------


def test_qadv_weight_is_max_minus_mean_in_raw_units():
    q = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [-4.0, -2.0, 0.0, -10.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(qv.qadv_weight(q), torch.tensor([3.0, 0.0, 4.0, 75.0]))


class ZeroDenoiser(qv.Denoiser):
    def forward(self, x, i, obs):
        return torch.zeros_like(x)


class IdentityDenoiser(qv.Denoiser):
    """Predicts the noised input itself, so the loss exposes x_i."""

    def forward(self, x, i, obs):
        return x


def loss_draws(seed, n, D, T):
    """The loss's own random draws, replayed: per-row steps i ~ U{0..T-1}, then eps ~ N(0, I)."""
    torch.manual_seed(seed)
    return torch.randint(0, T, (n,)), torch.randn(n, D)


def test_weighted_eps_loss_hand_computed():
    """Zero prediction: the mean over rows and dims of w eps^2."""
    actor, w, a = ZeroDenoiser(1, 2, 5), torch.tensor([1.0, 0.5, 0.0]), torch.rand(3, 2)
    torch.manual_seed(0)
    loss = qv.weighted_eps_loss(actor, torch.zeros(3, 1), a, w)
    _, eps = loss_draws(0, 3, 2, 5)
    expected = (w[0] * eps[0].square().sum() + w[1] * eps[1].square().sum()) / 6  # the zero-weight row adds nothing
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_eps_loss_noises_with_the_schedule():
    """x_i = sqrt(abar_i) a + sqrt(1 - abar_i) eps with abar from an independent float64 computation."""
    T = 20
    actor = IdentityDenoiser(1, 2, T)
    abar = np.array([math.cos((i + 1 + 0.008 * T) / (T * 1.008) * math.pi / 2) ** 2 for i in range(T)])
    abar /= math.cos(0.008 / 1.008 * math.pi / 2) ** 2  # telescoped product of the unclipped alphas
    a, w = torch.rand(64, 2) * 2 - 1, torch.rand(64) * 2
    torch.manual_seed(1)
    loss = qv.weighted_eps_loss(actor, torch.zeros(64, 1), a, w)
    i, eps = loss_draws(1, 64, 2, T)
    assert len(set(i.tolist())) > 10
    expected = (w[:, None] * (torch.tensor(np.sqrt(abar[i]))[:, None] * a
                              + (torch.tensor(np.sqrt(1 - abar[i]))[:, None] - 1) * eps) ** 2).mean()  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_policy_rows_weights_and_dilution():
    """B best rows with w, then N_e uniform rows per state with alpha w; with a zero denoiser the loss is
    (sum_b w_b |eps_b|^2 + alpha sum_b w_b sum_k |eps_bk|^2) / (B (1 + N_e) D): the 1/11 dilution of
    docs/baselines.md §1.5."""
    obs = torch.tensor([[1.0], [2.0]])
    best = torch.tensor([[0.5, -0.5], [0.1, 0.2]])
    w = torch.tensor([2.0, 3.0])
    rows_obs, rows_act, rows_w = qv.policy_rows(obs, best, w, 3, 0.1)
    assert rows_obs.flatten().tolist() == [1.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    torch.testing.assert_close(rows_act[:2], best)
    assert rows_act[2:].abs().max() <= 1.0 and rows_act[2:].std() > 0.1
    torch.testing.assert_close(rows_w, torch.tensor([2.0, 3.0, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3]))
    actor = ZeroDenoiser(1, 2, 5)
    torch.manual_seed(2)
    loss = qv.weighted_eps_loss(actor, rows_obs, rows_act, rows_w)
    _, eps = loss_draws(2, 8, 2, 5)
    assert loss.item() == pytest.approx((rows_w * eps.square().sum(1)).sum().item() / 16, rel=1e-6)
    assert qv.policy_rows(obs, best, w, 0, 0.1)[0].shape == (2, 1)  # N_e = 0 keeps the best rows only


def test_policy_rows_alpha_zero_drop_the_uniform_rows():
    """Entropy weight 0: the official code adds no uniform rows at all, so the loss is the weighted eps-MSE over the
    best rows only: with a zero denoiser, sum_b w_b |eps_b|^2 / (2 rows * 2 dims); zero-weight uniform rows kept in
    the mean would divide by 8 * 2 instead."""
    obs = torch.tensor([[1.0], [2.0]])
    best = torch.tensor([[0.5, -0.5], [0.1, 0.2]])
    w = torch.tensor([2.0, 3.0])
    rows_obs, rows_act, rows_w = qv.policy_rows(obs, best, w, 3, 0.0)
    assert rows_obs.shape == (2, 1) and rows_act.shape == (2, 2) and rows_w.shape == (2,)
    torch.testing.assert_close(rows_act, best)
    torch.testing.assert_close(rows_w, w)
    actor = ZeroDenoiser(1, 2, 5)
    torch.manual_seed(3)
    loss = qv.weighted_eps_loss(actor, rows_obs, rows_act, rows_w)
    _, eps = loss_draws(3, 2, 2, 5)
    assert loss.item() == pytest.approx((w * eps.square().sum(1)).sum().item() / 4, rel=1e-6)


@pytest.mark.parametrize(
    "step,expected", [(0, 0.02), (250, 0.015), (500, 0.01), (800, 0.004), (900, 0.002), (950, 0.002), (1000, 0.002)]
)
def test_entropy_schedule(step, expected):
    assert qv.entropy_coef(step, 1000, 0.02, 0.002) == pytest.approx(expected)


@pytest.mark.parametrize("step", [0, 500, 999, 1000])
def test_entropy_schedule_is_capped_at_alpha(step):
    """The official min(alpha, max(floor, linear decay)): alpha 0 gives exactly 0 whatever the floor, and an alpha
    below the floor stays constant; with a zero floor and alpha > 0 the weight stays > 0 through the last update."""
    assert qv.entropy_coef(step, 1000, 0.0, 0.002) == 0.0
    assert qv.entropy_coef(step, 1000, 0.0, 0.0) == 0.0
    assert qv.entropy_coef(step, 1000, 0.001, 0.002) == pytest.approx(0.001)
    if step < 1000:
        assert qv.entropy_coef(step, 1000, 0.02, 0.0) > 0


def betas_of(sched):
    """beta_i = 1 - abar_i / abar_{i-1} from the schedule's sqrt(abar), float64."""
    abar = sched["sqrt_ac"].double().square().numpy()
    return 1 - abar / np.append(1.0, abar[:-1])


def test_cosine_schedule_values():
    T, s = 20, 0.008
    betas = betas_of(qv.cosine_schedule(T))
    f = [math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2 for u in range(T + 1)]
    for i in range(T - 1):
        # abar_i = f(i+1) / f(0) for the unclipped steps (independent of the cumulative product)
        assert np.prod(1 - betas[: i + 1]) == pytest.approx(f[i + 1] / f[0], rel=1e-12)
    assert betas[-1] == pytest.approx(0.999, abs=1e-12)  # f(T) = 0 gives beta = 1, clipped
    assert np.all(betas[:-1] > 0) and np.all(np.diff(betas) > 0)
    abar_last = np.prod(1 - betas)
    assert abar_last == pytest.approx(f[T - 1] / f[0] * 1e-3, rel=1e-9) and 5.5e-6 < abar_last < 6.5e-6
    assert betas[0] == pytest.approx(1 - f[1] / f[0])
    actor = qv.Denoiser(3, 2, T)  # the float32 tables the loss uses
    np.testing.assert_allclose(actor.sqrt_ac.numpy() ** 2, np.cumprod(1 - betas), rtol=1e-5)
    assert betas_of(qv.cosine_schedule(1)) == pytest.approx([0.999])


@pytest.mark.parametrize("T", [1, 5, 20])
def test_posterior_coefficients_by_gaussian_conditioning(T):
    """c1, c2, sigma^2 of docs/baselines.md §0 equal the conditional moments of x_{i-1} | (x_i, x0) under the forward
    process."""
    c = {k: v.numpy() for k, v in qv.cosine_schedule(T).items()}
    betas = betas_of(qv.cosine_schedule(T))
    abar = np.cumprod(1 - betas)
    for i in range(T):
        prev = abar[i - 1] if i > 0 else 1.0
        # x_{i-1} = sqrt(prev) x0 + sqrt(1 - prev) e1; x_i = sqrt(alpha_i) x_{i-1} + sqrt(beta_i) e2
        cov, var = math.sqrt(1 - betas[i]) * (1 - prev), 1 - abar[i]
        k = cov / var  # E[x_{i-1} | x_i, x0] = sqrt(prev) x0 + k (x_i - sqrt(abar_i) x0)
        assert c["c2"][i] == pytest.approx(k, abs=1e-10)
        assert c["c1"][i] == pytest.approx(math.sqrt(prev) - k * math.sqrt(abar[i]), abs=1e-10)
        cond_var = (1 - prev) - cov**2 / var
        assert c["sigma"][i] ** 2 == pytest.approx(max(cond_var, 1e-20), rel=1e-9, abs=1e-15)
        # x0_hat inverts the noising exactly when eps is the true noise
        x0, e = 0.3, -1.2
        xi = math.sqrt(abar[i]) * x0 + math.sqrt(1 - abar[i]) * e
        assert c["recip"][i] * xi - c["recipm1"][i] * e == pytest.approx(x0, abs=1e-9)
    assert c["c1"][0] == pytest.approx(1.0) and c["c2"][0] == pytest.approx(0.0, abs=1e-15)


def test_init_is_untruncated_normal_with_half_inverse_sqrt_fan_in():
    torch.manual_seed(0)
    actor, qf = qv.Denoiser(17, 6, 20), qv.TwinQ(17, 6)
    layers = [m for m in [*actor.modules(), *qf.modules()] if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 2 + 4 + 2 * 4
    for layer in layers:
        assert torch.all(layer.bias == 0)
        z = layer.weight.flatten() * 2 * math.sqrt(layer.in_features)  # ~ N(0, 1)
        if z.numel() >= 4096:
            assert z.std().item() == pytest.approx(1.0, abs=0.05)
            assert (z.abs() > 2).float().mean().item() == pytest.approx(0.0455, abs=0.015)  # not truncated at 2 std


# ---------------------------------------------------------------------------------------------------------------
# 2. Networks and sampler against references
# ---------------------------------------------------------------------------------------------------------------


def reference_eps(actor, obs, x, i):
    """eps_theta of docs/baselines.md §0 built from the layers by hand: sinusoid -> time MLP -> [x, t_emb, s] -> 3 x Mish -> out."""
    k = torch.arange(16, dtype=torch.float64)
    freqs = torch.exp(-math.log(1e4) * k / 15)
    arg = i.double()[:, None] * freqs
    sinus = torch.cat([arg.sin(), arg.cos()], -1).float()
    l1, l2 = actor.time_mlp[0], actor.time_mlp[2]
    t_emb = F.linear(F.mish(F.linear(sinus, l1.weight, l1.bias)), l2.weight, l2.bias)
    h = F.mish(F.linear(torch.cat([x, t_emb, obs], -1), actor.inp.weight, actor.inp.bias))
    for layer in actor.mid:
        h = F.mish(F.linear(h, layer.weight, layer.bias))
    return F.linear(h, actor.out.weight, actor.out.bias)


def test_denoiser_forward_matches_reference():
    torch.manual_seed(1)
    actor = qv.Denoiser(5, 3, 20)
    obs, x, i = torch.randn(64, 5), torch.randn(64, 3), torch.randint(0, 20, (64,))
    with torch.no_grad():
        ref = reference_eps(actor, obs, x, i)
        torch.testing.assert_close(actor(x, i, obs), ref, rtol=1e-5, atol=1e-6)


def reference_betas(T, s=0.008):
    """The cosine schedule of docs/baselines.md §0, written out with Python floats."""
    f = [math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2 for u in range(T + 1)]
    return torch.tensor([min(max(1 - f[i + 1] / f[i], 0.0), 0.999) for i in range(T)], dtype=torch.float64)


def reference_sample(actor, obs, x, noise):
    """The literal DDPM loop of docs/baselines.md §0 in float64 with per-row step tensors and the unsplit network."""
    T = actor.steps
    betas = reference_betas(T)
    abar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    x = x.double()
    clamped = 0
    for i in reversed(range(T)):
        eps = reference_eps(actor, obs, x.float(), torch.full((x.shape[0],), i)).double()
        x0 = torch.sqrt(1 / abar[i]) * x - torch.sqrt(1 / abar[i] - 1) * eps
        clamped += int((x0.abs() > 1).sum())
        x0 = x0.clamp(-1, 1)
        mean = betas[i] * prev[i].sqrt() / (1 - abar[i]) * x0 + (1 - prev[i]) * (1 - betas[i]).sqrt() / (1 - abar[i]) * x
        var = betas[i] * (1 - prev[i]) / (1 - abar[i])
        x = mean + (i > 0) * torch.exp(0.5 * torch.log(var.clamp(min=1e-20))) * noise[i].double()
    return x.clamp(-1, 1).float(), clamped


@pytest.mark.parametrize("T", [1, 3, 20])
def test_sampler_matches_literal_ddpm_loop(T):
    torch.manual_seed(2)
    actor = qv.Denoiser(4, 2, T)
    with torch.no_grad():
        actor.out.weight.mul_(20.0)  # large predictions so that the x0-hat clamp is active at some steps
    B, N = 6, 5
    obs, x, noise = torch.randn(B, 4), torch.randn(B, N, 2), torch.randn(T, B, N, 2)
    with torch.no_grad():
        got = qv.ddpm_sample(actor, obs, x, noise)
        ref, clamped = reference_sample(actor, obs.repeat_interleave(N, 0), x.reshape(B * N, 2), noise.reshape(T, B * N, 2))
    assert clamped > 0
    torch.testing.assert_close(got.reshape(B * N, 2), ref, rtol=1e-4, atol=1e-4)


def test_sampler_clamps_huge_predictions():
    """eps = (+1e6, -1e6, 1e6): x0-hat saturates at (-1, +1, -1) and, since c1_0 = 1 and c2_0 = 0, so does the sample."""
    actor = qv.Denoiser(3, 3, 20)
    with torch.no_grad():
        actor.out.weight.zero_()
        actor.out.bias.copy_(torch.tensor([1e6, -1e6, 1e6]))
        a = qv.ddpm_sample(actor, torch.randn(4, 3), torch.randn(4, 8, 3), torch.randn(20, 4, 8, 3))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, -1.0]).expand(4, 8, 3))


def test_sampler_batching_is_exact():
    """Each state's chain is its own computation: one call on all states equals calls on groups of states."""
    torch.manual_seed(3)
    actor = qv.Denoiser(6, 2, 5)
    obs, x, noise = torch.randn(32, 6), torch.randn(32, 16, 2), torch.randn(5, 32, 16, 2)
    with torch.no_grad():
        whole = qv.ddpm_sample(actor, obs, x, noise)
        parts = torch.cat([qv.ddpm_sample(actor, obs[j : j + 4], x[j : j + 4], noise[:, j : j + 4]) for j in range(0, 32, 4)])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [3, 2])  # 3: official QVPO; 2: the RFM paper's DMC runs (--hidden-layers 2)
def test_twin_q_is_two_mish_mlps(layers):
    torch.manual_seed(4)
    qf = qv.TwinQ(5, 2, layers=layers)
    obs, act = torch.randn(10, 5), torch.randn(10, 2)
    outs = []
    for net in qf.members:
        h = torch.cat([obs, act], -1)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(7, 256)] + [(256, 256)] * (layers - 1) + [(256, 1)]
        for layer in linears[:-1]:
            h = F.mish(layer(h))
        outs.append(linears[-1](h).squeeze(-1))
    with torch.no_grad():
        torch.testing.assert_close(qf(obs, act), torch.stack(outs), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(qf.min_q(obs, act), torch.minimum(*outs), rtol=1e-5, atol=1e-6)


def test_denoiser_depth_and_time_embedding_flags():
    actor = qv.Denoiser(5, 2, 3, t_dim=128, layers=2)
    shapes = [(m.in_features, m.out_features) for m in actor.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(128, 256), (256, 128), (2 + 128 + 5, 256), (256, 256), (256, 2)]
    assert actor(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.randn(4, 5)).shape == (4, 2)


# ---------------------------------------------------------------------------------------------------------------
# 3. Selection and one update
# ---------------------------------------------------------------------------------------------------------------


class QuadraticQ(torch.nn.Module):
    """min-Q = -|a - s[:, :D]|^2: its argmax over candidates is the candidate nearest to the state."""

    def min_q(self, obs, act):
        return -((act - obs[:, : act.shape[1]]) ** 2).sum(-1)


def test_best_of_k_returns_the_argmax():
    torch.manual_seed(5)
    actor = qv.Denoiser(2, 2, 3)
    obs = torch.rand(10, 2) * 2 - 1
    best, q = qv.best_of_k(actor, QuadraticQ(), obs, 16)
    assert best.shape == (10, 2) and q.shape == (10, 16)
    assert best.abs().max() <= 1.0
    torch.testing.assert_close(QuadraticQ().min_q(obs, best), q.max(1).values)
    assert (q.std(1) > 0).all()  # 16 distinct samples per state


def test_compiled_sampler_matches_eager():
    """--compile passes torch.compile(ddpm_sample) around: the same actions as eager up to rounding."""
    torch.manual_seed(6)
    actor = qv.Denoiser(5, 3, 4)
    obs, x, z = torch.randn(4, 5), torch.randn(4, 8, 3), torch.randn(4, 4, 8, 3)
    with torch.no_grad():
        want = qv.ddpm_sample(actor, obs, x, z)
        got = torch.compile(qv.ddpm_sample)(actor, obs, x, z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def make_agent(obs_dim=3, act_dim=2, T=3, seed=0):
    torch.manual_seed(seed)
    actor, qf = qv.Denoiser(obs_dim, act_dim, T), qv.TwinQ(obs_dim, act_dim)
    actor_target, qf_target = copy.deepcopy(actor), copy.deepcopy(qf)
    with torch.no_grad():  # targets that differ from the online nets, to see Polyak
        for p in [*actor_target.parameters(), *qf_target.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    a_opt = torch.optim.Adam(actor.parameters(), lr=1e-4, eps=1e-5)
    q_opt = torch.optim.Adam(qf.parameters(), lr=3e-4, eps=1e-5)
    return actor, actor_target, qf, qf_target, a_opt, q_opt


def small_args(**kw):
    return qv.Args(diffusion_steps=3, num_action_samples=8, num_entropy_samples=2, target_samples=4, **kw)


def as_agent(actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer):
    """The bundle update() takes, as the script's main builds it."""
    return SimpleNamespace(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target,
                           actor_optimizer=actor_optimizer, q_optimizer=q_optimizer)  # fmt: skip


def test_update_order_weights_and_polyak():
    """Critic first; the weights use the just-updated critic on the policy batch; both targets move by tau."""
    obs_dim, act_dim, B = 3, 2, 16
    actor, actor_target, qf, qf_target, a_opt, q_opt = make_agent(obs_dim, act_dim)
    args = small_args(tau=0.1)
    batch = qv.Batch(torch.randn(B, obs_dim), torch.rand(B, act_dim) * 2 - 1, torch.rand(B), torch.randn(B, obs_dim),
                      torch.zeros(B))  # fmt: skip
    policy_obs = torch.randn(B, obs_dim)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in
              [("actor", actor), ("actor_target", actor_target), ("qf", qf), ("qf_target", qf_target)]}  # fmt: skip

    # replay the update's random draws on an identical copy of the agent, scoring the policy batch with the critic
    # after the update (only its own Adam step changed it; Polyak moves the targets) and with the pre-step critic
    actor2, actor_target2, qf2, qf_target2, _, _ = make_agent(obs_dim, act_dim)
    rng = torch.get_rng_state()
    logs = qv.update(as_agent(actor, actor_target, qf, qf_target, a_opt, q_opt), batch, policy_obs, 0.02, args)
    torch.set_rng_state(rng)
    qv.best_of_k(actor_target2, qf_target2, batch[3], args.target_samples)  # the critic target's draws
    rng_policy = torch.get_rng_state()
    _, q = qv.best_of_k(actor2, qf, policy_obs, args.num_action_samples)
    torch.testing.assert_close(logs["qvpo/weight_mean"], qv.qadv_weight(q).mean(), rtol=1e-4, atol=1e-6)
    torch.set_rng_state(rng_policy)
    _, q_stale = qv.best_of_k(actor2, qf2, policy_obs, args.num_action_samples)  # same samples, pre-step critic
    assert not torch.isclose(qv.qadv_weight(q_stale).mean(), logs["qvpo/weight_mean"], rtol=1e-3)

    for name, module in [("actor", actor), ("qf", qf)]:
        assert any(not torch.equal(a, b) for a, b in zip(before[name], module.parameters())), name
    for online, target, name in [(actor, actor_target, "actor_target"), (qf, qf_target, "qf_target")]:
        for old, new, p in zip(before[name], target.parameters(), online.parameters()):
            torch.testing.assert_close(new, 0.9 * old + 0.1 * p.detach())
    for k in ["losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/actor_loss", "qvpo/weight_mean"]:
        assert torch.isfinite(logs[k]), k
    torch.testing.assert_close(logs["losses/qf_loss"], (logs["losses/qf1_loss"] + logs["losses/qf2_loss"]) / 2)


@pytest.mark.parametrize("entropy_alpha", [0.0, 0.02])
def test_update_actor_loss_rows(entropy_alpha):
    """The update's actor loss, replayed from its random draws on a copy of the agent: with entropy weight 0 it is
    the weighted eps-MSE over the B best rows only (no uniform rows drawn or averaged in); with 0.02, over the
    B (1 + N_e) rows of policy_rows."""
    obs_dim, act_dim, B = 3, 2, 16
    actor, actor_target, qf, qf_target, a_opt, q_opt = make_agent(obs_dim, act_dim)
    args = small_args()
    batch = qv.Batch(torch.randn(B, obs_dim), torch.rand(B, act_dim) * 2 - 1, torch.rand(B) + 1, torch.randn(B, obs_dim),
                      torch.zeros(B))  # fmt: skip
    policy_obs = torch.randn(B, obs_dim)
    actor2, actor_target2, _, qf_target2, _, _ = make_agent(obs_dim, act_dim)
    rng = torch.get_rng_state()
    logs = qv.update(as_agent(actor, actor_target, qf, qf_target, a_opt, q_opt), batch, policy_obs, entropy_alpha, args)
    torch.set_rng_state(rng)
    qv.best_of_k(actor_target2, qf_target2, batch[3], args.target_samples)  # the critic target's draws
    best, q = qv.best_of_k(actor2, qf, policy_obs, args.num_action_samples)  # qf: the just-updated critic
    weight = qv.qadv_weight(q)
    assert (weight > 0).all()
    if entropy_alpha == 0:
        rows = (policy_obs, best, weight)
    else:
        rows = qv.policy_rows(policy_obs, best, weight, args.num_entropy_samples, entropy_alpha)
        assert rows[1].shape[0] == B * (1 + args.num_entropy_samples)
    with torch.no_grad():
        expected = qv.weighted_eps_loss(actor2, *rows)
    torch.testing.assert_close(logs["losses/actor_loss"], expected, rtol=1e-4, atol=1e-7)


def test_critic_target_uses_best_of_k_target_actor():
    """y = r + gamma (1 - d) max_k min-Q_target(s', a_k) with a_k from the target actor: recompute it by hand."""
    obs_dim, act_dim, B = 3, 2, 8
    actor, actor_target, qf, qf_target, a_opt, q_opt = make_agent(obs_dim, act_dim)
    args = small_args(gamma=0.9)
    batch = qv.Batch(torch.randn(B, obs_dim), torch.rand(B, act_dim) * 2 - 1, torch.rand(B), torch.randn(B, obs_dim),
                      (torch.rand(B) < 0.5).float())  # fmt: skip
    qf_pre, policy_obs = copy.deepcopy(qf), torch.randn(B, obs_dim)
    _, actor_target2, _, qf_target2, _, _ = make_agent(obs_dim, act_dim)
    rng = torch.get_rng_state()
    logs = qv.update(as_agent(actor, actor_target, qf, qf_target, a_opt, q_opt), batch, policy_obs, 0.02, args)
    torch.set_rng_state(rng)
    _, next_q = qv.best_of_k(actor_target2, qf_target2, batch[3], args.target_samples)
    y = batch[2].flatten() + (1 - batch[4].flatten()) * 0.9 * next_q.max(1).values
    with torch.no_grad():
        qs = qf_pre(batch[0], batch[1])
    torch.testing.assert_close(logs["losses/qf1_loss"], F.mse_loss(qs[0], y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["losses/qf2_loss"], F.mse_loss(qs[1], y), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 4. The script end to end
# ---------------------------------------------------------------------------------------------------------------

SMALL = [
    "--total-timesteps", 300, "--learning-starts", 100, "--batch-size", 32, "--diffusion-steps", 3,
    "--num-action-samples", 8, "--num-entropy-samples", 2, "--eval-samples", 4,
]  # fmt: skip


@pytest.mark.parametrize(
    "env_id,obs_dim,act_dim,eval_every",
    [("Hopper-v5", 11, 3, 150), ("dm_control/cartpole-swingup-v0", 5, 1, 300)],  # cartpole evals are 1000 steps
)
def test_end_to_end_env(run, env_id, obs_dim, act_dim, eval_every):
    proc, run_dir = run("qvpo_baseline.py", "--env-id", env_id, *SMALL, "--eval-every", eval_every, "--eval-episodes", 2,
                        "--save-model")  # fmt: skip
    scalars = check_ok(proc, run_dir)
    for tag in ["losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values", "losses/actor_loss",
                "qvpo/weight_mean", "qvpo/entropy_alpha", "charts/SPS"]:  # fmt: skip
        assert scalars.get(tag), f"missing {tag}: {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), scalars[tag]
    assert [s for s, _ in scalars["losses/qf_loss"]] == [100, 200]  # updates from learning_starts, logged every 100
    assert all(v >= 0 for _, v in scalars["qvpo/weight_mean"])
    alphas = [v for _, v in scalars["qvpo/entropy_alpha"]]
    assert alphas == pytest.approx([0.02 * (1 - 100 / 300), 0.02 * (1 - 200 / 300)])
    evals = scalars.get("eval/episodic_return", [])
    assert [s for s, _ in evals] == list(range(eval_every, 301, eval_every)), evals
    assert all(math.isfinite(v) for _, v in evals)
    if env_id == "Hopper-v5":  # random Hopper episodes end within 300 steps
        assert scalars.get("charts/episodic_return"), sorted(scalars)
    assert scalars.get("eval/saved_model_episodic_return")
    ckpt = torch.load(run_dir / "qvpo_baseline.pt", map_location="cpu")
    qv.Denoiser(obs_dim, act_dim, 3).load_state_dict(ckpt["actor"])
    qv.TwinQ(obs_dim, act_dim).load_state_dict(ckpt["qf"])
    assert ckpt["args"]["env_id"] == env_id


DMC_PRESET = ["--max-grad-norm", "inf", "--hidden-layers", 2, "--time-dim", 128, "--adam-eps", 1e-8, "--policy-lr", 3e-4,
              "--q-lr", 1e-3, "--entropy-alpha", 0.02, "--entropy-alpha-min", 0.02]  # README's DMC preset, less --shared-batch


def test_dmc_preset_runs_and_shared_batch_takes_effect(tmp_path):
    """Same seed and flags with and without --shared-batch: the first update's losses differ (other policy states, and
    one replay draw fewer); were the flag ignored, the two runs would match exactly."""
    losses = []
    for shared in [False, True]:
        cwd = tmp_path / str(shared)
        cwd.mkdir()
        proc = run_script("qvpo_baseline.py", ["--env-id", BANDIT, "--total-timesteps", 101, "--learning-starts", 100,
                          "--batch-size", 16, "--diffusion-steps", 2, "--num-action-samples", 4, "--num-entropy-samples",
                          2, "--eval-samples", 2, "--eval-every", 1000, "--eval-episodes", 1, *DMC_PRESET,
                          *(["--shared-batch"] if shared else [])], cwd)  # fmt: skip
        scalars = check_ok(proc, single_run_dir(cwd))
        losses.append([scalars[k] for k in ["losses/qf_loss", "losses/actor_loss"]])
        assert all(math.isfinite(v) and s == 100 for pts in losses[-1] for s, v in pts), losses[-1]
    assert losses[0] != losses[1]


@pytest.mark.parametrize("timeout_as_terminal", [False, True])
def test_timeout_switch(run, timeout_as_terminal):
    """Every step is a time-limit truncation with reward 1: Q -> 1 / (1 - gamma) = 2 when bootstrapping (default),
    Q -> 1 with --timeout-as-terminal (the official behaviour)."""
    flag = ["--timeout-as-terminal"] if timeout_as_terminal else []
    proc, run_dir = run("qvpo_baseline.py", "--env-id", TIMEOUT_ENV, "--total-timesteps", 201, "--learning-starts", 50,
                        "--batch-size", 32, "--gamma", 0.5, "--tau", 0.2, "--q-lr", 3e-3, "--diffusion-steps", 2,
                        "--num-action-samples", 4, "--num-entropy-samples", 1, "--eval-samples", 2,
                        "--eval-every", 1000, "--eval-episodes", 1, *flag)  # fmt: skip
    scalars = check_ok(proc, run_dir)
    for tag in ["losses/qf1_values", "losses/qf2_values"]:
        step, q = scalars[tag][-1]
        assert step == 200 and q == pytest.approx(1.0 if timeout_as_terminal else 2.0, abs=0.05), scalars[tag]


BAD_HYPERPARAMETERS = {  # flag: invalid value; all in one run, each must be named in the one error line
    "--diffusion-steps": 0,
    "--num-action-samples": 0,
    "--num-entropy-samples": -1,
    "--behavior-samples": 0,
    "--target-samples": 0,
    "--eval-samples": 0,
    "--entropy-alpha": -0.1,
    "--entropy-alpha-min": -0.1,
    "--hidden-layers": 0,
    "--time-dim": 7,
    "--adam-eps": 0,
}
BAD_INPUTS = {
    "unknown env": ["--env-id", "NoSuchEnv-v0"],
    "discrete actions": ["--env-id", "CartPole-v1"],
    "unbounded actions": ["--env-id", "tests.toy_envs:Unbounded-v0"],
    "hyperparameters": ["--env-id", BANDIT, *[str(x) for kv in BAD_HYPERPARAMETERS.items() for x in kv]],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_before_training(run, tmp_path, case):
    line = assert_one_line_error(*run("qvpo_baseline.py", *BAD_INPUTS[case], "--total-timesteps", 10))
    assert not (tmp_path / "runs").exists()
    if case == "hyperparameters":
        assert all(flag in line for flag in BAD_HYPERPARAMETERS), line


def test_non_finite_loss_stops_with_step(run):
    """A critic step of size 1e30 (Adam) blows up Q at the first update; the device-side check, read every 100
    steps, stops the run naming the quantity and the first bad step."""
    proc, _ = run("qvpo_baseline.py", "--env-id", BANDIT, "--total-timesteps", 300, "--learning-starts", 50,
                  "--batch-size", 16, "--diffusion-steps", 2, "--num-action-samples", 4, "--num-entropy-samples", 1,
                  "--eval-samples", 2, "--q-lr", 1e30, "--eval-every", 1000, "--eval-episodes", 1)  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: non-finite (losses/\S+(, losses/\S+)*) at step (\d+)", last)
    assert match, proc.stderr[-2000:]
    assert int(match.group(3)) == 50  # the first update (global_step == learning_starts)


def test_entropy_alpha_zero_alone_is_accepted():
    """--entropy-alpha 0 needs no --entropy-alpha-min: the floor is capped at alpha, as officially, so a floor above
    alpha is valid (constant alpha); a negative one is not."""
    qv.check_args(qv.Args(entropy_alpha=0.0))
    qv.check_args(qv.Args(entropy_alpha=0.001, entropy_alpha_min=0.002))
    with pytest.raises(SystemExit, match="--entropy-alpha-min must be >= 0"):
        qv.check_args(qv.Args(entropy_alpha_min=-0.1))


@pytest.mark.slow
def test_learns_context_bandit(run):
    """Optimum 1 for every context; uniform random ≈ 0.17, the untrained sampler ≈ -0.5 (it saturates at the box
    corners). Acting AND evaluation use ONE sample per state (--behavior-samples 1 --eval-samples 1), so neither the
    data nor the return comes from best-of-K selection by the critic (best-of-32 alone gives ≈ 0.96 even for a uniform
    policy): the return measures the diffusion policy itself. Measured (seed 1, 100 eval contexts, evals every 250
    steps, updates from step 500): this run 0.91 / 0.97 / 0.99 / 0.99 at 750 / 1000 / 1250 / 1500; the same command
    with a frozen actor (--policy-lr 1e-9) stays in [-0.51, -0.27] at every eval. ~6 CPU-minutes on one thread."""
    proc, run_dir = run(
        "qvpo_baseline.py", "--env-id", BANDIT, "--total-timesteps", 1500, "--learning-starts", 500, "--batch-size", 64,
        "--diffusion-steps", 10, "--num-action-samples", 32, "--policy-lr", 1e-3, "--q-lr", 1e-3, "--eval-every", 250,
        "--eval-episodes", 100, "--behavior-samples", 1, "--eval-samples", 1,
        timeout=2400,
    )  # fmt: skip
    scalars = check_ok(proc, run_dir)
    evals = scalars["eval/episodic_return"]
    print(f"eval curve {evals}")
    assert [s for s, _ in evals] == [250, 500, 750, 1000, 1250, 1500]
    assert max(v for _, v in evals[:2]) < 0.17, evals  # before any update: worse than uniform random
    assert evals[-1][1] >= 0.8, evals  # the frozen actor never exceeds -0.27
