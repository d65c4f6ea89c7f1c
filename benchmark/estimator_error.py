"""Error of the RFM posterior estimators against exact posterior means, flow and diffusion side by side.

    python benchmark/estimator_error.py                      # writes docs/estimator_error.png and .csv (~2 min, CPU)
    python benchmark/estimator_error.py --ks 10 100 --num-points 8 --png /tmp/e.png --csv /tmp/e.csv

Two small tanh-squashed Boltzmann targets p1(y) ∝ exp(Q(tanh y)/T) ∏ sech²(y) with hand-made critics (no state),
both at the scripts' default T = 0.02:
  - `bimodal-1d`: a tilted double well, Q(a) = -1.2 (a² - 0.36)² + 0.02 a: modes at a ≈ ±0.62, the right one
    e^1.2 ≈ 3.3x heavier (P(a > 0) = 0.76), separated by a barrier of Q/T ≈ -7.8 at a = 0;
  - `corner-2d`: a correlated quadratic with its optimum near the corner of the action box,
    Q(a) = -0.4 (a - c)ᵀ P (a - c), c = (0.95, 0.85), P = [[1, 0.5], [0.5, 1]]: the tanh Jacobian pulls the latent
    mode inside, to a ≈ (0.83, 0.79), and leaves a heavy tail towards the corner; the density is not separable.

Exact posterior means E[y1 | x] under x = α y1 + σ ε (flow: α = t, σ = 1 - t) come from grid integration in float64
on a window per query, the box [-16, 16]^D (the sech² tails leave ~e^-30 of the mass outside) intersected with
x/α ± 14 σ/α, with --grid-1d points (1-D) or --grid-2d points per dimension (2-D); doubling either changes the
means by < 1e-8.

Conditioning points are drawn from the true marginal: --num-points draws y1 ~ p1 (categorical on a fine grid of p1,
jittered uniformly within the cell) and ε ~ N(0, I), reused at every time (common random numbers, smooth curves):
flow y_t = t y1 + (1 - t) ε at --num-times flow times, logit-spaced from t_min to 1 - t_min; diffusion x_i = α_i y1 +
σ_i ε at every step of `rfm_diffusion.cosine_schedule(--diffusion-steps)`. Each point is repeated as rows of one
batched call to the scripts' own, unchanged `rfm_flow.posterior_mean` / `rfm_diffusion.posterior_noise` (float64,
ridge and clip at the scripts' defaults), for every estimator (noise, gradient, stein) and every K; the three
estimators of one (target, time, K) share the seed, so they see the same proposals and the same weights (same ESS).
Repeats per point are max(4, --proposal-budget // (K · num_points)).

Error: flow, squared error of ŷ1 against E[y1 | y_t]; diffusion, squared error of ε̂ against E[ε | x_i]
= (x_i - α_i E[y1 | x_i]) / σ_i (the quantity the ε-network regresses; in y1 units multiply by (σ/α)², the CSV has
both). Per row it is averaged over action dimensions (like the loss), then over repeats; `mse` is the mean over
conditioning points (the expected error under p_t), `mse_median` the median over points. Diffusion is plotted at its
equivalent flow time α/(α + σ): x/(α + σ) is a point of the linear path at that time, and the estimators there are
the flow estimators at that time (the proposals, weights, scores and λ coincide), so both panels share one axis.

The figure: MSE against time per estimator (colour) and K (line style) for each target, flow left, diffusion right;
the mean ESS/K; and where the plug-in sits on the line from noise (μ = 0) to gradient (μ = 1), μ = λ α²/σ² (median
over rows and dimensions), with the clip's bound ±c α²/σ². Seeded and single-threaded by default: a re-run rewrites
the same CSV (and PNG).

CSV, one row per (target, path, time, K, estimator): `index` (flow time index, or diffusion step i), `t` (flow time,
or α/(α + σ)), `alpha`, `sigma`, `K`, `estimator`, `quantity` (y1 or eps), `mse`, `mse_median`, `mse_y1`, `post_var`
(mean exact posterior variance per dimension, same units as `mse`), `ess` (mean over rows), `ess_over_k`,
`lambda_mean`, `mu_median`, `clip_frac` (share of λ entries at the clip), `points`, `repeats`.
"""

import csv
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rfm_diffusion  # noqa: E402
import rfm_flow  # noqa: E402

