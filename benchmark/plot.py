"""Learning curves, result tables and CSV files from the runs' TensorBoard events and config.json files.

    python benchmark/plot.py                                   # runs/ -> results/*.png, results.md, *.csv
    python benchmark/plot.py --runs-dir runs --out-dir results --tag eval/episodic_return --bootstrap 2000

Runs are grouped by env and configuration: the algorithm label is the name field of the run folder
`{env}__{label}__{seed}__{time}`, and runs under one label whose config.json differ (seed and the fields allowed to
change on --resume aside) are shown apart, never merged. Per env: a figure (each seed thin, the mean over seeds, a
95% bootstrap band) and a table; one figure of all envs; for DeepMind Control envs, the interquartile mean of
return/1000 over all tasks at a step every task reached, with a stratified-bootstrap 95% CI, and its curve over steps.
"""

import csv
import hashlib
import importlib.util
import json
import os
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from scipy import stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    runs_dir: str = "runs"  # folder of run dirs (each with a TensorBoard event file and config.json)
    out_dir: str = "results"  # where the figures, results.md and the CSV files go
    tag: str = "eval/episodic_return"  # the scalar to plot
    bootstrap: int = 2000  # bootstrap resamples for the confidence bands and intervals
    seed: int = 0  # seed of the bootstrap


@dataclass
class Group:
    env: str  # the env id (from config.json; from the folder name without one)
    label: str  # the algorithm as the figures and tables name it
    config: dict | None  # the shared configuration, seed aside; None: runs without config.json
    script: str | None
    curves: dict  # seed -> (steps, values)
    commits: set  # "abc1234" or "abc1234 (dirty)"
    dirs: dict  # seed -> run folder name


def identity(config):
    """What makes two runs of one label the same configuration: every field but the seed and those allowed to change
    on --resume (the number of evaluation episodes stays: it changes what is measured)."""
    loose = (set(config.get("resumable", [])) - {"eval_episodes"}) | {"seed"}
    return json.dumps({"script": config.get("script"), **{k: v for k, v in config["args"].items() if k not in loose}},
                      sort_keys=True)  # fmt: skip


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return None
    points = sorted({e.step: e.value for e in acc.Scalars(tag)}.items())  # one value per step (the last written)
    return np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)


def load_runs(runs_dir, tag):
    """The runs under runs_dir as Groups, one per (env, label, configuration). Of several runs of one seed and
    configuration, the one that got furthest is kept, with a note."""
    found = {}  # (env, label, identity) -> Group
    unconfigured = []
    for d in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and any(p.glob("events.out.tfevents*"))):
        fields = d.name.split("__")
        if len(fields) < 3 or not fields[2].isdigit():
            continue
        try:
            config = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            config = None
            unconfigured.append(d.name)
        if config and config["args"].get("eval_only"):
            continue  # evaluations of saved models are not learning curves
        curve = read_scalars(d, tag)
        if curve is None:
            print(f"note: {d.name} has no {tag}; left out")
            continue
        env = config["args"]["env_id"] if config else fields[0]
        seed = int(config["args"]["seed"]) if config else int(fields[2])
        key = (env, fields[1], identity(config) if config else None)
        if key not in found:
            args = {k: v for k, v in config["args"].items() if k != "seed"} if config else None
            script = config and config.get("launcher", config.get("script"))  # official runs: the launcher's flags
            found[key] = Group(env, fields[1], args, script, {}, set(), {})
        group = found[key]
        if seed in group.curves:
            print(f"note: two runs of {env} {fields[1]} seed {seed} with the same configuration; keeping the longer")
            if group.curves[seed][0][-1] > curve[0][-1]:
                continue
        group.curves[seed], group.dirs[seed] = curve, d.name
        if config:
            commit = (config.get("commit") or "unknown")[:7]
            group.commits.add(commit + (" (dirty)" if config.get("dirty") else "")
                              + (" (config.json backfilled)" if config.get("backfilled") else ""))
    if unconfigured:
        print(f"note: {len(unconfigured)} runs have no config.json; grouped by their folder names only")
    groups = list(found.values())
    by_label = defaultdict(list)
    for g in groups:
        by_label[g.env, g.label].append(g)
    for (env, label), same in by_label.items():
        if len(same) > 1:  # one label, several configurations: shown apart, each named by what tells it apart
            print(f"note: {env} {label}: {len(same)} different configurations under one name; shown apart")
            for g in same:
                g.label = f"{label} [{short_hash(g)}]"
    return sorted(groups, key=lambda g: (g.env, g.label))


