"""The demo pipeline (scripts/demo.sh) with tiny step counts: report structure, artifacts that verify
against each other, and a re-run that reuses every stage."""
import os
import subprocess
import sys

import pytest

from dowser_cli import artifacts
from dowser_cli.export import open_run

from conftest import ROOT

pytestmark = pytest.mark.slow

SUITE = f"""
tasks:
  - {{name: digits, role: downstream, kind: vqa, metric: exact_match, data: "builtin:digits/test.jsonl", limit: 4,
     prompt: "{{question}}", max_new_tokens: 3}}
  - {{name: facts-qa, role: upstream, kind: exact, metric: contains, data: {ROOT}/configs/tasks/data/facts.jsonl,
     limit: 4, max_new_tokens: 8}}
  - {{name: facts-choice, role: upstream, kind: likelihood, metric: choice_likelihood,
     data: {ROOT}/configs/tasks/data/facts.jsonl, limit: 4, answer_template: "The answer is {{answer}}."}}
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
    methods = ("full-ft", "dowser", "spider", "lora", "dare", "tailor")
    assert set(rows) == {"base (smol-llava)", *methods}
    assert {rows[m]["method"] for m in methods} == {"full-ft", "dowser-mask", "spider", "lora", "dare", "tailor"}
    for row in rows.values():
        assert {"D", "U", "H", "dU", "drift"} <= set(row)
    assert (out / "report" / "report.png").is_file()
    assert "| tailor | tailor |" in r.stdout and "peak RSS in training MB" in r.stdout   # the cost table

    # every stage's artifacts name the one before them by hash
    scores_sha = artifacts.sha256_file(out / "scores.safetensors")
    for strategy in ("dowser",):
        m = out / f"mask-{strategy}.safetensors"
        assert artifacts.read_yaml(m.with_suffix(".yaml"))["inputs"]["scores"]["sha256"] == scores_sha
        run = open_run(out / "runs" / strategy)          # checks delta <-> its own mask copy <-> run.yaml
        assert run.meta["mask_sha256"] == artifacts.sha256_file(m)
        side = run.sidecar
        assert side["inputs"]["mask"]["sha256"] == artifacts.sha256_file(m)
        assert side["inputs"]["data"]["sha256"] == artifacts.sha256_file(out / "data" / "train.json")
        assert side["steps"] == 2 and side["tuned_layers"] == list(range(10, 30))
    full = open_run(out / "runs" / "full-ft")
    assert full.mask is None and full.sidecar["tuned_layers"] == list(range(10, 30))
    full_sha = artifacts.sha256_file(out / "runs" / "full-ft" / "delta.safetensors")
    for merged in ("dare", "tailor"):     # the post-hoc baselines name the Full-FT delta they edit
        side = open_run(out / "runs" / merged).sidecar
        assert side["inputs"]["source_delta"]["sha256"] == full_sha, side["inputs"]
    assert artifacts.read_yaml(out / "scores.yaml")["model"]["fingerprint"] == full.meta["model_fingerprint"]

    # a second run changes nothing and evaluates nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("delta.safetensors")}
    r = _demo(out, suite)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("reusing") == 9                # data, probe, 1 mask, 4 runs, 2 merges
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert artifacts.read_yaml(out / "report" / "report.yaml")["cache"]["evaluated"] == 0