F64 = torch.float64
ESTIMATORS = ("noise", "gradient", "stein")
SUPPORT_HALF_WIDTH = 16.0  # global grid [-16, 16] per dimension for the support of p1 (tanh(16) < 1 in float64)
WINDOW_SDS = 14.0  # the likelihood window x/α ± 14 σ/α


@dataclass
class Args:
    seed: int = 0
    """seed of the conditioning points and of every estimator call"""
    ks: tuple[int, ...] = (10, 100, 1000)
    """proposal counts K"""
    num_times: int = 21
    """flow times, logit-spaced from t_min to 1 - t_min"""
    t_min: float = 0.01
    """flow time range [t_min, 1 - t_min] (the scripts' default)"""
    diffusion_steps: int = 20
    """DDPM steps of the cosine schedule (the scripts' default); every step is evaluated"""
    num_points: int = 32
    """conditioning points y_t (x_i) drawn from the marginal, per time"""
    proposal_budget: int = 2**18
    """proposals per estimator call: repeats per point = max(4, budget // (K * num_points))"""
    targets: tuple[str, ...] = ("bimodal-1d", "corner-2d")
    """targets to run"""
    grid_1d: int = 4001
    """grid points of the exact posterior mean, 1-D target"""
    grid_2d: int = 201
    """grid points per dimension of the exact posterior mean, 2-D target"""
    png: str = os.path.join(ROOT, "docs", "estimator_error.png")
    """output figure"""
    csv: str = os.path.join(ROOT, "docs", "estimator_error.csv")
    """output table"""
    threads: int = 1
    """torch CPU threads (the default 1 makes re-runs bit-identical)"""


# ----------------------------------------------------------------------------------------------------------------
# Targets: hand-made critics q_fn(obs (M, obs_dim), actions (M, D)) -> (M,), as the scripts expect


@dataclass
class Target:
    name: str
    dim: int
    temperature: float
    q_fn: object
    grid: int  # grid points per dimension of the exact posterior mean


def bimodal_q(obs, a):
    return -1.2 * (a[:, 0].square() - 0.36).square() + 0.02 * a[:, 0]


CORNER_C = (0.95, 0.85)
CORNER_P = ((1.0, 0.5), (0.5, 1.0))


def corner_q(obs, a):
    d = a - torch.tensor(CORNER_C, dtype=a.dtype)
    return -0.4 * (d @ torch.tensor(CORNER_P, dtype=a.dtype) * d).sum(-1)


TARGETS = {
    "bimodal-1d": Target("bimodal-1d", 1, 0.02, bimodal_q, 4001),
    "corner-2d": Target("corner-2d", 2, 0.02, corner_q, 201),
}


def log_sech2(y):
    return -2.0 * (torch.logaddexp(y, -y) - math.log(2.0))


def log_p1(target, y):
    """Unnormalised latent log-density log p1(y) = Q(tanh y)/T + Σ log sech²(y). y (..., D) float64 -> (...)."""
    flat = y.reshape(-1, target.dim)
    q = target.q_fn(flat.new_zeros(flat.shape[0], 1), torch.tanh(flat)).reshape(-1)
    return (q / target.temperature + log_sech2(flat).sum(-1)).reshape(y.shape[:-1])


def product_grid(lo, hi, n):
    """Per-query product grids. lo, hi (Q, D) -> points (Q, n**D, D)."""
    u = torch.linspace(0.0, 1.0, n, dtype=F64)
    axes = [lo[:, d, None] + (hi - lo)[:, d, None] * u for d in range(lo.shape[1])]  # D x (Q, n)
    if len(axes) == 1:
        return axes[0][..., None]
    if len(axes) == 2:
        a0 = axes[0][:, :, None].expand(-1, n, n)
        a1 = axes[1][:, None, :].expand(-1, n, n)
        return torch.stack([a0, a1], -1).reshape(lo.shape[0], n * n, 2)
    raise ValueError("targets of dimension 1 or 2 only")


def support_box(target, n=801):
    """The box [-L, L]^D that holds p1 (L = SUPPORT_HALF_WIDTH); checks that log p1 on its faces is < max - 25.

    The sech² factor makes the latent tails decay like e^{-2|y|}, so the mass outside is ~e^{-30} of the total."""
    L, D = SUPPORT_HALF_WIDTH, target.dim
    lo, hi = torch.full((D,), -L, dtype=F64), torch.full((D,), L, dtype=F64)
    pts = product_grid(lo[None], hi[None], n)[0]
    lp = log_p1(target, pts)
    face = (pts.abs() == L).any(-1)
    assert float(lp[face].max() - lp.max()) < -25.0, f"{target.name}: p1 is not negligible on the faces of its box"
    return lo, hi


