"""scripts/study_volume.sh on tiny-llava with tiny step counts: its stages chain, the volume runs keep
snapshots and a drift curve, the reports pair every run with dowser, and a second invocation reuses
everything."""
import os
import subprocess
import sys

import pytest

from dowser_cli import artifacts

from conftest import ROOT

pytestmark = pytest.mark.slow

SUITE = f"""
tasks:
  - {{name: shapes, role: downstream, kind: vqa, metric: exact_match, data: "builtin:shapes/test.jsonl", limit: 4,
     prompt: "{{question}}", max_new_tokens: 3}}
  - {{name: words, role: upstream, kind: likelihood, metric: choice_likelihood,
     data: {ROOT}/dowser_cli/configs/tasks/data/words.jsonl, limit: 6, answer_template: "The answer is {{answer}}."}}
  - {{name: drift, role: upstream, kind: drift, samples: 2, seq_len: 12}}
"""


def _study(out, suite, *stages):
    env = {**os.environ, "DOWSER": f"{sys.executable} -m dowser_cli", "PYTHON": sys.executable,
           "DEMO_MODEL": "tiny-llava", "STUDY_LAYERS": "all", "DEMO_PROBE_SAMPLES": "4", "DEMO_TASKS": str(suite), "SEEDS": "0",
           "STRESS_STEPS": "2", "VOLUME_STEPS": "4", "SNAPSHOTS": "2", "DRIFT_EVERY": "2", "SAVE_EVERY": "2"}
    return subprocess.run(["bash", "scripts/study_volume.sh", str(out), *stages], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_study_stages_chain_pair_with_dowser_and_resume(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "study"
    r = _study(out, suite, "stress", "volume", "report")
    assert r.returncode == 0, r.stderr[-3000:]
    stress = artifacts.read_yaml(out / "report-stress" / "report.yaml")
    assert {p["group"] for p in stress["paired"]["pooled"]} == {"stress-full-ft", "stress-random", "stress-inverse"}
    assert stress["paired"]["reference"] == "stress-dowser"
    volume = artifacts.read_yaml(out / "report-volume" / "report.yaml")
    models = [row["model"] for row in volume["rows"]]
    for m in ("dowser", "random", "full-ft", "inverse"):
        assert f"volume-{m}-s0@2" in models and f"volume-{m}-s0" in models
        side = artifacts.read_yaml(out / "runs" / f"volume-{m}-s0" / "run.yaml")
        assert [d["step"] for d in side["drift_curve"]] == [2, 4] and side["snapshots"] == [2]
    assert {(p["group"], p["step"]) for p in volume["paired"]["pooled"]} == \
        {(f"volume-{m}", s) for m in ("random", "full-ft", "inverse") for s in (2, 4)}
    assert (out / "report-volume" / "report-curves.png").is_file() and (out / "report-volume" / "seeds.md").is_file()
    timed = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()]
    assert "run-volume-dowser-s0" in timed and "eval-volume" in timed
    again = _study(out, suite, "stress", "volume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stderr and "== run-volume-dowser-s0\n" not in again.stderr
