"""The speed benchmark runs and prints one well-formed line per script (one timed update each, CPU)."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_update_speed_prints_one_line_per_script():
    scripts = ["rfm_flow", "rfm_diffusion", "qvpo_baseline", "dipo_baseline", "sac_reference"]
    cmd = [sys.executable, str(ROOT / "benchmark" / "update_speed.py"), "--cpu", "--warmup", "0", "--repeats", "1",
           "--obs-dim", "11", "--act-dim", "3", "--scripts", ",".join(scripts)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device=cpu") and len(lines) == 1 + len(scripts), proc.stdout
    for name, line in zip(scripts, lines[1:]):
        assert re.match(rf"{name}: \d+\.\d ms/update", line), line