def short_hash(group):
    return hashlib.sha1(json.dumps([group.script, group.config], sort_keys=True).encode()).hexdigest()[:6]


def script_defaults(script, cache={}):  # noqa: B006 (a cache across calls)
    """The Args defaults of a script in this repository (imported by path; the scripts run nothing at import)."""
    if script not in cache:
        cache[script] = None
        path = ROOT / script if script else None
        if path and path.is_file():
            try:
                spec = importlib.util.spec_from_file_location(f"_plot_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)  # (tyro is not needed for the defaults)
                cache[script] = json.loads(json.dumps(vars(module.Args()), default=str))
            except Exception as e:  # noqa: BLE001 (a changed or broken script: flags not listed)
                print(f"note: cannot read the defaults of {script}: {type(e).__name__}")
    return cache[script]


def changed_flags(group):
    """The flags of a group that differ from its script's defaults, as a command line would give them."""
    defaults = script_defaults(group.script)
    if group.config is None or defaults is None:
        return "?"
    skip = {"env_id", "resume", "exp_name", "checkout", "python", "runs_dir", "log_dir", "convert_only"}  # locations
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in group.config.items() if k not in skip and defaults.get(k) != v]
    return " ".join(flags) or "(defaults)"


def align(curves, name=""):
    """{seed: (steps, values)} -> (steps, values [seeds, steps]) on the steps every seed has."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves.values())))
    if not common:
        return None, None
    if any(len(s) != len(common) for s, _ in curves.values()):
        lengths = sorted(len(s) for s, _ in curves.values())
        print(f"note: {name}: seeds have {lengths} eval points; using the {len(common)} steps all seeds have")
    values = np.stack([v[np.isin(s, common)] for s, v in (curves[k] for k in sorted(curves))])
    return np.array(common), values


def bootstrap_band(values, reps, rng):
    """values [seeds, steps] -> (lo, hi) per step: the 95% percentile interval of the mean over seeds, with seeds
    resampled with replacement (the same seed draw for every step). With 3 seeds or fewer, one seed drawn n times has
    probability (1/n)^n >= 2.5%, so the band is exactly the seeds' min-max."""
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


def check_args(args):
    runs = Path(args.runs_dir)
    if not runs.exists():
        raise SystemExit(f"error: --runs-dir {args.runs_dir} does not exist")
    if not runs.is_dir():
        raise SystemExit(f"error: --runs-dir {args.runs_dir} is not a folder")
    if args.bootstrap < 1:
        raise SystemExit("error: --bootstrap must be >= 1")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        probe = Path(args.out_dir) / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out-dir {args.out_dir}: {e.strerror or e}")


def draw(ax, group, steps, values, color, reps, rng):
    """Each seed thin, the mean over seeds, the 95% bootstrap band of the mean."""
    for row in values:
        ax.plot(steps, row, color=color, lw=0.6, alpha=0.35)
    lo, hi = bootstrap_band(values, reps, rng)
    ax.plot(steps, values.mean(axis=0), color=color, lw=1.8, label=f"{group.label} (n={len(values)})")
    ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)


