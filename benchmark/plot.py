"""Learning curves and result tables from the runs' TensorBoard events.

    python benchmark/plot.py                                   # runs/ -> results/{env}.png, results/results.md
    python benchmark/plot.py --runs-dir runs --out-dir results --tag eval/episodic_return --bootstrap 2000

Runs are grouped by their name `{env}__{algorithm-variant}__{seed}__{time}`: one figure per env, one curve per
algorithm-variant (mean over seeds, 95% bootstrap band), a markdown table per env, and for DeepMind Control envs
(`dm_control_*`) the interquartile mean of return/1000 over all tasks with a stratified-bootstrap 95% CI.
"""

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from scipy import stats  # noqa: E402


@dataclass
class Args:
    runs_dir: str = "runs"  # folder of run dirs (each with a TensorBoard event file)
    out_dir: str = "results"  # where the figures and results.md go
    tag: str = "eval/episodic_return"  # the scalar to plot
    bootstrap: int = 2000  # bootstrap resamples for the confidence bands and intervals
    seed: int = 0  # seed of the bootstrap


def load_runs(runs_dir, tag):
    """{(env, algorithm-variant): {seed: (steps, values)}}. Of several runs of one seed, the one that got furthest
    (then the newest) is kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    groups = defaultdict(dict)
    for d in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and any(p.glob("events.out.tfevents*"))):
        fields = d.name.split("__")
        if len(fields) < 3 or not fields[2].isdigit():
            continue
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        if tag not in acc.Tags()["scalars"]:
            print(f"note: {d.name} has no {tag}; left out")
            continue
        points = sorted({e.step: e.value for e in acc.Scalars(tag)}.items())  # one value per step (the last written)
        steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)
        key, seed = (fields[0], fields[1]), int(fields[2])
        old = groups[key].get(seed)
        if old is not None:
            print(f"note: two runs of {'/'.join(key)} seed {seed}; keeping the one that got further")
            if old[0][-1] > steps[-1]:
                continue
        groups[key][seed] = (steps, values)
    return groups


def align(curves, name=""):
    """{seed: (steps, values)} -> (steps, values [seeds, steps]) on the steps every seed has."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves.values())))
    if any(len(s) != len(common) for s, _ in curves.values()):
        lengths = sorted(len(s) for s, _ in curves.values())
        print(f"note: {name}: seeds have {lengths} eval points; using the {len(common)} steps all seeds have")
    values = np.stack([v[np.isin(s, common)] for s, v in (curves[k] for k in sorted(curves))])
    return np.array(common), values


def bootstrap_band(values, reps, rng):
    """values [seeds, steps] -> (lo, hi) per step: the 95% percentile interval of the mean over seeds, with seeds
    resampled with replacement (the same seed draw for every step)."""
    idx = rng.integers(0, len(values), size=(reps, len(values)))
    return np.percentile(values[idx].mean(axis=1), [2.5, 97.5], axis=0)


def stratified_resample(scores, reps, rng):
    """[runs, tasks] -> [reps, runs, tasks]: each task's runs resampled with replacement, within that task only."""
    n_runs, n_tasks = scores.shape
    idx = rng.integers(0, n_runs, size=(reps, n_runs, n_tasks))
    return scores[idx, np.arange(n_tasks)]