def exact_posterior(target, x, alpha, sigma, box, chunk=8):
    """Exact E[y1 | x] (Q, D) and tr Var[y1 | x] / D (Q,) under x = alpha y1 + sigma eps, by grid integration (float64).

    x (Q, D); alpha, sigma floats. The posterior ∝ p1(y1) N(y1; x/alpha, (sigma/alpha)² I) is integrated on a
    per-query product grid over a window: the box of p1 intersected with x/alpha ± WINDOW_SDS sigma/alpha. The
    per-dimension factors (tanh, log sech², the Gaussian) are evaluated on the axes; only the critic sees the product.
    """
    m, s = x / alpha, sigma / alpha
    lo = torch.maximum(m - WINDOW_SDS * s, box[0])
    hi = torch.minimum(m + WINDOW_SDS * s, box[1])
    assert bool((hi > lo).all()), "a likelihood window misses the box of p1"
    D, n = target.dim, target.grid
    u = torch.linspace(0.0, 1.0, n, dtype=F64)
    means, variances = [], []
    for q0 in range(0, x.shape[0], chunk):
        sl = slice(q0, q0 + chunk)
        ax = lo[sl, :, None] + (hi - lo)[sl, :, None] * u  # (q, D, n) grid axes
        q = ax.shape[0]
        sep = log_sech2(ax) - (ax - m[sl, :, None]).square() / (2.0 * s * s)  # (q, D, n)
        act = torch.tanh(ax)
        if D == 1:
            acts = act.reshape(-1, 1)
            logw = sep[:, 0]
        elif D == 2:
            acts = torch.stack([act[:, 0, :, None].expand(q, n, n), act[:, 1, None, :].expand(q, n, n)], -1)
            acts = acts.reshape(-1, 2)
            logw = (sep[:, 0, :, None] + sep[:, 1, None, :]).reshape(q, n * n)
        else:
            raise ValueError("targets of dimension 1 or 2 only")
        qv = target.q_fn(acts.new_zeros(acts.shape[0], 1), acts).reshape(q, -1)
        w = torch.softmax(logw + qv / target.temperature, dim=1)  # uniform spacing per query: the cell volume cancels
        if D == 1:
            marg = w[:, None]  # (q, 1, n)
        else:
            w = w.reshape(q, n, n)
            marg = torch.stack([w.sum(2), w.sum(1)], 1)  # per-dimension marginals (q, 2, n)
        mean = (marg * ax).sum(-1)
        means.append(mean)
        variances.append((marg * (ax - mean[..., None]).square()).sum(-1).mean(-1))
    return torch.cat(means), torch.cat(variances)


def sample_p1(target, n, box, gen, grid=801):
    """n draws of y1 ~ p1: a categorical over the cells of a grid on the support box, jittered within the cell."""
    pts = product_grid(box[0][None], box[1][None], grid)[0]
    idx = torch.multinomial(torch.softmax(log_p1(target, pts), 0), n, replacement=True, generator=gen)
    cell = (box[1] - box[0]) / (grid - 1)
    return pts[idx] + (torch.rand(n, target.dim, generator=gen, dtype=F64) - 0.5) * cell


# ----------------------------------------------------------------------------------------------------------------
# Path times and the estimator calls


def flow_times(num, t_min):
    """num flow times, logit-spaced from t_min to 1 - t_min."""
    lg = math.log(t_min / (1 - t_min))
    return torch.sigmoid(torch.linspace(lg, -lg, num, dtype=F64))


def path_points(args):
    """[(path, index, alpha, sigma)]: flow (alpha, sigma) = (t, 1 - t); diffusion every step of the cosine schedule."""
    pts = [("flow", i, float(t), float(1 - t)) for i, t in enumerate(flow_times(args.num_times, args.t_min))]
    sched = rfm_diffusion.cosine_schedule(args.diffusion_steps)
    pts += [("diffusion", i, float(sched["alpha"][i]), float(sched["sigma"][i])) for i in range(args.diffusion_steps)]
    return pts


def call_seed(seed, *idx):
    """A deterministic per-call seed (no Python hash())."""
    out = seed
    for i in idx:
        out = (out * 1_000_003 + i + 1) % (2**62)
    return out