def main(args):
    check_args(args)
    groups = load_runs(args.runs_dir, args.tag)
    aligned = []
    for g in groups:
        steps, values = align(g.curves, f"{g.env} {g.label}")
        if steps is None:
            print(f"note: {g.env} {g.label}: seeds {sorted(g.curves)} share no evaluation step; left out")
            continue
        aligned.append((g, steps, values))
    if not aligned:
        raise SystemExit(f"error: no runs with {args.tag} under {args.runs_dir}")
    out = Path(args.out_dir)
    labels = sorted({g.label for g, _, _ in aligned})
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    colors = {label: palette[i % len(palette)] for i, label in enumerate(labels)}  # one colour per algorithm
    envs = sorted({g.env for g, _, _ in aligned})
    episodes = {env: {(g.config or {}).get("eval_episodes") for g, _, _ in aligned if g.env == env} for env in envs}
    ylabel = {env: ("eval return (mean of {} episodes)".format(*eps) if len(eps) == 1 and None not in eps
                    else "eval return (episodes per group: see results.md)") for env, eps in episodes.items()}  # fmt: skip
    band_note = ("thick: mean over seeds; thin: each seed; band: 95% percentile-bootstrap interval of the mean over "
                 "seeds (with n <= 3 seeds exactly their min-max)")  # fmt: skip

    md = [f"# Results\n\n`{args.tag}` from the runs in `{args.runs_dir}`. Figures: {band_note}.\n"]
    finals = defaultdict(dict)  # env -> label -> (steps, values), for the DMC aggregate
    ncols = min(4, len(envs))
    nrows = -(-len(envs) // ncols)
    height = 3.2 * nrows + 1.2  # inches; the bottom 1.0 for the shared legend and the note
    panel_fig, panels = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, height), squeeze=False)
    with open(out / "runs.csv", "w", newline="") as f_runs, open(out / "final_scores.csv", "w", newline="") as f_final:
        runs_csv, final_csv = csv.writer(f_runs), csv.writer(f_final)
        runs_csv.writerow(["env_id", "algorithm", "seed", "step", "value", "run_dir"])
        final_csv.writerow(["env_id", "algorithm", "seed", "step", "value"])
        for e, env in enumerate(envs):
            fig, ax = plt.subplots(figsize=(6, 4))
            panel = panels.flat[e]
            rows = ["| algorithm | step | final return | best return | seeds |", "|-|-|-|-|-|"]
            prov = ["| algorithm | seeds | last step | commit | flags that differ from the script's defaults |",
                    "|-|-|-|-|-|"]  # fmt: skip
            for g, steps, values in (x for x in aligned if x[0].env == env):
                for a in (ax, panel):
                    draw(a, g, steps, values, colors[g.label], args.bootstrap, np.random.default_rng(args.seed))
                seeds = sorted(g.curves)
                best = [g.curves[s][1].max() for s in seeds]
                rows.append(f"| {g.label} | {steps[-1]} | {mean_std(values[:, -1])} | {mean_std(best)} | {len(seeds)} |")
                last = max(g.curves[s][0][-1] for s in seeds)
                commits = ", ".join(sorted(g.commits)) or "unknown (no config.json)"
                prov.append(f"| {g.label} | {' '.join(map(str, seeds))} | {last} | {commits} | `{changed_flags(g)}` |")
                finals[env][g.label] = (steps, values, seeds)
                for s in seeds:
                    for step, value in zip(*g.curves[s]):
                        runs_csv.writerow([env, g.label, s, int(step), float(value), g.dirs[s]])
                for s, value in zip(seeds, values[:, -1]):
                    final_csv.writerow([env, g.label, s, int(steps[-1]), float(value)])
            for a in (ax, panel):
                a.set(title=env, xlabel="environment steps", ylabel=ylabel[env])
            ax.legend(fontsize=8)
            fig.text(0.01, 0.005, band_note, fontsize=5.5, color="0.35")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            fig.savefig(out / f"{env.replace('/', '_').replace(':', '_')}.png", dpi=120)
            plt.close(fig)
            note = ("Step: the last step all seeds reached. Final return: the value there, mean ± std over seeds (std "
                    "with ddof=1; 0 for one seed). Best return: each seed's highest value over its run, mean ± std.\n")
            md += [f"## {env}\n", *rows, "", note, *prov, ""]
    for a in panels.flat[len(envs):]:
        a.axis("off")
    handles = {label: plt.Line2D([], [], color=colors[label], lw=1.8) for label in labels}
    panel_fig.legend(handles.values(), handles.keys(), loc="lower center", bbox_to_anchor=(0.5, 0.3 / height),
                     ncol=min(4, len(labels)), fontsize=8)  # fmt: skip
    panel_fig.text(0.01, 0.05 / height, textwrap.fill(band_note, 100 * ncols), fontsize=6, color="0.35")
    panel_fig.tight_layout(rect=(0, 1.0 / height, 1, 1))
    panel_fig.savefig(out / "all_envs.png", dpi=120)
    plt.close(panel_fig)
    md += dmc_aggregate(finals, colors, args, out)

    text = "\n".join(md)
    (out / "results.md").write_text(text)
    print(text)
    return text


