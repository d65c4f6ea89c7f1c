"""Tests for rfm_flow.py beyond its estimator (math: docs/rfm.md §7-§8; bare § numbers below refer to that page).

Layout:
  5. the networks, the ODE sampler, Boltzmann resampling and evaluation acting;
  6. one `update()` call, recomputed by hand;
  7. the script end to end (envs, estimators, bad input, NaN guard).

The estimator `posterior_mean` is tested in tests/test_rfm_estimator.py; what every script shares (replay buffer,
evaluation noise, critic clipping, host syncs, learning checks) in tests/test_all_scripts.py.
"""

import copy
import math
import re

import numpy as np
import pytest
import torch

import rfm_flow as rf
from tests.conftest import BANDIT, assert_one_line_error, check_ok

F64 = torch.float64
ESTIMATORS = ["noise", "gradient", "stein"]


# ---------------------------------------------------------------------------------------------------------------
# 5. Networks, ODE sampler, resampling, evaluation acting
# ---------------------------------------------------------------------------------------------------------------


def explicit_embedding(x):
    """§8: 64 frequencies f_j = exp(-ln(1000) j / 63); [sin(x f_j), cos(x f_j)], from scalar math."""
    freqs = torch.tensor([math.exp(-math.log(1000.0) * j / 63) for j in range(64)], dtype=x.dtype)
    arg = x[..., None] * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def velocity_reference(actor, obs, y, t, temperature):
    """The unsplit network: one Linear over the concatenation [s, y, emb(t), emb(T)] (§8)."""
    temp = torch.full(obs.shape[:-1], temperature, dtype=obs.dtype)
    x = torch.cat([obs, y, explicit_embedding(t[:, 0]), explicit_embedding(temp)], -1)
    h = gelu_tanh(x @ actor.inp.weight.T + actor.inp.bias)
    for block in actor.blocks:
        h = h + gelu_tanh(h @ block.weight.T + block.bias)
    return h @ actor.out.weight.T + actor.out.bias


