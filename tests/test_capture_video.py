"""--capture-video in every script: episodes of the training env are written as MP4 under videos/{run_name}/ (a toy
env that renders rgb_array, so no MuJoCo renderer is needed)."""

import pytest

from tests.conftest import BANDIT, TINY


@pytest.mark.parametrize("script", TINY)
def test_capture_video_writes_mp4(run, tmp_path, script):
    proc, run_dir = run(script, "--env-id", BANDIT, "--total-timesteps", 30, "--learning-starts", 20, "--batch-size", 8,
                        "--eval-episodes", 1, "--capture-video", *TINY[script])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    videos = sorted((tmp_path / "videos" / run_dir.name).glob("*.mp4"))
    assert len(videos) >= 2 and all(v.stat().st_size > 0 for v in videos), videos  # episodes 0, 1, 8, 27 (cubic)