def iqm_stratified_bootstrap(scores, reps, rng):
    """Interquartile mean of all runs x tasks pooled, and its 95% stratified-bootstrap percentile CI (Agarwal et al.
    2021, "Deep RL at the edge of the statistical precipice"). Written out here rather than taken from rliable,
    which would bring arch, statsmodels, seaborn and pandas into the requirements for these few lines."""
    scores = np.asarray(scores, dtype=float)
    iqm = stats.trim_mean(scores, 0.25, axis=None)
    boot = stats.trim_mean(stratified_resample(scores, reps, rng).reshape(reps, -1), 0.25, axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(iqm), float(lo), float(hi)


def mean_std(x):
    x = np.asarray(x, dtype=float)
    return f"{x.mean():.2f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.2f}"


def main(args):
    groups = load_runs(args.runs_dir, args.tag)
    if not groups:
        raise SystemExit(f"error: no runs with {args.tag} under {args.runs_dir}")
    os.makedirs(args.out_dir, exist_ok=True)
    md = [f"# Results\n\n`{args.tag}` from the runs in `{args.runs_dir}`.\n"]
    finals = defaultdict(dict)  # env -> algorithm -> {seed: final value}, for the DMC aggregate
    for env in sorted({env for env, _ in groups}):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = ["| algorithm | final return | best return | seeds | last step |", "|-|-|-|-|-|"]
        for algo in sorted(a for e, a in groups if e == env):
            curves = groups[env, algo]
            steps, values = align(curves, f"{env}/{algo}")
            mean = values.mean(axis=0)
            lo, hi = bootstrap_band(values, args.bootstrap, np.random.default_rng(args.seed))
            ax.plot(steps, mean, label=f"{algo} (n={len(values)})")
            ax.fill_between(steps, lo, hi, alpha=0.2)
            best = [curves[s][1].max() for s in sorted(curves)]
            rows.append(f"| {algo} | {mean_std(values[:, -1])} | {mean_std(best)} | {len(values)} | {steps[-1]} |")
            finals[env][algo] = dict(zip(sorted(curves), values[:, -1]))
        ax.set(title=env, xlabel="environment steps", ylabel=args.tag)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(args.out_dir) / f"{env}.png", dpi=120)
        plt.close(fig)
        note = ("Final return: the value at the last step all seeds reached, mean ± std over seeds (std with ddof=1; "
                "0 for one seed). Best return: each seed's highest value over its run, mean ± std over seeds.\n")
        md += [f"## {env}\n", *rows, "", note]

    dmc = sorted(env for env in finals if env.startswith("dm_control_"))
    algos = sorted(set.intersection(*(set(finals[env]) for env in dmc))) if dmc else []
    if algos:
        rows = ["| algorithm | IQM score | 95% CI | tasks | runs per task |", "|-|-|-|-|-|"]
        points = []
        for algo in algos:
            seeds = sorted(set.intersection(*(set(finals[env][algo]) for env in dmc)))
            if any(len(finals[env][algo]) != len(seeds) for env in dmc):
                print(f"note: DMC aggregate of {algo}: using the {len(seeds)} seeds every task has")
            scores = np.array([[finals[env][algo][s] / 1000 for env in dmc] for s in seeds])
            iqm, lo, hi = iqm_stratified_bootstrap(scores, args.bootstrap, np.random.default_rng(args.seed))
            points.append((algo, iqm, lo, hi))
            rows.append(f"| {algo} | {iqm:.3f} | [{lo:.3f}, {hi:.3f}] | {len(dmc)} | {len(seeds)} |")
        note = (f"Score: final return / 1000 on {', '.join(dmc)}. IQM: mean of the middle 50% of all runs x tasks "
                f"pooled. CI: percentile interval over {args.bootstrap} stratified bootstrap resamples (runs resampled "
                "within each task).\n")
        md += ["## DeepMind Control aggregate\n", *rows, "", note]
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(points)))
        for i, (algo, iqm, lo, hi) in enumerate(points):
            ax.errorbar(iqm, i, xerr=[[iqm - lo], [hi - iqm]], fmt="o", capsize=4)
        ax.set(yticks=range(len(points)), yticklabels=[p[0] for p in points], xlabel="IQM of return / 1000")
        fig.tight_layout()
        fig.savefig(Path(args.out_dir) / "dmc_iqm.png", dpi=120)
        plt.close(fig)

    text = "\n".join(md)
    (Path(args.out_dir) / "results.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main(tyro.cli(Args))
