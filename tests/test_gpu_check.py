"""scripts/gpu_check.sh, the checks that need a GPU, runs end to end in its CPU dry-run mode (toy sizes),
so it is known to work the day a GPU is at hand."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu():
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0].strip("| ") for row in rows] == ["scale", "bf16", "trainer", "lmms"]
    assert all(row[1] == "ok" for row in rows), r.stdout
    assert "0 frozen entries moved" in r.stdout and "refused in one line" in r.stdout
    assert "CPU (dry run)" in r.stdout
