"""The demo pipeline (scripts/demo.sh) with tiny step counts: report structure, artifacts that verify
against each other, and a re-run that reuses every stage."""
import os
import subprocess
import sys

import pytest

from dowser_cli import artifacts
from dowser_cli.artifacts.runs import open_run

from conftest import ROOT

pytestmark = pytest.mark.slow

SUITE = f"""
tasks:
  - {{name: shapes, role: downstream, kind: vqa, metric: exact_match, data: "builtin:shapes/test.jsonl", limit: 4,
     prompt: "{{question}}", max_new_tokens: 3}}
  - {{name: facts-qa, role: upstream, kind: exact, metric: contains, data: {ROOT}/dowser_cli/configs/tasks/data/facts.jsonl,
     limit: 4, max_new_tokens: 8}}
  - {{name: words, role: upstream, kind: likelihood, metric: choice_likelihood,
     data: {ROOT}/dowser_cli/configs/tasks/data/words.jsonl, limit: 5, answer_template: "The answer is {{answer}}."}}
  - {{name: drift, role: upstream, kind: drift, samples: 2, seq_len: 16}}
"""


def _demo(out, suite):
    env = {**os.environ, "DOWSER": f"{sys.executable} -m dowser_cli", "DEMO_STEPS": "2", "DEMO_PROBE_SAMPLES": "4",
           "DEMO_TASKS": str(suite), "CALIB_SAMPLES": "8"}
    return subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)


def test_demo_pipeline_end_to_end_and_rerun_reuses_stages(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "demo"
    r = _demo(out, suite)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| base (smol-llava) | zero-shot |" in r.stdout and "everything is under" in r.stdout

    report = artifacts.read_yaml(out / "report" / "report.yaml")
    rows = {row["model"]: row for row in report["rows"]}
    methods = ("full-ft-s0", "dowser-s0", "random-s0", "supertuning-s0")
    assert set(rows) == {"base (smol-llava)", *methods}
    assert [rows[m]["method"] for m in methods] == ["full-ft", "dowser-mask", "random-mask", "supertuning"]
    assert report["items"] == {"shapes": 4, "facts-qa": 4, "words": 5, "drift": 2}
    # the demo's own suite (the test runs a cut-down copy of it): 300+ upstream items
    from dowser_cli.tasks import load_suite, read_records

    shipped = load_suite(ROOT / "dowser_cli" / "configs" / "tasks" / "demo.yaml")
    assert sum(len(read_records(t)) for t in shipped if t.in_u) >= 300
    assert report["intervals"]["level"] == 0.95 and report["intervals"]["replicates"] == 1000
    for row in rows.values():
        assert {"D", "U", "H", "dU", "drift", "ci95"} <= set(row)
        for key in ("D", "U", "H", "dU", "shapes", "facts-qa", "words", "drift"):
            lo, hi = row["ci95"][key]
            value = row["scores"].get(key, row.get(key))
            assert lo - 0.02 <= value <= hi + 0.02, (row["model"], key, lo, value, hi)   # values are rounded
    assert rows["base (smol-llava)"]["ci95"]["dU"] == [0.0, 0.0]
    assert (out / "report" / "report.png").is_file() and (out / "report" / "seeds.png").is_file()
    assert "| supertuning-s0 | supertuning |" in r.stdout and "peak RSS in training MB" in r.stdout   # costs
    assert "| dowser | 1 |" in (out / "report" / "seeds.md").read_text()           # the seeds' summary
    st = artifacts.read_yaml(out / "runs" / "supertuning-s0" / "run.yaml")
    assert st["method_details"]["trainable_fraction"] == 0.1 and (out / "runs" / "supertuning-s0" / "adapter").is_dir()

    # every stage's artifacts name the one before them by hash
    scores_sha = artifacts.sha256_file(out / "scores.safetensors")
    for strategy in ("dowser", "random"):
        m = out / f"mask-{strategy}-s0.safetensors"
        assert artifacts.read_yaml(m.with_suffix(".yaml"))["inputs"]["scores"]["sha256"] == scores_sha
        run = open_run(out / "runs" / f"{strategy}-s0")   # checks delta <-> its own mask copy <-> run.yaml
        assert run.meta["mask_sha256"] == artifacts.sha256_file(m)
        side = run.sidecar
        assert side["inputs"]["mask"]["sha256"] == artifacts.sha256_file(m)
        assert side["inputs"]["data"]["sha256"] == artifacts.sha256_file(out / "data" / "train.json")
        assert side["steps"] == 2 and side["tuned_layers"] == list(range(10, 30))
    full = open_run(out / "runs" / "full-ft-s0")
    assert full.mask is None and full.sidecar["tuned_layers"] == list(range(10, 30))
    assert artifacts.read_yaml(out / "scores.yaml")["model"]["fingerprint"] == full.meta["model_fingerprint"]

    # a second run changes nothing and evaluates nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("delta.safetensors")}
    r = _demo(out, suite)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("reusing") == 8                # data, probe, 2 masks, 4 runs
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert artifacts.read_yaml(out / "report" / "report.yaml")["cache"]["evaluated"] == 0
