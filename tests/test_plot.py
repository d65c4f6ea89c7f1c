"""benchmark/plot.py on event files with known numbers: the tables' means and stds, the bootstrap bands, the figures,
and the IQM with its stratified bootstrap."""

import re

import numpy as np
import pytest
from scipy import stats
from torch.utils.tensorboard import SummaryWriter

from benchmark import plot

STEPS = [1000, 2000, 3000]
# (env slug, algorithm) -> one eval curve per seed 1, 2, 3
CURVES = {
    ("dm_control_cheetah-run-v0", "algo_a"): [[50, 150, 100], [100, 250, 200], [150, 350, 300]],
    ("dm_control_cheetah-run-v0", "algo_b"): [[10, 20, 40], [10, 20, 40], [10, 20, 40]],
    ("dm_control_walker-walk-v0", "algo_a"): [[0, 300, 400], [0, 300, 500], [0, 300, 600]],
    ("dm_control_walker-walk-v0", "algo_b"): [[0, 10, 20], [0, 10, 30], [0, 10, 40]],
    ("Hopper-v5", "algo_a"): [[1, 2, 3], [1, 2, 5], [1, 2]],  # seed 3 stopped early: curves end at step 2000
}


def write_runs(runs):
    for (env, algo), curves in CURVES.items():
        for seed, curve in enumerate(curves, start=1):
            writer = SummaryWriter(str(runs / f"{env}__{algo}__{seed}__1700000000"))
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n|seed|{seed}|")
            for step, value in zip(STEPS, curve):
                writer.add_scalar("eval/episodic_return", value, step)
            writer.close()
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


def test_tables_hold_hand_computed_means_and_stds(results):
    tmp, text = results
    assert (tmp / "results" / "results.md").read_text() == text
    # final returns [100, 200, 300]: mean 200, std (ddof=1) 100; best per seed [150, 250, 350]: 250 ± 100
    cheetah, walker = "dm_control_cheetah-run-v0", "dm_control_walker-walk-v0"
    assert table_row(text, cheetah, "algo_a") == "| algo_a | 200.00 ± 100.00 | 250.00 ± 100.00 | 3 | 3000 |"
    assert table_row(text, cheetah, "algo_b") == "| algo_b | 40.00 ± 0.00 | 40.00 ± 0.00 | 3 | 3000 |"
    assert table_row(text, walker, "algo_a") == "| algo_a | 500.00 ± 100.00 | 500.00 ± 100.00 | 3 | 3000 |"
    # Hopper: truncated to the steps all seeds have (final = values at 2000: [2, 2, 2]); best over each full run [3, 5, 2]
    assert table_row(text, "Hopper-v5", "algo_a") == "| algo_a | 2.00 ± 0.00 | 3.33 ± 1.53 | 3 | 2000 |"


def test_figures_exist(results):
    tmp, _ = results
    names = {p.name for p in (tmp / "results").glob("*.png")}
    assert names == {"dm_control_cheetah-run-v0.png", "dm_control_walker-walk-v0.png", "Hopper-v5.png", "dmc_iqm.png"}


def test_dmc_aggregate_iqm(results):
    _, text = results
    section = text.split("## DeepMind Control aggregate")[1]
    # algo_a scores: cheetah [.1, .2, .3], walker [.4, .5, .6]; pooled, trim one of six at each end -> mean(.2..0.5)
    row = next(line for line in section.splitlines() if line.startswith("| algo_a |"))
    iqm, lo, hi = map(float, re.findall(r"\d+\.\d+", row)[:3])
    assert iqm == pytest.approx(0.35, abs=1e-3) and lo <= iqm <= hi
    assert "Hopper" not in section.split("Score:")[0]


def test_truncation_note(tmp_path, capsys):
    write_runs(tmp_path / "runs")
    plot.main(plot.Args(runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "out"), bootstrap=10))
    assert "note: Hopper-v5/algo_a: seeds have [2, 3, 3] eval points; using the 2 steps" in capsys.readouterr().out


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
