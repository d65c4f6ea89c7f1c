"""Tests for rfm_flow.py (math: docs/rfm.md §1-§8, §12; bare § numbers below refer to that page).

Layout:
  1. an exact reference: posterior means of a separable tanh-squashed Boltzmann target by 1-D grid integration;
  2. the estimator `posterior_mean`: consistency, closed-form identities (re-seeded samples), variance ordering;
  3. the networks, the ODE sampler, Boltzmann resampling and evaluation acting;
  4. one `update()` call, recomputed by hand;
  5. the script end to end (envs, estimators, bad input, NaN guard) and, marked slow, learning a bandit.

Everything in-process runs in float64 on CPU where precision matters; replicates are vectorised along the batch
dimension (the estimator is independent per row).
"""

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.utils._python_dispatch

import rfm_flow as rf
from tests.conftest import BANDIT, assert_one_line_error, read_scalars

F64 = torch.float64
T_TOY = 0.5  # §12 toy temperature
CENTER = (0.3, -0.5)  # §12 replication centre
GRID = torch.linspace(-12.0, 12.0, 200_001, dtype=F64)  # §12: [-12, 12], 2e5 points


# ----------------------------------------------------------------------------------------------------------------
# Toy target: Q(a) = -4 ||a - c||^2, T = 0.5, p1(y) ∝ exp(Q(tanh y)/T) prod sech^2 y  (separable per dimension)
# ----------------------------------------------------------------------------------------------------------------


def log_sech2(y):
    """log sech^2 y, written independently of the script's logaddexp form."""
    a = y.abs()
    return 2.0 * math.log(2.0) - 2.0 * a - 2.0 * torch.log1p(torch.exp(-2.0 * a))


def toy_q_fn(center, column=False):
    """q_fn(obs, a) = -4 ||a - c||^2 (ignores obs); column=True returns (M, 1) instead of (M,)."""
    c = torch.as_tensor(center, dtype=F64)

    def q_fn(obs, a):
        q = -4.0 * ((a - c) ** 2).sum(-1)
        return q[:, None] if column else q

    return q_fn


def toy_log_p1(y, c):
    """Per-dimension unnormalised log p1 for centre coordinate c."""
    return -4.0 * (torch.tanh(y) - c) ** 2 / T_TOY + log_sech2(y)


def toy_score(y, c):
    """g(y) = d/dy log p1 = Q'(tanh y) (1 - tanh^2 y) / T - 2 tanh y, analytic (per dimension)."""
    a = torch.tanh(y)
    return -8.0 * (a - c) * (1.0 - a * a) / T_TOY - 2.0 * a


def grid_posterior(log_p1_grid, yt, t):
    """Normalised posterior p(y1 | y_t) ∝ p1(y1) N(y_t; t y1, (1-t)^2) on GRID. yt, t: (B,) -> (B, G)."""
    log_post = log_p1_grid[None] - (yt[:, None] - t[:, None] * GRID[None]) ** 2 / (2.0 * (1.0 - t[:, None]) ** 2)
    return torch.softmax(log_post, dim=1)


def exact_posterior_mean(yt, t, center):
    """E[y1 | y_t] for the separable toy target, one 1-D grid integral per dimension. yt (B, D), t (B, 1)."""
    out = torch.empty_like(yt)
    for i, c in enumerate(center):
        post = grid_posterior(toy_log_p1(GRID, c), yt[:, i], t[:, 0])
        out[:, i] = (post * GRID).sum(1)
    return out


def sample_p1(n, center, gen):
    """n exact draws of y1 ~ p1 (per dimension from the grid density)."""
    cols = [GRID[torch.multinomial(torch.softmax(toy_log_p1(GRID, c), 0), n, True, generator=gen)] for c in center]
    return torch.stack(cols, 1)


def sample_yt(n, t, center, seed):
    """n draws of y_t = t y1 + (1 - t) y0 from the marginal p_t (typical conditioning points); t: float or (n, 1)."""
    gen = torch.Generator().manual_seed(seed)
    y1 = sample_p1(n, center, gen)
    return t * y1 + (1 - t) * torch.randn(y1.shape, generator=gen, dtype=F64)


