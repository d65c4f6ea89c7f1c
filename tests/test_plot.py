"""benchmark/plot.py on event files with known numbers: the tables' means and stds, the steps and provenance, runs of
different configurations kept apart, the bootstrap bands, the figures and CSV files, the IQM with its stratified
bootstrap at a common step, and bad input in one line."""

import csv
import json
import os
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

from benchmark import plot
from tests.conftest import ROOT

STEPS = [1000, 2000, 3000]
# (env id, algorithm) -> one eval curve per seed 1, 2, 3
CURVES = {
    ("dm_control/cheetah-run-v0", "algo_a"): [[50, 150, 100], [100, 250, 200], [150, 350, 300]],
    ("dm_control/cheetah-run-v0", "algo_b"): [[10, 20, 40], [10, 20, 40], [10, 20, 40]],
    ("dm_control/walker-walk-v0", "algo_a"): [[0, 300, 400], [0, 300, 500], [0, 300, 600]],
    ("dm_control/walker-walk-v0", "algo_b"): [[0, 10, 20], [0, 10, 30], [0, 10, 40]],
    ("Hopper-v5", "algo_a"): [[1, 2, 3], [1, 2, 5], [1, 2]],  # seed 3 stopped early: curves end at step 2000
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_run(runs, env, algo, seed, curve, steps=STEPS, config=True, **changes):
    """A run folder as rfm_flow.py leaves it: event file and config.json (its defaults, exp_name algo, changes)."""
    run_dir = runs / f"{env.replace('/', '_')}__{algo}__{seed}__{1700000000 + len(list(runs.glob('*')))}"
    writer = SummaryWriter(str(run_dir))
    for step, value in zip(steps, curve):
        writer.add_scalar("eval/episodic_return", value, step)
    writer.close()
    if config:
        args = {**plot.script_defaults("rfm_flow.py"), "exp_name": algo, "env_id": env, "seed": seed, **changes}
        resumable = ["checkpoint_every", "eval_every", "resume", "total_timesteps"]
        body = dict(script="rfm_flow.py", args=args, resumable=resumable, commit=COMMIT, dirty=False)
        (run_dir / "config.json").write_text(json.dumps(body))
    return run_dir


def write_runs(runs):
    for (env, algo), curves in CURVES.items():
        for seed, curve in enumerate(curves, start=1):
            write_run(runs, env, algo, seed, curve, batch_size=64 if algo == "algo_a" else 256)
    (runs / "logs").mkdir()  # not a run: left alone


def table_row(text, env, algo):
    section = text.split(f"## {env}\n")[1].split("##")[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {algo} |"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plot")
    write_runs(tmp / "runs")
    text = plot.main(plot.Args(runs_dir=str(tmp / "runs"), out_dir=str(tmp / "results"), bootstrap=500))
    return tmp, text


def test_tables_hold_hand_computed_means_and_stds_with_the_step(results):
    tmp, text = results
    assert (tmp / "results" / "results.md").read_text() == text
    # final returns [100, 200, 300]: mean 200, std (ddof=1) 100; best per seed [150, 250, 350]: 250 ± 100
    cheetah, walker = "dm_control/cheetah-run-v0", "dm_control/walker-walk-v0"
    assert table_row(text, cheetah, "algo_a") == "| algo_a | 3000 | 200.00 ± 100.00 | 250.00 ± 100.00 | 3 |"
    assert table_row(text, cheetah, "algo_b") == "| algo_b | 3000 | 40.00 ± 0.00 | 40.00 ± 0.00 | 3 |"
    assert table_row(text, walker, "algo_a") == "| algo_a | 3000 | 500.00 ± 100.00 | 500.00 ± 100.00 | 3 |"
    # Hopper: truncated to the steps all seeds have (final = values at 2000: [2, 2, 2]); best over each full run [3, 5, 2]
    assert table_row(text, "Hopper-v5", "algo_a") == "| algo_a | 2000 | 2.00 ± 0.00 | 3.33 ± 1.53 | 3 |"


def test_provenance_per_group(results):
    _, text = results
    section = text.split("## Hopper-v5\n")[1]
    row = [line for line in section.splitlines() if line.startswith("| algo_a |")][1]
    assert row == "| algo_a | 1 2 3 | 3000 | 0123456 | `--batch-size 64` |"  # seeds, last step, commit, flags
    section = text.split("## dm_control/cheetah-run-v0\n")[1].split("##")[0]
    assert "| algo_b | 1 2 3 | 3000 | 0123456 | `(defaults)` |" in section


def test_figures_and_csv_files(results):
    tmp, _ = results
    names = {p.name for p in (tmp / "results").glob("*.png")}
    assert names == {"dm_control_cheetah-run-v0.png", "dm_control_walker-walk-v0.png", "Hopper-v5.png", "dmc_iqm.png",
                     "dmc_iqm_curve.png", "all_envs.png"}  # fmt: skip
    with open(tmp / "results" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(c) for curves in CURVES.values() for c in curves)
    hopper3 = [r for r in rows if r["env_id"] == "Hopper-v5" and r["seed"] == "3"]
    assert [(r["step"], float(r["value"])) for r in hopper3] == [("1000", 1.0), ("2000", 2.0)]
    with open(tmp / "results" / "final_scores.csv") as f:
        final = [r for r in csv.DictReader(f) if r["env_id"] == "dm_control/walker-walk-v0" and r["algorithm"] == "algo_a"]
    assert [(r["seed"], r["step"], float(r["value"])) for r in final] == [("1", "3000", 400), ("2", "3000", 500),
                                                                         ("3", "3000", 600)]  # fmt: skip


def test_dmc_aggregate_iqm(results):
    _, text = results
    section = text.split("## DeepMind Control aggregate")[1]
    # algo_a scores: cheetah [.1, .2, .3], walker [.4, .5, .6]; pooled, trim one of six at each end -> mean(.2..0.5)
    row = next(line for line in section.splitlines() if line.startswith("| algo_a |"))
    assert row.startswith("| algo_a | 3000 | ")
    iqm, lo, hi = map(float, re.findall(r"\d+\.\d+", row)[:3])
    assert iqm == pytest.approx(0.35, abs=1e-3) and lo <= iqm <= hi
    assert "Hopper" not in section.split("Score:")[0]


def test_truncation_note(tmp_path, capsys):
    write_runs(tmp_path / "runs")
    plot.main(plot.Args(runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "out"), bootstrap=10))
    assert "note: Hopper-v5 algo_a: seeds have [2, 3, 3] eval points; using the 2 steps" in capsys.readouterr().out


