"""Tests of the RFM estimator `posterior_mean` of rfm_flow.py (math: docs/rfm.md §3-§6, §12; bare § numbers below
refer to that page).

Layout:
  1. an exact reference: posterior means of a separable tanh-squashed Boltzmann target by 1-D grid integration;
  2. consistency: every estimator converges to the exact posterior mean;
  3. closed-form identities on the same (re-seeded) samples;
  4. the variance ordering of §12.

Everything runs in float64 on CPU; replicates are vectorised along the batch dimension (the estimator is independent
per row). The rest of rfm_flow.py is tested in tests/test_rfm_flow.py.
"""

import math

import pytest
import torch

import rfm_flow as rf

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
