"""Tests for benchmark/estimator_error.py: its exact posterior means, the 1/K decay of the errors it reports, and the
CLI (tiny settings, temp dir)."""

import csv
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import estimator_error as ee  # noqa: E402

F64 = torch.float64


def gaussian_latent_target(mu, cov, temperature=0.02):
    """A critic whose latent target is exactly N(mu, cov): Q(a)/T = log N(atanh a; mu, cov) - Σ log sech²(atanh a)."""
    mu, prec = torch.tensor(mu, dtype=F64), torch.linalg.inv(torch.tensor(cov, dtype=F64))

    def q_fn(obs, a):
        z = torch.atanh(a) - mu
        log_sech2 = torch.log((1 - a) * (1 + a)).sum(-1)  # sech²(atanh a) = 1 - a²
        return temperature * (-0.5 * (z @ prec * z).sum(-1) - log_sech2)

    return ee.Target("gauss", len(mu), temperature, q_fn, 4001 if len(mu) == 1 else 201)


def closed_form_posterior(mu, cov, x, alpha, sigma):
    """y1 ~ N(mu, cov), x = alpha y1 + sigma eps: E[y1 | x] (Q, D) and tr Var[y1 | x] / D."""
    mu, cov = torch.tensor(mu, dtype=F64), torch.tensor(cov, dtype=F64)
    gain = alpha * cov @ torch.linalg.inv(alpha**2 * cov + sigma**2 * torch.eye(len(mu), dtype=F64))
    mean = mu + (x - alpha * mu) @ gain.T
    return mean, torch.diagonal(cov - alpha * gain @ cov).mean()


def draws(target, n, seed):
    gen = torch.Generator().manual_seed(seed)
    y1 = ee.sample_p1(target, n, ee.support_box(target), gen)
    return y1, torch.randn(y1.shape, generator=gen, dtype=F64)


GAUSSIANS = [((0.7,), ((0.5,),)), ((0.8, -0.5), ((0.5, 0.2), (0.2, 0.3)))]


@pytest.mark.parametrize("mu,cov", GAUSSIANS, ids=["1d", "2d-correlated"])
def test_exact_means_match_closed_form_on_gaussian_latent_target(mu, cov):
    """At every flow time and diffusion step of the default run, the grid posterior (mean and variance) of a
    Gaussian latent target equals the Gaussian closed form; its marginal draws have the target's mean."""
    target = gaussian_latent_target(mu, cov)
    y1, eps = draws(target, 4000, seed=0)
    se = math.sqrt(max(max(r) for r in cov) / 4000)
    assert torch.allclose(y1.mean(0), torch.tensor(mu, dtype=F64), atol=5 * se)
    y1, eps = y1[:3], eps[:3]
    box = ee.support_box(target)
    for path, idx, alpha, sigma in ee.path_points(ee.Args()):
        x = alpha * y1 + sigma * eps
        mean, var = ee.exact_posterior(target, x, alpha, sigma, box)
        ref_mean, ref_var = closed_form_posterior(mu, cov, x, alpha, sigma)
        assert (mean - ref_mean).abs().max() < 1e-9, (path, idx)
        assert (var - ref_var).abs().max() < 1e-9 * max(1.0, float(ref_var)), (path, idx)


@pytest.mark.parametrize("name", list(ee.TARGETS))
def test_exact_means_of_the_figure_targets_are_grid_converged(name):
    """Doubling the grid resolution moves the reference means of the figure's own targets by < 1e-8."""
    target = ee.TARGETS[name]
    fine = dataclasses.replace(target, grid=2 * target.grid - 1)
    box = ee.support_box(target)
    y1, eps = draws(target, 4, seed=1)
    for path, idx, alpha, sigma in ee.path_points(ee.Args())[::5]:
        x = alpha * y1 + sigma * eps
        coarse_mean, _ = ee.exact_posterior(target, x, alpha, sigma, box)
        fine_mean, _ = ee.exact_posterior(fine, x, alpha, sigma, box)
        assert (coarse_mean - fine_mean).abs().max() < 1e-8, (path, idx)