def randomize_(module, seed):
    """Random weights and non-zero biases, so that every parameter shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.3
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def small_nets(obs_dim=3, act_dim=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    actor = randomize_(rf.VelocityField(obs_dim, act_dim).to(dtype), seed + 1)
    qf = randomize_(rf.TwinQ(obs_dim, act_dim).to(dtype), seed + 2)
    return actor, qf


def test_sinusoidal_embedding_formula():
    x = np.array([0.0, 0.01, 0.02, 0.37, 0.99, 3.0, -2.5])
    freqs = np.exp(-np.log(1000.0) * np.arange(64) / 63)
    assert freqs[0] == 1.0 and freqs[-1] == pytest.approx(1e-3)
    expected = np.concatenate([np.sin(x[:, None] * freqs), np.cos(x[:, None] * freqs)], 1)
    got = rf.sinusoidal_embedding(torch.tensor(x, dtype=F64))
    assert got.shape == (len(x), 128)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_velocity_forward_equals_concatenation_reference(dtype, tol):
    """forward is the network of docs/rfm.md §8: the Linear of the concatenation, then the GELU blocks."""
    actor, _ = small_nets(obs_dim=5, act_dim=3, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(7, 5, generator=gen, dtype=dtype)
    y = torch.randn(7, 3, generator=gen, dtype=dtype)
    t = torch.rand(7, 1, generator=gen, dtype=dtype)
    for temperature in (0.02, 0.7):
        torch.testing.assert_close(
            actor(obs, y, t, temperature), velocity_reference(actor, obs, y, t, temperature), atol=tol, rtol=tol
        )


@pytest.mark.parametrize("net", ["actor", "critic"])
def test_orthogonal_init_gain_sqrt2_and_zero_bias(net):
    """§8: every Dense kernel orthogonal with gain sqrt(2) (outputs included), biases zero."""
    torch.manual_seed(0)
    module = rf.VelocityField(4, 2) if net == "actor" else rf.TwinQ(4, 2)
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == (4 if net == "actor" else 6)
    for layer in layers:
        W = layer.weight.detach().double()
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        torch.testing.assert_close(gram, 2.0 * torch.eye(gram.shape[0], dtype=F64), atol=1e-5, rtol=0)
        assert torch.all(layer.bias == 0)


@pytest.mark.parametrize("flow_steps,t_min", [(10, 0.01), (3, 0.2)])
def test_integrate_flow_equals_naive_euler(flow_steps, t_min):
    """§7.1: y <- y + dt v(t_j, y, s, T), t_j = t_min + j dt, dt = (1 - 2 t_min)/steps, one forward per step."""
    actor, _ = small_nets(dtype=F64)
    B, N, D = 4, 6, 2
    gen = torch.Generator().manual_seed(2)
    obs = torch.randn(B, 3, generator=gen, dtype=F64)
    y0 = torch.randn(B, N, D, generator=gen, dtype=F64)
    dt = (1 - 2 * t_min) / flow_steps
    obs_rep, y = obs.repeat_interleave(N, 0), y0.reshape(B * N, D)
    with torch.no_grad():
        for j in range(flow_steps):
            y = y + dt * actor(obs_rep, y, torch.full((B * N, 1), t_min + j * dt, dtype=F64), 0.02)
        got = rf.integrate_flow(actor, obs, y0, 0.02, flow_steps, t_min)
    assert t_min + flow_steps * dt == pytest.approx(1 - t_min)
    torch.testing.assert_close(got, y.view(B, N, D), atol=1e-12, rtol=1e-12)
    assert (got - y0).abs().max() > 0.1  # the field actually moved the particles


def test_twin_q_equals_two_explicit_mlps():
    _, qf = small_nets(obs_dim=4, act_dim=3, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    obs, act = torch.randn(9, 4, generator=gen, dtype=F64), torch.rand(9, 3, generator=gen, dtype=F64) * 2 - 1
    x = torch.cat([obs, act], -1)
    expected = []
    for member in qf.members:
        l1, l2, l3 = (m for m in member if isinstance(m, torch.nn.Linear))
        h = torch.relu(x @ l1.weight.T + l1.bias)
        h = torch.relu(h @ l2.weight.T + l2.bias)
        expected.append((h @ l3.weight.T + l3.bias)[:, 0])
    expected = torch.stack(expected)
    assert len(qf.members) == 2
    torch.testing.assert_close(qf(obs, act), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(qf.min_q(obs, act), expected.min(0).values, atol=1e-12, rtol=1e-12)
    assert (expected[0] != expected[1]).all()


def test_boltzmann_pick_frequencies_match_softmax():
    """§7.1: index ~ softmax(Q/T) per row, no Jacobian; rows are independent (two halves with different Q)."""
    M, temperature = 20_000, 0.25
    q_a = torch.tensor([0.0, 0.3, -0.5, 0.8, 0.1])
    q_b = q_a.flip(0)
    N = len(q_a)
    q = torch.cat([q_a.expand(M, N), q_b.expand(M, N)])
    y = torch.arange(N, dtype=torch.float32)[None, :, None].expand(2 * M, N, 1) + 10 * torch.arange(2 * M)[:, None, None]
    torch.manual_seed(0)
    picked = rf.boltzmann_pick(y, q, temperature)
    assert picked.shape == (2 * M, 1)
    idx = (picked[:, 0] - 10 * torch.arange(2 * M)).round().long()  # proves the pick is from its own row
    assert ((idx >= 0) & (idx < N)).all()
    for half, q_row in [(idx[:M], q_a), (idx[M:], q_b)]:
        counts = torch.bincount(half, minlength=N).double()
        expected = M * torch.softmax(q_row.double() / temperature, 0)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 25.0, (counts, expected)  # df = 4; p ~ 5e-5
        wrong = M * torch.softmax(q_row.double(), 0)  # ignoring T would be detected
        assert float(((counts - wrong) ** 2 / wrong).sum()) > 1000


def test_act_eval_is_deterministic_argmax_of_particles():
    """§7.1 evaluation: initial noise from the state itself; returns tanh of the argmax-min-Q particle."""
    actor, qf = small_nets()
    args = rf.Args(num_particles=16, flow_steps=3)
    obs = torch.randn(6, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a1 = rf.act_eval(actor, qf, obs, args)
        torch.manual_seed(123)  # the global RNG must not matter
        a2 = rf.act_eval(actor, qf, obs, args)
        single = rf.act_eval(actor, qf, obs[2:3], args)
        # reference: integrate every particle of every state, score with min over both online critics
        noise = rf.state_noise(obs, (16, 2), args.seed)
        y = rf.integrate_flow(actor, obs, noise, args.temperature, args.flow_steps, args.t_min)
        q = qf(obs.repeat_interleave(16, 0), torch.tanh(y).reshape(-1, 2)).min(0).values.view(6, 16)
    assert a1.shape == (6, 2) and (a1.abs() <= 1).all()
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    torch.testing.assert_close(single[0], a1[2], atol=1e-6, rtol=1e-6)
    best = q.argmax(1)
    torch.testing.assert_close(a1, torch.tanh(y[torch.arange(6), best]), atol=1e-6, rtol=1e-6)
    assert len(set(best.tolist())) > 1  # the argmax is state-dependent, not a fixed particle






# ---------------------------------------------------------------------------------------------------------------
# 6. One update() (§7.2)
# ---------------------------------------------------------------------------------------------------------------

UB, UOBS, UACT = 16, 3, 2


def make_update_setup(seed=0, rewards="random", **arg_overrides):
    """Small random agent, optimisers, args and batch. The target critic starts away from the online one."""
    actor, qf = small_nets(UOBS, UACT, seed=seed)
    qf_target = copy.deepcopy(qf)
    with torch.no_grad():
        for p in qf_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    kw = dict(batch_size=UB, num_particles=4, num_posterior_samples=8, flow_steps=2, tau=0.3, q_lr=1e-2, policy_lr=1e-2)
    args = rf.Args(**{**kw, **arg_overrides})
    gen = torch.Generator().manual_seed(seed + 10)
    obs, next_obs = torch.randn(UB, UOBS, generator=gen), torch.randn(UB, UOBS, generator=gen)
    actions = torch.rand(UB, UACT, generator=gen) * 2 - 1
    if rewards == "random":
        r, d = torch.randn(UB, 1, generator=gen), (torch.arange(UB) % 3 == 0).float()[:, None]
    else:  # zero reward, every transition terminal
        r, d = torch.zeros(UB, 1), torch.ones(UB, 1)
    batch = rf.Batch(obs, actions, r[:, 0], next_obs, d[:, 0])
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.policy_lr)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.q_lr)
    return batch, actor, qf, qf_target, actor_opt, q_opt, args


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_update_diagnostics_parameters_and_polyak():
    batch, actor, qf, qf_target, a_opt, q_opt, args = make_update_setup()
    actor0, qf0, target0 = params(actor), params(qf), params(qf_target)
    torch.manual_seed(0)
    logs = rf.update(batch, actor, qf, qf_target, a_opt, q_opt, args)
    expected_keys = {
        "losses/qf1_values", "losses/qf2_values", "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss",
        "losses/actor_loss", "rfm/ess", "rfm/cv_weight", "rfm/q_mean", "rfm/q_std",
    }  # fmt: skip
    assert expected_keys <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values()), logs
    torch.testing.assert_close(logs["losses/qf_loss"], (logs["losses/qf1_loss"] + logs["losses/qf2_loss"]) / 2)
    assert 1.0 <= float(logs["rfm/ess"]) <= args.num_posterior_samples
    assert abs(float(logs["rfm/cv_weight"])) <= args.cv_clip
    assert all((a != b).any() for a, b in zip(actor0, params(actor))), "every actor tensor moves"
    assert all((a != b).any() for a, b in zip(qf0, params(qf))), "every critic tensor moves"
    # Polyak: target <- target + tau (online_after_step - target), tau = 0.3 here
    for old, new, online in zip(target0, params(qf_target), params(qf)):
        torch.testing.assert_close(new, old + args.tau * (online - old), atol=1e-6, rtol=1e-6)
        assert (new != old).any()


def test_update_critic_target_has_no_entropy_term():
    """Zero reward and done = 1 everywhere: the TD target is exactly 0, so each member's loss is mean(q^2)."""
    batch, actor, qf, qf_target, a_opt, q_opt, args = make_update_setup(rewards="zero-terminal")
    obs, actions = batch[0], batch[1]
    with torch.no_grad():
        qs = qf(obs, actions)
    logs = rf.update(batch, actor, qf, qf_target, a_opt, q_opt, args)
    torch.testing.assert_close(logs["losses/qf1_loss"], (qs[0] ** 2).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["losses/qf2_loss"], (qs[1] ** 2).mean(), rtol=1e-5, atol=1e-7)