def call_posterior_mean(center, yt, t, K, estimator, seed, column=False, cv_ridge=1e-4, cv_clip=2.0):
    """Seeded posterior_mean on the toy target (the scripts' default ridge and clip); t a float or a (B, 1) tensor."""
    B = yt.shape[0]
    t = torch.full((B, 1), t, dtype=F64) if isinstance(t, float) else t
    torch.manual_seed(seed)
    return rf.posterior_mean(toy_q_fn(center, column), torch.zeros(B, 1, dtype=F64), yt, t, num_samples=K,
                             temperature=T_TOY, estimator=estimator, cv_ridge=cv_ridge, cv_clip=cv_clip)  # fmt: skip


def reference_terms(center, yt, t, K, seed):
    """Recompute the estimator's ingredients from the same re-seeded y0 (independent implementation)."""
    B, D = yt.shape
    c = torch.as_tensor(center, dtype=F64)
    torch.manual_seed(seed)
    y0 = torch.randn(B, K, D, dtype=F64)
    tt = t[:, :, None]
    y1 = (yt[:, None] - (1 - tt) * y0) / tt
    logits = -4.0 * ((torch.tanh(y1) - c) ** 2).sum(-1) / T_TOY + log_sech2(y1).sum(-1)
    w = torch.softmax(logits, dim=1)[..., None]
    g = torch.stack([toy_score(y1[..., i], ci) for i, ci in enumerate(center)], -1)
    s = g + tt / (1 - tt) * y0
    return {"y0": y0, "y1": y1, "w": w, "g": g, "s": s}


# ---------------------------------------------------------------------------------------------------------------
# 1. The grid integrator itself
# ---------------------------------------------------------------------------------------------------------------


def test_grid_normalisation_of_sech2():
    """∫ sech^2 = 2: the grid and the stable log sech^2 are exact to quadrature precision."""
    dx = float(GRID[1] - GRID[0])
    assert float(torch.exp(log_sech2(GRID)).sum()) * dx == pytest.approx(2.0, abs=1e-8)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_grid_posterior_mean_of_gaussian_prior(t):
    """For a Gaussian p1 = N(m, s^2) the posterior mean is closed form: m + s^2 t (y_t - t m) / (t^2 s^2 + (1-t)^2)."""
    m, s = 0.7, 1.3
    yt = torch.tensor([-2.0, 0.1, 1.5], dtype=F64)
    tt = torch.full_like(yt, t)
    post = grid_posterior(-((GRID - m) ** 2) / (2 * s * s), yt, tt)
    closed = m + s * s * t * (yt - t * m) / (t * t * s * s + (1 - t) ** 2)
    torch.testing.assert_close((post * GRID).sum(1), closed, atol=1e-8, rtol=0)