def dmc_aggregate(finals, colors, args, out):
    """IQM of return/1000 over the DeepMind Control tasks, per algorithm, at the last step every task's seeds reached;
    an algorithm missing a task or without a common step is listed, not aggregated."""
    dmc = sorted(env for env in finals if env.startswith(("dm_control/", "dm_control_")))
    if not dmc:
        return []
    rows = ["| algorithm | step | IQM score | 95% CI | tasks | runs per task |", "|-|-|-|-|-|-|"]
    notes, points, curves = [], [], {}
    for label in sorted({label for env in dmc for label in finals[env]}):
        missing = [env for env in dmc if label not in finals[env]]
        if missing:
            notes.append(f"- {label}: not aggregated, no runs on {', '.join(missing)}")
            continue
        common = sorted(set.intersection(*(set(finals[env][label][0].tolist()) for env in dmc)))
        seeds = sorted(set.intersection(*(set(finals[env][label][2]) for env in dmc)))
        if not common or not seeds:
            notes.append(f"- {label}: not aggregated, its tasks share no evaluation step or seed")
            continue
        if any(finals[env][label][0][-1] != common[-1] for env in dmc):
            ends = ", ".join(f"{env.split('/')[-1]} {finals[env][label][0][-1]}" for env in dmc)
            notes.append(f"- {label}: tasks end at different steps ({ends}); aggregated at step {common[-1]}")

        def scores_at(step):
            return np.array([[finals[env][label][1][finals[env][label][2].index(s),
                                                   list(finals[env][label][0]).index(step)] / 1000 for env in dmc]
                             for s in seeds])  # fmt: skip

        iqm, lo, hi = iqm_stratified_bootstrap(scores_at(common[-1]), args.bootstrap, np.random.default_rng(args.seed))
        points.append((label, iqm, lo, hi))
        rows.append(f"| {label} | {common[-1]} | {iqm:.3f} | [{lo:.3f}, {hi:.3f}] | {len(dmc)} | {len(seeds)} |")
        curves[label] = (common, [iqm_stratified_bootstrap(scores_at(s), args.bootstrap,
                                                           np.random.default_rng(args.seed)) for s in common])  # fmt: skip
    md = ["## DeepMind Control aggregate\n"]
    if points:
        md += [*rows, ""]
    md += [*notes, "" if notes else None]
    md.append(f"Score: return / 1000 on {', '.join(dmc)}, at the step in the table (the last one every task and "
              "seed of the algorithm reached). IQM: mean of the middle 50% of all runs x tasks pooled. CI: "
              f"percentile interval over {args.bootstrap} stratified bootstrap resamples (runs resampled within each "
              "task). Curve: the same at every common evaluation step.\n")
    md = [x for x in md if x is not None]
    if points:
        fig, ax = plt.subplots(figsize=(5, 0.8 + 0.4 * len(points)))
        for i, (label, iqm, lo, hi) in enumerate(points):
            ax.errorbar(iqm, i, xerr=[[iqm - lo], [hi - iqm]], fmt="o", capsize=4, color=colors[label])
        ax.set(yticks=range(len(points)), yticklabels=[p[0] for p in points], xlabel="IQM of return / 1000 (95% CI)",
               title=f"DeepMind Control, {len(dmc)} task{'s' * (len(dmc) > 1)}")  # fmt: skip
        fig.tight_layout()
        fig.savefig(out / "dmc_iqm.png", dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, (steps, est) in curves.items():
            est = np.array(est)
            ax.plot(steps, est[:, 0], color=colors[label], lw=1.8, label=label)
            ax.fill_between(steps, est[:, 1], est[:, 2], color=colors[label], alpha=0.15, lw=0)
        ax.set(xlabel="environment steps", ylabel="IQM of return / 1000 (95% CI)",
               title=f"DeepMind Control, {len(dmc)} task{'s' * (len(dmc) > 1)}: IQM over steps")  # fmt: skip
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "dmc_iqm_curve.png", dpi=120)
        plt.close(fig)
    return md


if __name__ == "__main__":
    main(tyro.cli(Args))