@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_update_losses_match_manual_recomputation(estimator):
    """Replays update()'s random stream to recompute both losses (§7.2 steps 2-6).

    Critic: r + gamma (1 - done) min_j Qbar_j(s', a'), a' from Boltzmann resampling with the pre-update critic.
    Actor: plain MSE of v(t, y_t, s, T) against (ŷ1 - y_t)/(1 - t), with ŷ1 from the just-updated online critic
    and the on-policy y1.
    """
    batch, actor, qf, qf_target, a_opt, q_opt, args = make_update_setup(gamma=0.9, estimator=estimator, q_lr=0.05)
    obs, actions, rewards, next_obs, dones = batch
    actor_pre, qf_pre, target_pre = (copy.deepcopy(m) for m in (actor, qf, qf_target))
    torch.manual_seed(42)
    logs = rf.update(batch, actor, qf, qf_target, a_opt, q_opt, args)

    torch.manual_seed(42)
    with torch.no_grad():
        both = torch.cat([obs, next_obs])
        noise = torch.randn(2 * UB, args.num_particles, UACT)
        y = rf.integrate_flow(actor_pre, both, noise, args.temperature, args.flow_steps, args.t_min)
        q = qf_pre(both.repeat_interleave(args.num_particles, 0), torch.tanh(y).reshape(-1, UACT)).min(0).values
        y1, next_y = rf.boltzmann_pick(y, q.view(2 * UB, -1), args.temperature).split(UB)
        next_q = target_pre(next_obs, torch.tanh(next_y)).min(0).values
        target = rewards + args.gamma * (1 - dones) * next_q
        qs = qf_pre(obs, actions)
    for j in range(2):
        torch.testing.assert_close(logs[f"losses/qf{j + 1}_loss"], ((qs[j] - target) ** 2).mean(), rtol=1e-5, atol=1e-6)

    t = torch.empty(UB, 1).uniform_(args.t_min, 1 - args.t_min)
    y_t = t * y1 + (1 - t) * torch.randn_like(y1)
    rng = torch.get_rng_state()

    def actor_loss_with(critic):
        torch.set_rng_state(rng)
        y1_hat, _ = rf.posterior_mean(critic.min_q, obs, y_t, t, args.num_posterior_samples, args.temperature, estimator,
                                      args.cv_ridge, args.cv_clip)  # fmt: skip
        with torch.no_grad():
            return ((actor_pre(obs, y_t, t, args.temperature) - (y1_hat - y_t) / (1 - t)) ** 2).mean()

    expected = actor_loss_with(qf)  # qf now holds the post-critic-step weights (Polyak only moved the target)
    torch.testing.assert_close(logs["losses/actor_loss"], expected, rtol=1e-4, atol=1e-6)
    stale = actor_loss_with(qf_pre)  # the pre-update critic gives a measurably different target
    assert not torch.isclose(stale, expected, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# 7-9. The script end to end
# ---------------------------------------------------------------------------------------------------------------

SMALL = dict(total_timesteps=300, learning_starts=100, batch_size=32, num_particles=4, num_posterior_samples=8, flow_steps=2)


def cli(env_id, **overrides):
    """`--env-id <env_id>` plus the small settings, overridden by keyword (snake_case -> --kebab-case)."""
    args = ["--env-id", env_id]
    for key, value in {**SMALL, **overrides}.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
    return args




def assert_rfm_diagnostics(scalars, K, clip=None):
    for tag in ["losses/qf_loss", "losses/actor_loss", "rfm/ess", "rfm/cv_weight", "charts/SPS"]:
        assert scalars.get(tag), f"missing {tag}: {sorted(scalars)}"
    for tag in ["losses/qf_loss", "losses/actor_loss", "rfm/cv_weight"]:
        assert all(math.isfinite(v) for _, v in scalars[tag]), scalars[tag]
    assert [s for s, _ in scalars["losses/qf_loss"]] == [100, 200]  # updates from learning_starts, logged every 100
    assert all(1.0 - 1e-4 <= v <= K + 1e-4 for _, v in scalars["rfm/ess"]), scalars["rfm/ess"]
    if clip is not None:
        assert all(abs(v) <= clip + 1e-6 for _, v in scalars["rfm/cv_weight"]), scalars["rfm/cv_weight"]


@pytest.mark.parametrize(
    "env_id,obs_dim,act_dim,gl",
    [("Hopper-v5", 11, 3, {}), ("dm_control/cartpole-swingup-v0", 5, 1, {}),
     ("dm_control/cartpole-swingup-v0", 5, 1, {"MUJOCO_GL": "egl"})],  # EGL + a late triton import once segfaulted
)  # fmt: skip
def test_end_to_end_env(run, env_id, obs_dim, act_dim, gl):
    proc, run_dir = run("rfm_flow.py", *cli(env_id, eval_every=150, eval_episodes=2, save_model=True), **gl)
    scalars = check_ok(proc, run_dir)
    assert "settotalmass" not in proc.stderr and "DISPLAY" not in proc.stderr, proc.stderr[-2000:]  # a quiet screen
    assert_rfm_diagnostics(scalars, K=8, clip=2.0)
    evals = scalars.get("eval/episodic_return", [])
    assert [s for s, _ in evals] == [150, 300], evals
    assert all(math.isfinite(v) for _, v in evals)
    if env_id == "Hopper-v5":  # random Hopper episodes end within 300 steps
        assert scalars.get("charts/episodic_return"), sorted(scalars)
    # the reloaded model evaluates exactly like the final policy (deterministic argmax-of-N acting)
    (_, saved_return), = scalars["eval/saved_model_episodic_return"]
    assert saved_return == pytest.approx(evals[-1][1], abs=1e-4)
    ckpt = torch.load(run_dir / "rfm_flow.pt", map_location="cpu")
    rf.VelocityField(obs_dim, act_dim).load_state_dict(ckpt["actor"])
    rf.TwinQ(obs_dim, act_dim).load_state_dict(ckpt["qf"])
    assert ckpt["args"]["env_id"] == env_id


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_end_to_end_estimator_flag(run, estimator):
    """--estimator reaches the update: cv_weight is 0 for noise, ((1-t)/t)^2 > 0 for gradient, |λ| <= clip for stein."""
    proc, run_dir = run("rfm_flow.py", *cli(BANDIT, eval_every=300, eval_episodes=2, estimator=estimator))
    scalars = check_ok(proc, run_dir)
    assert_rfm_diagnostics(scalars, K=8, clip=2.0 if estimator == "stein" else None)
    cv = [v for _, v in scalars["rfm/cv_weight"]]
    if estimator == "noise":
        assert all(v == 0.0 for v in cv), cv
    elif estimator == "gradient":
        assert all(v > 0.0 for v in cv), cv
    else:
        assert any(v != 0.0 for v in cv), cv
    (step, ret), = scalars["eval/episodic_return"]
    assert step == 300 and -10.0 < ret <= 1.0


def test_compiled_sampler_matches_eager():
    """--compile passes torch.compile(sample_particles) around: same latents and min-Q as eager up to rounding."""
    actor, qf = small_nets(obs_dim=5, act_dim=3)
    gen = torch.Generator().manual_seed(6)
    obs, noise = torch.randn(4, 5, generator=gen), torch.randn(4, 8, 3, generator=gen)
    with torch.no_grad():
        args = rf.Args(temperature=0.02, flow_steps=10, t_min=0.01)
        want = rf.sample_particles(actor, qf, obs, noise, args)
        got = torch.compile(rf.sample_particles)(actor, qf, obs, noise, args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_end_to_end_compile(run):
    proc, run_dir = run("rfm_flow.py", *cli(BANDIT, eval_every=300, eval_episodes=2, compile=True))
    assert_rfm_diagnostics(check_ok(proc, run_dir), K=8, clip=2.0)


BAD_INPUTS = {
    "unknown env": ["--env-id", "NoSuchEnv-v0"],
    "discrete actions": ["--env-id", "CartPole-v1"],
    "unbounded actions": ["--env-id", "tests.toy_envs:Unbounded-v0"],
    "K = 0": ["--env-id", BANDIT, "--num-posterior-samples", 0],
    "N = 0": ["--env-id", BANDIT, "--num-particles", 0],
    "no flow steps": ["--env-id", BANDIT, "--flow-steps", 0],
    "T = 0": ["--env-id", BANDIT, "--temperature", 0],
    "t_min = 0.5": ["--env-id", BANDIT, "--t-min", 0.5],
    "t_min = 0": ["--env-id", BANDIT, "--t-min", 0],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_before_training(run, tmp_path, case):
    assert_one_line_error(*run("rfm_flow.py", *BAD_INPUTS[case], "--total-timesteps", 10))
    assert not (tmp_path / "runs").exists()


def test_non_finite_loss_stops_with_step(run):
    """A critic step of size 1e30 (Adam) blows up Q at the first update; the guard names the quantity and step."""
    proc, _ = run("rfm_flow.py", *cli(BANDIT, learning_starts=50, q_lr=1e30, eval_every=1000, eval_episodes=1))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: non-finite (losses/\S+(, losses/\S+)*) at step (\d+)", last)
    assert match, proc.stderr[-2000:]
    assert int(match.group(3)) == 50  # the first update (global_step == learning_starts)