def reported_mses(name, path, alpha, sigma, ks, points=48, budget=300_000, seed=0):
    """The script's per-call MSE (mean over points and repeats) of each estimator at one path point: {(K, est): mse}."""
    target = ee.TARGETS[name]
    y1, eps = draws(target, points, seed)
    x = alpha * y1 + sigma * eps
    mean, _ = ee.exact_posterior(target, x, alpha, sigma, ee.support_box(target))
    exact = mean if path == "flow" else (x - alpha * mean) / sigma
    out = {}
    for K in ks:
        repeats = max(4, budget // (K * points))
        for est in ee.ESTIMATORS:
            err, _, _ = ee.estimator_error(target, path, x, alpha, sigma, exact, K, est, repeats, seed + K, 1e-4, 2.0)
            out[K, est] = float(err.mean())
    return out


def diffusion_step(i):
    sched = ee.rfm_diffusion.cosine_schedule(20)
    return float(sched["alpha"][i]), float(sched["sigma"][i])


CASES = [
    ("corner-2d", "flow", 0.9, 0.1),
    ("corner-2d", "diffusion", *diffusion_step(1)),  # equivalent flow time 0.86
    ("bimodal-1d", "flow", 0.95, 0.05),
]


@pytest.mark.parametrize("name,path,alpha,sigma", CASES, ids=["corner-flow", "corner-diffusion", "bimodal-flow"])
def test_each_estimators_error_shrinks_as_one_over_k(name, path, alpha, sigma):
    """Where all three estimators are well behaved, the MSE at K = 30 is 4-25x the MSE at K = 300 (1/K: 10x)."""
    mse = reported_mses(name, path, alpha, sigma, (30, 300))
    for est in ee.ESTIMATORS:
        ratio = mse[30, est] / mse[300, est]
        assert 4.0 < ratio < 25.0, (est, ratio)


def test_diffusion_estimates_are_flow_estimates_at_the_equivalent_time():
    """The figure's shared time axis: posterior_noise at (x, α, σ), mapped to y1, equals posterior_mean at
    (x / (α + σ), α / (α + σ)) with the same seed, for every estimator."""
    target = ee.TARGETS["corner-2d"]
    alpha, sigma = diffusion_step(8)
    y1, eps = draws(target, 16, seed=2)
    x = alpha * y1 + sigma * eps
    B = x.shape[0]
    obs = x.new_zeros(B, 1)
    for est in ee.ESTIMATORS:
        torch.manual_seed(3)
        a, s = x.new_full((B, 1), alpha), x.new_full((B, 1), sigma)
        eps_hat, info_d = ee.rfm_diffusion.posterior_noise(target.q_fn, obs, x, a, s, 50, 0.02, est, 1e-4, 2.0)
        torch.manual_seed(3)
        t = x.new_full((B, 1), alpha / (alpha + sigma))
        y1_hat, info_f = ee.rfm_flow.posterior_mean(target.q_fn, obs, x / (alpha + sigma), t, 50, 0.02, est, 1e-4, 2.0)
        assert torch.allclose((x - sigma * eps_hat) / alpha, y1_hat, atol=1e-9, rtol=1e-9), est
        assert torch.allclose(info_d["ess"], info_f["ess"]) and torch.allclose(info_d["cv_weight"], info_f["cv_weight"])


TINY = ["--ks", "4", "8", "--num-times", "3", "--diffusion-steps", "5", "--num-points", "3", "--proposal-budget", "96",
        "--grid-1d", "201", "--grid-2d", "41"]  # fmt: skip


def test_run_is_deterministic_and_estimators_share_weights():
    args = ee.Args(ks=(4, 8), num_times=3, diffusion_steps=5, num_points=3, proposal_budget=96, grid_1d=201, grid_2d=41)
    first, second = ee.run(args), ee.run(args)
    assert first == second
    by_key = {}
    for r in first:
        by_key.setdefault((r["target"], r["path"], r["index"], r["K"]), set()).add(r["ess"])
    assert all(len(v) == 1 for v in by_key.values())  # common random numbers: one ESS per (target, time, K)


def test_cli_writes_png_and_csv(tmp_path):
    png, table = tmp_path / "out" / "e.png", tmp_path / "out" / "e.csv"
    script = str(ROOT / "benchmark" / "estimator_error.py")
    cmd = [sys.executable, script, *TINY, "--png", str(png), "--csv", str(table)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(ee.TARGETS) * (3 + 5) * 2 * len(ee.ESTIMATORS)
    assert {r["path"] for r in rows} == {"flow", "diffusion"} and {r["estimator"] for r in rows} == set(ee.ESTIMATORS)
    assert all(float(r["mse"]) > 0 and 0 < float(r["ess_over_k"]) <= 1 + 1e-9 for r in rows)
    assert {r["quantity"] for r in rows if r["path"] == "diffusion"} == {"eps"}


def test_bad_arguments_give_one_error_line():
    with pytest.raises(SystemExit, match="^error: --targets"):
        ee.check_args(ee.Args(targets=("nope",)))
    with pytest.raises(SystemExit, match="^error: --ks"):
        ee.check_args(ee.Args(ks=(0, 10)))