@pytest.mark.parametrize("t", [0.05, 0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("c", CENTER + (0.9,))
def test_grid_posterior_score_has_zero_mean(t, c):
    """§12.2: E_post[g(y1) + t/(1-t) y0] = 0 with y0 = (y_t - t y1)/(1-t) (Stein identity; also checks g)."""
    yt = torch.tensor([-1.5, -0.2, 0.4, 1.1], dtype=F64)
    post = grid_posterior(toy_log_p1(GRID, c), yt, torch.full_like(yt, t))
    y0 = (yt[:, None] - t * GRID[None]) / (1 - t)
    s_post = toy_score(GRID, c)[None] + t / (1 - t) * y0
    assert (post * s_post).sum(1).abs().max() < 1e-8
    # and the score term alone is far from zero, so the identity is not trivially satisfied
    assert (post * toy_score(GRID, c)[None]).sum(1).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# 2. Consistency: every estimator converges to the exact posterior mean
# ---------------------------------------------------------------------------------------------------------------

ESTIMATORS = ["noise", "gradient", "stein"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("t", [0.5, 0.8])
def test_consistency_large_K(estimator, t):
    """§12.3: with K = 2e5 every member is within ~0.02 of E[y1 | y_t].

    GE at t = 0.5 is the one exception in practice: its per-sample variance is ~100x NE's (§12 table, median MSE
    1.7-2.3 at K = 100), so at K = 2e5 its standard error alone is ~0.03; it gets K = 1e6 and 0.03. Omitting the tanh
    Jacobian, by contrast, moves the exact mean by ~1 at these points.
    """
    yt = sample_yt(3, t, CENTER, seed=11)
    tt = torch.full((3, 1), t, dtype=F64)
    exact = exact_posterior_mean(yt, tt, CENTER)
    K, tol = (1_000_000, 0.03) if (estimator, t) == ("gradient", 0.5) else (200_000, 0.02)
    y_hat, _ = call_posterior_mean(CENTER, yt, t, K, estimator, seed=3)
    assert (y_hat - exact).abs().max() < tol


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("t", [0.5, 0.8])
def test_error_decreases_with_K(estimator, t):
    """Mean squared error over 64 replicates falls by more than 20x from K = 10 to K = 1e4."""
    R = 64
    yt = sample_yt(1, t, CENTER, seed=5).expand(R, -1).contiguous()
    exact = exact_posterior_mean(yt[:1], torch.full((1, 1), t, dtype=F64), CENTER)

    def mse(K):
        y_hat, _ = call_posterior_mean(CENTER, yt, t, K, estimator, seed=K)
        return float(((y_hat - exact) ** 2).sum(-1).mean())

    small, large = mse(10), mse(10_000)
    assert large * 20 < small, (small, large)


# ---------------------------------------------------------------------------------------------------------------
# 3. Closed-form identities on the same samples (§3-§6)
# ---------------------------------------------------------------------------------------------------------------

# eight rows per t: the noise end (wide proposals, |y1| ~ 50), the middle, and the data end
T_ROWS = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 0.99], dtype=F64).repeat_interleave(8)[:, None]
TOY_CASES = {
    "2d": dict(center=CENTER, column=False),
    "1d-column-q": dict(center=(0.7,), column=True),  # q_fn returns (M, 1)
}


def identity_inputs(case, seed=0):
    center = TOY_CASES[case]["center"]
    return center, sample_yt(len(T_ROWS), T_ROWS, center, seed), T_ROWS.clone()


@pytest.mark.parametrize("case", TOY_CASES)
@pytest.mark.parametrize("estimator", ["noise", "gradient"])
def test_closed_forms_of_noise_and_gradient(case, estimator):
    """§5: NE = Σ w y1; GE = y_t/t + ((1-t)/t)^2 Σ w g (the y0 terms cancel); cv_weight = 0 / ((1-t)/t)^2."""
    center, yt, t = identity_inputs(case)
    K = 64
    y_hat, info = call_posterior_mean(center, yt, t, K, estimator, seed=9, column=TOY_CASES[case]["column"])
    ref = reference_terms(center, yt, t, K, seed=9)
    if estimator == "noise":
        expected, lam = (ref["w"] * ref["y1"]).sum(1), torch.zeros_like(yt)
    else:
        lam = ((1 - t) / t) ** 2 * torch.ones_like(yt)
        expected = yt / t + lam * (ref["w"] * ref["g"]).sum(1)
    assert y_hat.shape == yt.shape and y_hat.dtype == F64
    torch.testing.assert_close(y_hat, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(info["cv_weight"], lam, atol=1e-12, rtol=1e-12)
    ess = 1.0 / (ref["w"][..., 0] ** 2).sum(1)
    assert info["ess"].shape == (len(t),)
    torch.testing.assert_close(info["ess"], ess, atol=1e-9, rtol=1e-9)
    assert (info["ess"] >= 1 - 1e-9).all() and (info["ess"] <= K + 1e-9).all()
    assert info["ess"].min() < 0.5 * K and info["ess"].max() > 2  # weights are neither uniform nor degenerate


@pytest.mark.parametrize("case", TOY_CASES)
@pytest.mark.parametrize("ridge,clip", [(1e-4, 2.0), (0.05, 0.1)])
def test_stein_plug_in_lambda_and_line_form(case, ridge, clip):
    """§6 λ (w²-weighted moments, w-weighted centring, ridge, clip) and §5's line form through NE and GE."""
    center, yt, t = identity_inputs(case)
    K, column = 64, TOY_CASES[case]["column"]
    y_hat, info = call_posterior_mean(center, yt, t, K, "stein", seed=4, column=column, cv_ridge=ridge, cv_clip=clip)
    ref = reference_terms(center, yt, t, K, seed=4)
    w, y1, s = ref["w"], ref["y1"], ref["s"]
    y_bar, s_bar = (w * y1).sum(1), (w * s).sum(1)
    w2 = w**2
    lam_star = -(w2 * (y1 - y_bar[:, None]) * (s - s_bar[:, None])).sum(1) / (
        (w2 * (s - s_bar[:, None]) ** 2).sum(1) + ridge
    )
    lam = lam_star.clamp(-clip, clip)
    torch.testing.assert_close(info["cv_weight"], lam, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y_hat, y_bar + lam * s_bar, atol=1e-10, rtol=1e-10)
    # the clip is exercised on both sides of its threshold
    assert (lam_star.abs() > clip).any() and (lam_star.abs() < clip).any()
    assert (info["cv_weight"].abs() <= clip + 1e-12).all()
    # line form: ŷ(λ) = (1 - μ) ŷ_NE + μ ŷ_GE, μ = λ t² / (1 - t)², on the same samples
    y_ne, _ = call_posterior_mean(center, yt, t, K, "noise", seed=4, column=column)
    y_ge, _ = call_posterior_mean(center, yt, t, K, "gradient", seed=4, column=column)
    mu = info["cv_weight"] * t**2 / (1 - t) ** 2
    torch.testing.assert_close(y_hat, (1 - mu) * y_ne + mu * y_ge, atol=1e-9, rtol=1e-9)


def test_posterior_mean_is_a_constant_target():
    """Stop-gradient (§6): the target carries no graph and leaves no gradient in the critic's parameters."""
    center = torch.nn.Parameter(torch.tensor(CENTER, dtype=F64))

    def q_fn(obs, a):
        return -4.0 * ((a - center) ** 2).sum(-1)

    yt = torch.randn(4, 2, dtype=F64)
    t = torch.full((4, 1), 0.6, dtype=F64)
    for estimator in ESTIMATORS:
        y_hat, info = rf.posterior_mean(q_fn, torch.zeros(4, 1, dtype=F64), yt, t, 16, T_TOY, estimator, 1e-4, 2.0)
        assert not y_hat.requires_grad
        assert center.grad is None


# ---------------------------------------------------------------------------------------------------------------
# 4. Variance ordering (§12.4-§12.7): median over y_t of the per-y_t MSE, K = 100
# ---------------------------------------------------------------------------------------------------------------

VAR_TS = (0.05, 0.2, 0.5, 0.8, 0.95)


@pytest.fixture(scope="module")
def variance_table():
    """{t: {estimator: median over 20 y_t ~ p_t of the MSE over 200 replicates}}, plus the unclipped plug-in."""
    n_yt, R, K = 20, 200, 100
    table = {}
    for i, t in enumerate(VAR_TS):
        yt = sample_yt(n_yt, t, CENTER, seed=100 + i)
        exact = exact_posterior_mean(yt, torch.full((n_yt, 1), t, dtype=F64), CENTER).repeat_interleave(R, 0)
        yt_rep = yt.repeat_interleave(R, 0)
        row = {}
        for name, est, kw in [
            ("noise", "noise", {}),
            ("gradient", "gradient", {}),
            ("stein", "stein", {}),
            ("stein_noclip", "stein", {"cv_clip": math.inf}),
        ]:
            y_hat, info = call_posterior_mean(CENTER, yt_rep, t, K, est, seed=1000 + i, **kw)
            mse = ((y_hat - exact) ** 2).sum(-1).view(n_yt, R).mean(1)
            row[name] = float(mse.median())
            if name == "stein_noclip":
                row["max_abs_lambda_noclip"] = float(info["cv_weight"].abs().max())
        table[t] = row
    return table


VARIANCE_CLAIMS = {
    "GE catastrophic at t=0.05 (>= 1e4 x NE)": lambda m: m[0.05]["gradient"] >= 1e4 * m[0.05]["noise"],
    "GE error falls >= 100x per t step": lambda m: all(
        m[a]["gradient"] >= 100 * m[b]["gradient"] for a, b in zip(VAR_TS, VAR_TS[1:])
    ),
    "NE best at t <= 0.2": lambda m: all(
        m[t]["noise"] < min(m[t]["gradient"], m[t]["stein"], m[t]["stein_noclip"]) for t in (0.05, 0.2)
    ),
    "clip cuts the plug-in error >= 4x at t=0.05": lambda m: m[0.05]["stein_noclip"] >= 4 * m[0.05]["stein"],
    "GE beats NE >= 100x at t=0.95": lambda m: m[0.95]["noise"] >= 100 * m[0.95]["gradient"],
    "plug-in beats both >= 10x at t >= 0.8": lambda m: all(
        10 * m[t]["stein"] <= min(m[t]["noise"], m[t]["gradient"]) for t in (0.8, 0.95)
    ),
    "clip inactive at t >= 0.8": lambda m: all(
        m[t]["max_abs_lambda_noclip"] < 2.0 and m[t]["stein"] == m[t]["stein_noclip"] for t in (0.8, 0.95)
    ),
    "plug-in no worse than the better of NE and GE at t >= 0.5": lambda m: all(
        m[t]["stein"] <= min(m[t]["noise"], m[t]["gradient"]) for t in (0.5, 0.8, 0.95)
    ),
    "plug-in < NE < GE at t=0.5 (medians)": lambda m: m[0.5]["stein"] < m[0.5]["noise"] < m[0.5]["gradient"],
}


@pytest.mark.parametrize("claim", VARIANCE_CLAIMS)
def test_variance_ordering(variance_table, claim):
    assert VARIANCE_CLAIMS[claim](variance_table), variance_table


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
    """The split first layer (state_term + time_term + W_y y) is the Linear of the concatenation."""
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


@pytest.mark.parametrize("script", ["rfm_flow", "rfm_diffusion"])
def test_eval_noise_is_a_function_of_each_state(script):
    """Evaluation noise: the same for the same observation (whatever the batch around it, the global RNG, the
    call), independent across states and seeds, standard normal."""
    state_noise = __import__(script).state_noise
    obs = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    z = state_noise(obs, (4, 2), seed=1)
    torch.manual_seed(5)
    assert z.shape == (300, 4, 2)
    assert torch.equal(state_noise(obs[7:9].flip(0), (4, 2), seed=1), z[7:9].flip(0))
    assert not torch.equal(state_noise(obs, (4, 2), seed=2), z)
    rows = z.reshape(300, -1)
    assert len({tuple(r.tolist()) for r in rows}) == 300  # different states, different draws
    corr = torch.corrcoef(rows[:, :2].T)[0, 1]  # no shared component across states
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.05 and abs(corr) < 0.2
    gen_state = torch.get_rng_state()
    state_noise(obs, (4, 2), seed=1)
    assert torch.equal(gen_state, torch.get_rng_state())  # training draws are untouched by evaluation


@pytest.mark.parametrize("script", ["rfm_flow", "rfm_diffusion", "qvpo_baseline", "dipo_baseline"])
def test_replay_buffer_rows_wrap_and_sample(script):
    """Row writes into one (size, fields) tensor: what was added comes back field by field, the ring wraps after
    `size` rows, and sampling draws only filled rows. The buffer is the same in every script, so it is tested here
    for all four."""
    rb = __import__(script).ReplayBuffer(5, 3, 2, torch.device("cpu"))
    rng = np.random.default_rng(0)
    added = []
    for step in range(7):
        o, o2, a = rng.normal(size=(1, 3)), rng.normal(size=(1, 3)), rng.uniform(-1, 1, (1, 2))
        r, term = rng.normal(size=1), np.array([step % 2 == 0])
        rb.add(o, o2, a, r, term)
        added.append(np.concatenate([o[0], a[0], r, o2[0], term.astype(float)]))
        if step == 1:
            assert not rb.full and sorted(rb.sample(200)[2].unique().tolist()) == sorted(float(np.float32(x[5])) for x in added)
    assert rb.full and rb.ptr == 2
    expected = np.stack(added[5:] + added[2:5])  # rows 0, 1 overwritten by the 6th and 7th transitions
    np.testing.assert_allclose(rb.data.numpy(), expected, rtol=1e-6)
    obs, act, rew, next_obs, done = rb.sample(64)
    assert obs.shape == (64, 3) and act.shape == (64, 2) and next_obs.shape == (64, 3)
    assert rew.shape == done.shape == (64,)  # one value per transition
    rows = torch.cat([obs, act, rew[:, None], next_obs, done[:, None]], 1)
    assert all((torch.as_tensor(expected, dtype=torch.float32) == row).all(1).any() for row in rows)


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


@pytest.mark.parametrize("script", ["rfm_flow", "rfm_diffusion"])
def test_critic_members_are_clipped_separately(script, monkeypatch):
    """§7.2 step 3, as the official update vmapped over members: member j's gradient is that of its own MSE, clipped
    to norm max_grad_norm on its own (a joint clip over both would scale both by one factor)."""
    mod = __import__(script)
    batch, _, qf, qf_target, _, q_opt, args = make_update_setup(rewards="zero-terminal", max_grad_norm=1e-3)
    actor = mod.NoiseNet(UOBS, UACT, 2) if script == "rfm_diffusion" else rf.VelocityField(UOBS, UACT)
    a_opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    args = mod.Args(**{k: v for k, v in vars(args).items() if hasattr(mod.Args, k)})
    if script == "rfm_diffusion":
        args.diffusion_steps = 2
    obs, actions = batch[0], batch[1]
    expected = []
    for j, member in enumerate(qf.members):  # target is exactly 0 here: loss_j = mean(Q_j^2)
        grads = torch.autograd.grad((qf(obs, actions)[j] ** 2).mean(), list(member.parameters()))
        norm = torch.cat([g.flatten() for g in grads]).norm()
        assert norm > 10 * args.max_grad_norm  # the clip is active
        expected += [g * args.max_grad_norm / norm for g in grads]
    seen, step = [], q_opt.step
    monkeypatch.setattr(q_opt, "step", lambda *a, **k: (seen.append([p.grad.clone() for p in qf.parameters()]), step(*a, **k)))
    mod.update(batch, actor, qf, qf_target, a_opt, q_opt, args)
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


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


def check_ok(proc, run_dir):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_dir is not None
    return read_scalars(run_dir)


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


def policy_samples(script, run_dir, obs, **overrides):
    """One action per state from the policy saved by --save-model, with no critic selection (one particle): what the
    policy itself learned. obs (n, obs_dim) -> actions in [-1, 1]^D."""
    mod = __import__(script)
    saved = torch.load(run_dir / f"{script}.pt", map_location="cpu")
    args = mod.Args(**{**{k: v for k, v in saved["args"].items() if hasattr(mod.Args, k)}, "num_particles": 1, **overrides})
    D = saved["actor"]["out.bias"].shape[0]
    actor = mod.VelocityField(obs.shape[1], D) if script == "rfm_flow" else mod.NoiseNet(obs.shape[1], D, args.diffusion_steps)
    qf = mod.TwinQ(obs.shape[1], D)
    actor.load_state_dict(saved["actor"])
    qf.load_state_dict(saved["qf"])
    torch.manual_seed(0)
    with torch.no_grad():
        return mod.act(actor, qf, obs, args)


def bandit_return(actions, obs):
    """ContextBandit's reward for normalised actions (env box [-1, 3]: a_env = 2 a + 1)."""
    best = torch.tensor([1.5, 0.5]) + 0.5 * obs
    return 1 - ((2 * actions + 1 - best) ** 2).sum(1) / 4


LEARN = ["--total-timesteps", 3000, "--learning-starts", 500, "--batch-size", 64, "--num-particles", 16,
         "--num-posterior-samples", 32, "--eval-every", 1000, "--eval-episodes", 20, "--save-model"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rfm_flow", "rfm_diffusion"])
def test_learns_context_bandit(run, script):
    """Optimum 1 for every context; uniform-random actions get ≈ 0.17. The script's own evaluation (argmax of N
    particles under the learned critic) would score high for an actor that never trained, so the policy is scored
    here with ONE sample per state and no selection, against the same network at its initialisation (an actor that
    never trains scores exactly that). Measured: rfm_flow 0.334 against 0.221 untrained after 2500 updates, while
    the script's argmax-of-16 evaluation read 0.96: the policy itself learns slowly at T = 0.02, the selection does
    most of the work at this budget (the official code behaves alike on a one-particle bandit)."""
    extra = ["--diffusion-steps", 10] if script == "rfm_diffusion" else []
    proc, run_dir = run(f"{script}.py", "--env-id", BANDIT, *LEARN, *extra, timeout=2400)
    evals = check_ok(proc, run_dir)["eval/episodic_return"]
    obs = torch.rand(500, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1
    learned = bandit_return(policy_samples(script, run_dir, obs), obs).mean().item()
    torch.save({**torch.load(run_dir / f"{script}.pt"), "actor": initial_actor(script, run_dir).state_dict()},
               run_dir / f"{script}.pt")
    untrained = bandit_return(policy_samples(script, run_dir, obs), obs).mean().item()
    print(f"{script}: script eval (argmax of 16) {evals}; one sample: learned {learned:.3f}, untrained {untrained:.3f}")
    assert learned >= untrained + 0.05, (learned, untrained)  # 500 contexts: standard error ~0.02


def initial_actor(script, run_dir):
    """The actor exactly as the script initialised it (seed 1; envs draw no torch randomness before it)."""
    mod = __import__(script)
    saved = torch.load(run_dir / f"{script}.pt", map_location="cpu")
    torch.manual_seed(saved["args"]["seed"])
    D = saved["actor"]["out.bias"].shape[0]
    obs_dim = saved["actor"]["inp.weight"].shape[1] - D - 256
    if script == "rfm_flow":
        return mod.VelocityField(obs_dim, D)
    return mod.NoiseNet(obs_dim, D, saved["args"]["diffusion_steps"])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rfm_flow", "rfm_diffusion"])
def test_covers_both_modes_of_a_two_mode_bandit(run, script):
    """Two equal optima at a = ±0.5 (tests/toy_envs.py TwoModeBandit): single samples of the trained policy cover
    both optima, as the Boltzmann target does, rather than collapsing onto one. Measured after 2500 updates: rfm_flow
    0.27 of samples within 0.15 of an optimum, 0.60 of those at +0.5; rfm_diffusion 0.35 and 0.82 (the policies are
    not yet concentrated at this budget, see test_learns_context_bandit)."""
    extra = ["--diffusion-steps", 10] if script == "rfm_diffusion" else []
    proc, run_dir = run(f"{script}.py", "--env-id", "tests.toy_envs:TwoModeBandit-v0", *LEARN, *extra, timeout=2400)
    check_ok(proc, run_dir)
    a = policy_samples(script, run_dir, torch.zeros(2000, 1))[:, 0]
    near = (a.abs() - 0.5).abs() < 0.15
    right = (a[near] > 0).float().mean().item()
    print(f"{script}: {near.float().mean().item():.2f} of single samples within 0.15 of an optimum, {right:.2f} of them at +0.5")
    assert near.sum() > 200 and 0.1 < right < 0.9, (near.float().mean(), right)


class SyncOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that force a host-device sync on a GPU (a tensor read back as a Python scalar, nonzero) while
    running on the CPU; Adam's step counters are skipped, since they live on the host even for CUDA parameters."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero"}

    def __init__(self, host_tensors=()):
        super().__init__()
        self.host_tensors, self.calls = list(host_tensors), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING and not any(args[0] is t for t in self.host_tensors):
            self.calls.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("script", ["rfm_flow", "rfm_diffusion"])
def test_training_step_has_no_host_syncs(script):
    """docs/rfm.md §10: update() and act() read nothing back to the host (the loop's one copy is the action itself),
    so a GPU step runs without draining its queue."""
    mod = __import__(script)
    batch, _, qf, qf_target, _, q_opt, args = make_update_setup()
    actor = mod.NoiseNet(UOBS, UACT, 2) if script == "rfm_diffusion" else rf.VelocityField(UOBS, UACT)
    a_opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    args = mod.Args(**{k: v for k, v in vars(args).items() if hasattr(mod.Args, k)})
    if script == "rfm_diffusion":
        args.diffusion_steps = 2
    mod.update(batch, actor, qf, qf_target, a_opt, q_opt, args)  # creates Adam's state
    steps = [state["step"] for opt in (a_opt, q_opt) for state in opt.state.values()]
    with SyncOps(steps) as ops:
        logs = mod.update(batch, actor, qf, qf_target, a_opt, q_opt, args)
        with torch.no_grad():
            mod.act(actor, qf, batch[0][:1], args)
    assert ops.calls == [], ops.calls
    assert all(v.dim() == 0 for v in logs.values())  # diagnostics stay tensors until the logging cadence reads them