def test_two_configurations_under_one_name_are_shown_apart(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, "Hopper-v5", "algo_a", seed, [1, 2, 3])
        write_run(runs, "Hopper-v5", "algo_a", seed, [100, 200, 300], batch_size=64)
    write_run(runs, "Hopper-v5", "algo_a", 3, [1, 2, 3], total_timesteps=99)  # a resumable field: the same group
    text = plot.main(plot.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out"), bootstrap=10))
    assert "2 different configurations under one name; shown apart" in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| algo_a [")]
    finals = sorted(line.split(" | ")[2] for line in rows[:2])
    assert finals == ["3.00 ± 0.00", "300.00 ± 0.00"] and any(line.endswith("| 3 |") for line in rows[:2])
    assert any("`--batch-size 64`" in line for line in rows)


def test_mixed_budgets_are_aggregated_at_a_common_step_and_missing_tasks_listed(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):  # algo_a: 3 evals on walker, 5 on cartpole; algo_c: cartpole only
        write_run(runs, "dm_control/walker-walk-v0", "algo_a", seed, [100, 200, 300 + seed])
        write_run(runs, "dm_control/cartpole-swingup-v0", "algo_a", seed, [1, 2, 3, 4, 900], steps=[1000, 2000, 3000, 4000, 5000])
        write_run(runs, "dm_control/cartpole-swingup-v0", "algo_c", seed, [1, 2, 3])
    text = plot.main(plot.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out"), bootstrap=10))
    section = text.split("## DeepMind Control aggregate")[1]
    row = next(line for line in section.splitlines() if line.startswith("| algo_a |"))
    # at step 3000: walker .301 .302 .303, cartpole .003 x 3 (not its .9 at 5000); IQM = (.003 + .003 + .301 + .302) / 4
    assert row.startswith("| algo_a | 3000 | 0.152 |")
    assert "tasks end at different steps (cartpole-swingup-v0 5000, walker-walk-v0 3000); aggregated at step 3000" in section
    assert "- algo_c: not aggregated, no runs on dm_control/walker-walk-v0" in section
    assert "| algo_c |" not in section


def test_one_colour_per_algorithm_in_every_figure_and_seeds_drawn(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for env in ("Hopper-v5", "Ant-v5"):
        for algo in (["algo_a", "algo_c"] if env == "Hopper-v5" else ["algo_c"]):
            for seed in (1, 2, 3):
                write_run(runs, env, algo, seed, [seed, 2 * seed, 3 * seed])
    seen, draw = [], plot.draw
    monkeypatch.setattr(plot, "draw", lambda ax, g, *a: seen.append((g.label, a[2], len(ax.lines))) or draw(ax, g, *a))
    plot.main(plot.Args(runs_dir=str(runs), out_dir=str(tmp_path / "out"), bootstrap=10))
    assert len({color for label, color, _ in seen if label == "algo_c"}) == 1
    assert len({color for _, color, _ in seen}) == 2
    fig, ax = plt.subplots()
    group = plot.Group("Hopper-v5", "x", None, None, {}, set(), {})
    plot.draw(ax, group, np.array([1, 2]), np.array([[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]), "C0", 10, np.random.default_rng(0))
    assert len(ax.lines) == 4 and ax.lines[-1].get_label() == "x (n=3)"  # each seed, then the mean
    plt.close(fig)


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--runs-dir", "nowhere"], "error: --runs-dir nowhere does not exist"),
    ("file", ["--runs-dir", "afile"], "error: --runs-dir afile is not a folder"),
    ("runs", ["--bootstrap", "0"], "error: --bootstrap must be >= 1"),
    ("runs", ["--out-dir", "afile/sub"], "error: cannot write to --out-dir afile/sub"),
    ("disjoint", [], "error: no runs with eval/episodic_return under runs"),
])  # fmt: skip
def test_bad_input_is_one_error_line(tmp_path, setup, args, message):
    (tmp_path / "afile").write_text("")
    if setup == "runs":
        write_run(tmp_path / "runs", "Hopper-v5", "algo_a", 1, [1, 2, 3])
    if setup == "disjoint":  # two seeds that share no evaluation step: noted, left out
        write_run(tmp_path / "runs", "Hopper-v5", "algo_a", 1, [1, 2], steps=[1000, 2000])
        write_run(tmp_path / "runs", "Hopper-v5", "algo_a", 2, [1, 2], steps=[1500, 2500])
    cmd = [sys.executable, str(ROOT / "benchmark" / "plot.py"), *(["--runs-dir", "runs"] if "--runs-dir" not in args else []),
           "--out-dir", "out", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if setup == "disjoint":
        assert "seeds [1, 2] share no evaluation step; left out" in proc.stdout


def test_bootstrap_band_matches_a_hand_done_bootstrap():
    values = np.array([[1.0, 10.0], [2.0, 20.0], [6.0, 60.0]])  # [seeds, steps]
    lo, hi = plot.bootstrap_band(values, 1000, np.random.default_rng(3))
    # by hand: 1000 draws of 3 seeds with replacement (same generator), the mean of each, its 2.5% and 97.5% points
    draws = np.random.default_rng(3).integers(0, 3, size=(1000, 3))
    means = np.array([values[d].mean(axis=0) for d in draws])
    assert np.allclose(lo, np.percentile(means, 2.5, axis=0)) and np.allclose(hi, np.percentile(means, 97.5, axis=0))
    assert np.all(lo <= values.mean(axis=0)) and np.all(values.mean(axis=0) <= hi)
    assert np.all(lo >= values.min(axis=0)) and np.all(hi <= values.max(axis=0)) and np.all(lo < hi)
    same = np.array([[5.0, 7.0]] * 3)  # identical seeds: the band collapses onto the value
    lo, hi = plot.bootstrap_band(same, 200, np.random.default_rng(0))
    assert np.array_equal(lo, [5.0, 7.0]) and np.array_equal(hi, [5.0, 7.0])


def test_iqm_point_estimate():
    assert stats.trim_mean(np.arange(1, 9), 0.25) == 4.5
    iqm, _, _ = plot.iqm_stratified_bootstrap(np.arange(1, 9).reshape(4, 2), 100, np.random.default_rng(0))
    assert iqm == 4.5  # mean of 3, 4, 5, 6
    scores = np.array([[0.1, 0.5], [0.2, 0.6], [0.3, 0.7], [0.4, 0.8]])  # pooled, sorted: drop .1 .2 and .7 .8
    iqm, _, _ = plot.iqm_stratified_bootstrap(scores, 100, np.random.default_rng(0))
    assert iqm == pytest.approx(0.45)
    scores = np.array([[0.0], [0.0], [0.0], [0.0], [1.0], [100.0]])  # int(6 / 4) = 1 cut at each end: 0, 0, 0, 1
    assert plot.iqm_stratified_bootstrap(scores, 10, np.random.default_rng(0))[0] == 0.25


def test_iqm_confidence_interval():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(5, 3))
    iqm, lo, hi = plot.iqm_stratified_bootstrap(scores, 2000, np.random.default_rng(1))
    assert lo < iqm < hi
    _, lo10, hi10 = plot.iqm_stratified_bootstrap(np.tile(scores, (10, 1)), 2000, np.random.default_rng(1))
    assert hi10 - lo10 < 0.6 * (hi - lo)  # ten times the runs: a much narrower interval
    assert plot.iqm_stratified_bootstrap(np.full((4, 3), 0.7), 500, rng) == pytest.approx((0.7, 0.7, 0.7))


def test_stratified_resample_keeps_each_task_column_within_its_task():
    scores = np.array([[10 * task + run for task in range(3)] for run in range(4)], dtype=float)
    boot = plot.stratified_resample(scores, 300, np.random.default_rng(0))
    assert boot.shape == (300, 4, 3)
    for task in range(3):
        assert set(np.unique(boot[:, :, task])) == set(scores[:, task])  # every run of the task drawn, no other
    # resampling with replacement: some resamples repeat a run
    assert any(len(set(boot[r, :, 0])) < 4 for r in range(300))