def estimator_error(target, path, x, alpha, sigma, exact, K, estimator, repeats, seed, cv_ridge, cv_clip):
    """One batched call of the script's estimator on `repeats` copies of each conditioning point.

    x, exact (P, D): points and the exact posterior mean of the returned quantity (y1 for flow, eps for diffusion).
    Returns per-point MSE (P,) (mean over dimensions and repeats), mean ESS, and the per-row lambda (P*repeats, D).
    """
    P, D = x.shape
    rows = x.repeat_interleave(repeats, 0)
    obs = rows.new_zeros(rows.shape[0], 1)
    torch.manual_seed(seed)
    if path == "flow":
        t = rows.new_full((rows.shape[0], 1), alpha)
        out, info = rfm_flow.posterior_mean(
            target.q_fn, obs, rows, t, K, target.temperature, estimator, cv_ridge, cv_clip
        )
    else:
        a, s = rows.new_full((rows.shape[0], 1), alpha), rows.new_full((rows.shape[0], 1), sigma)
        out, info = rfm_diffusion.posterior_noise(
            target.q_fn, obs, rows, a, s, K, target.temperature, estimator, cv_ridge, cv_clip
        )
    err = (out - exact.repeat_interleave(repeats, 0)).square().mean(-1).reshape(P, repeats).mean(1)
    return err, float(info["ess"].mean()), info["cv_weight"]


def run(args):
    torch.set_num_threads(args.threads)
    defaults = rfm_flow.Args()
    cv_ridge, cv_clip = defaults.cv_ridge, defaults.cv_clip
    points = path_points(args)
    rows = []
    for ti, name in enumerate(args.targets):
        target = TARGETS[name]
        target = dataclasses.replace(target, grid=args.grid_1d if target.dim == 1 else args.grid_2d)
        box = support_box(target)
        gen = torch.Generator().manual_seed(call_seed(args.seed, ti))
        y1 = sample_p1(target, args.num_points, box, gen)
        eps = torch.randn(y1.shape, generator=gen, dtype=F64)
        for pi, (path, idx, alpha, sigma) in enumerate(points):
            x = alpha * y1 + sigma * eps
            mean_y1, var_y1 = exact_posterior(target, x, alpha, sigma, box)
            if path == "flow":
                exact, post_var, to_y1 = mean_y1, var_y1, 1.0
            else:  # E[eps | x] = (x - alpha E[y1 | x]) / sigma, Var[eps | x] = (alpha / sigma)² Var[y1 | x]
                exact, post_var = (x - alpha * mean_y1) / sigma, (alpha / sigma) ** 2 * var_y1
                to_y1 = (sigma / alpha) ** 2
            for ki, K in enumerate(args.ks):
                repeats = max(4, args.proposal_budget // (K * args.num_points))
                seed = call_seed(args.seed, ti, pi, ki)
                for est in ESTIMATORS:
                    err, ess, lam = estimator_error(
                        target, path, x, alpha, sigma, exact, K, est, repeats, seed, cv_ridge, cv_clip
                    )
                    mu = lam * (alpha / sigma) ** 2  # position on the line noise (0) -> gradient (1)
                    rows.append({
                        "target": name, "path": path, "index": idx, "t": alpha / (alpha + sigma),
                        "alpha": alpha, "sigma": sigma, "K": K, "estimator": est,
                        "quantity": "y1" if path == "flow" else "eps",
                        "mse": float(err.mean()), "mse_median": float(err.median()),
                        "mse_y1": float(err.mean()) * to_y1, "post_var": float(post_var.mean()),
                        "ess": ess, "ess_over_k": ess / K,
                        "lambda_mean": float(lam.mean()), "mu_median": float(mu.median()),
                        "clip_frac": float((lam.abs() >= cv_clip).double().mean()),
                        "points": args.num_points, "repeats": repeats,
                    })  # fmt: skip
        print(f"{name}: done", flush=True)
    return rows


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


STYLE_K = {0: ":", 1: "--", 2: "-"}  # by rank of K: smallest dotted, largest solid
COLOR_EST = {"noise": "tab:blue", "gradient": "tab:red", "stein": "tab:green"}
COLOR_TARGET = ["tab:purple", "tab:orange", "tab:brown", "tab:gray"]
MU_FLOOR = 1e-6


def plot(rows, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(set(args.ks))
    style = {k: STYLE_K.get(i + 3 - len(ks), "-") for i, k in enumerate(ks)}
    paths = ["flow", "diffusion"]
    n_t = len(args.targets)
    fig, axes = plt.subplots(n_t + 2, 2, figsize=(11, 3.3 * (n_t + 2)), sharex=True, squeeze=False)

    def series(target, p, K, est, key):
        sel = [r for r in rows if (r["target"], r["path"], r["K"], r["estimator"]) == (target, p, K, est)]
        sel.sort(key=lambda r: r["t"])
        return [r["t"] for r in sel], [r[key] for r in sel]

    for j, p in enumerate(paths):
        unit = "ŷ1 − E[y1|y_t]" if p == "flow" else "ε̂ − E[ε|x_i]"
        for i, name in enumerate(args.targets):
            ax = axes[i, j]
            for est in ESTIMATORS:
                for K in ks:
                    t, v = series(name, p, K, est, "mse")
                    ax.plot(t, v, style[K], color=COLOR_EST[est], label=f"{est}, K={K}")
            ax.set_yscale("log")
            ax.set_title(f"{name}, {p}: MSE of {unit}", fontsize=10)
            ax.grid(alpha=0.3, lw=0.5)
        ax = axes[n_t, j]
        for i, name in enumerate(args.targets):
            for K in ks:
                t, v = series(name, p, K, "stein", "ess_over_k")
                ax.plot(t, v, style[K], color=COLOR_TARGET[i % 4], label=f"{name}, K={K}")
        ax.set_yscale("log")
        ax.set_title(f"{p}: mean ESS / K (same weights for every estimator)", fontsize=10)
        ax.grid(alpha=0.3, lw=0.5)
        ax = axes[n_t + 1, j]
        for i, name in enumerate(args.targets):
            for K in ks:
                t, v = series(name, p, K, "stein", "mu_median")
                ax.plot(t, [max(x, MU_FLOOR) for x in v], style[K], color=COLOR_TARGET[i % 4], label=f"{name}, K={K}")
        t, _ = series(args.targets[0], p, ks[0], "stein", "mu_median")
        tt = torch.tensor(t, dtype=F64)
        bound = (rfm_flow.Args().cv_clip * (tt / (1 - tt)) ** 2).tolist()
        ax.plot(t, bound, color="k", lw=0.8, label="clip bound c·α²/σ²")
        ax.axhline(1.0, color="tab:red", lw=0.8, alpha=0.6, label="μ = 1: gradient (μ = 0: noise)")
        ax.set_yscale("log")
        ax.set_ylim(MU_FLOOR / 3, 3e2)
        ax.set_title(f"{p}: where stein sits, μ = λα²/σ² (median; ≤{MU_FLOOR:g} drawn at it)", fontsize=10)
        ax.grid(alpha=0.3, lw=0.5)
        last = args.diffusion_steps - 1
        xl = "flow time t" if p == "flow" else f"equivalent flow time α/(α+σ) (step {last} at left, step 0 at right)"
        ax.set_xlabel(xl)
    from matplotlib.ticker import FixedFormatter, FixedLocator, LogLocator, NullLocator

    xticks = [0.003, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99]
    for ax in axes.flat:  # few ticks: the minor ticks of 20-decade log axes dominate the drawing time
        ax.set_xscale("logit")
        ax.set_xlim(0.002, 0.995)
        ax.xaxis.set_major_locator(FixedLocator(xticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{x:g}" for x in xticks]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(base=10.0, numticks=8))
        ax.yaxis.set_minor_locator(NullLocator())
    axes[0, 0].legend(fontsize=7, ncol=3, loc="best")
    axes[n_t, 0].legend(fontsize=7, ncol=2, loc="best")
    axes[n_t + 1, 0].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle("RFM posterior estimators against exact posterior means (repo estimator functions, float64)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_args(args):
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or not args.targets:
        raise SystemExit(f"error: --targets must be among {sorted(TARGETS)}, got {list(args.targets)}")
    if not args.ks or min(args.ks) < 1:
        raise SystemExit("error: --ks must be positive")
    if not 0.0 < args.t_min < 0.5 or args.num_times < 2 or args.num_points < 1 or args.diffusion_steps < 2:
        raise SystemExit("error: need 0 < --t-min < 0.5, --num-times >= 2, --num-points >= 1, --diffusion-steps >= 2")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    start = time.perf_counter()
    rows = run(args)
    write_csv(rows, args.csv)
    plot(rows, args, args.png)
    print(f"wrote {args.csv} and {args.png} ({len(rows)} rows, {time.perf_counter() - start:.0f} s)")
