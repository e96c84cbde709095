"""eval-forgetting through lmms-eval (the optional extra), offline: a local lmms-eval task over a small
JSONL file, the same items scored by dowser's own evaluator, both on the base model and on a run."""
import json

import pytest
import yaml

from dowser_cli import evaluate, tasks
from dowser_cli.finetune import FinetuneConfig

from conftest import run_cli

TASK_YAML = """task: dowser_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"] + "\\nAnswer the question using a single word or phrase."
'''
SUITE = """tasks:
  - {name: ours, role: downstream, kind: vqa, metric: exact_match, data: items.jsonl, max_new_tokens: 6}
  - {name: theirs, role: upstream, harness: lmms-eval, lmms_task: dowser_local_vqa, metric: exact_match,
     include_path: lmms}
"""


def _write_items(d, recs):
    (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("lmms_eval", reason="the lmms extra (make install-lmms)")
    from dowser_cli import finetune
    from dowser_cli.datasets import write_digits

    d = tmp_path_factory.mktemp("lmms")
    files = write_digits(d / "digits", n_train=16, n_test=6)
    finetune.run("tiny-llava", files["train"], d / "run", FinetuneConfig(lr=1e-3, max_steps=2, batch_size=4,
                                                                          warmup_ratio=0.0))
    recs = [json.loads(x) for x in files["test"].read_text().splitlines()]
    items = [{"question_id": i, "image": str((files["test"].parent / r["image"]).resolve()), "text": r["text"],
              "answer": "zzz"} for i, r in enumerate(recs)]
    _write_items(d, items)
    (d / "lmms").mkdir()
    (d / "lmms" / "local.yaml").write_text(TASK_YAML.format(items=d / "items.jsonl"))
    (d / "lmms" / "utils.py").write_text(TASK_UTILS)
    (d / "suite.yaml").write_text(SUITE)
    # Half the references are what the base model answers (dowser's evaluator, greedy), so neither
    # harness can agree with the other by both scoring zero.
    task = [t for t in tasks.load_suite(d / "suite.yaml") if t.name == "ours"][0]
    from dowser_cli.models import load_config, load_model, resolve_source
    import torch

    src = resolve_source("tiny-llava")
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    preds = evaluate.generate_answers(lm, task, tasks.read_records(task), 4, 2048, "cpu", torch.float32,
                                      lambda k: None)
    for i, p in enumerate(preds):
        if i % 2 == 0:
            items[i]["answer"] = p
    _write_items(d, items)
    return d


def test_lmms_eval_agrees_with_dowser_on_the_same_items(setup, tmp_path):
    out = tmp_path / "report"
    r = run_cli("eval-forgetting", setup / "run", "--base", "tiny-llava", "--tasks", setup / "suite.yaml",
                "--out", out, "--json", "--bootstrap", "50")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["model"] for row in rows] == ["base (tiny-llava)", "run"]
    assert rows[0]["scores"]["ours"] == pytest.approx(50.0)
    for row in rows:   # the same prompts, images and greedy answers: the same exact-match score
        assert row["scores"]["theirs"] == pytest.approx(row["scores"]["ours"]), row
    cached = [json.loads(f.read_text()) for f in (out / "cache").glob("*.json")]
    theirs = sorted(c["per_item"] for c in cached if "lmms" in c)
    ours = sorted(c["per_item"] for c in cached if "lmms" not in c)
    assert len(theirs) == 2 and theirs == ours            # item by item, on both models
    assert [1.0, 0.0] * 3 in theirs
    report = yaml.safe_load((out / "report.yaml").read_text())
    h = report["harnesses"]["lmms-eval"]
    assert h["version"] == __import__("importlib.metadata").metadata.version("lmms-eval")
    assert h["tasks"]["theirs"]["lmms_task"] == "dowser_local_vqa"
    assert h["tasks"]["theirs"]["metric"] == "exact_match,none"
    assert report["items"]["theirs"] == 6
    assert not list(out.glob(".lmms-checkpoint-*"))   # the temporary checkpoints are gone
    again = run_cli("eval-forgetting", setup / "run", "--base", "tiny-llava", "--tasks", setup / "suite.yaml",
                    "--out", out, "--json", "--bootstrap", "50")
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load((out / "report.yaml").read_text())["cache"] == {"hits": 4, "evaluated": 0}


def test_lmms_refusals_are_one_line(setup, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SUITE.replace("dowser_local_vqa", "no_such_task").replace("include_path: lmms",
                                                                              f"include_path: {setup / 'lmms'}")
                   .replace("items.jsonl", str(setup / "items.jsonl")))
    r = run_cli("eval-forgetting", "--base", "tiny-llava", "--tasks", bad, "--out", tmp_path / "o")
    assert r.returncode == 2 and "unknown lmms-eval task(s) no_such_task" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr



def test_an_architecture_without_an_lmms_wrapper_is_refused(tiny_models):
    from dowser_cli import harness

    with pytest.raises(harness.UserError, match=r"no lmms-eval model wrapper for causal-lm \(model_type llama\); "
                                                r"architectures with one: .*llava \(llava_hf\)"):
        harness.wrapper_for(tiny_models("tiny-llama"))
    assert harness.wrapper_for(tiny_models("tiny-llava")) == "llava_hf"


def test_suite_keys_for_lmms_tasks(tmp_path):
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, harness: lmms-eval}\n")
    with pytest.raises(tasks.UserError, match="needs lmms_task"):
        tasks.load_suite(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, harness: lmms-eval, lmms_task: x, data: a.jsonl}\n")
    with pytest.raises(tasks.UserError, match="drop data"):
        tasks.load_suite(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, harness: other}\n")
    with pytest.raises(tasks.UserError, match="unknown harness 'other'; available: dowser, lmms-eval"):
        tasks.load_suite(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, lmms_task: textvqa_val, lmms_scale: 1}\n")
    (t,) = tasks.load_suite(tmp_path / "s.yaml")
    assert (t.harness, t.kind, t.metric, t.scale) == ("lmms-eval", "lmms", "exact_match", 1.0)


def test_without_the_extra_it_says_how_to_install(tmp_path, monkeypatch):
    from dowser_cli import harness

    monkeypatch.setitem(__import__("sys").modules, "lmms_eval", None)   # import fails as if absent
    monkeypatch.setitem(__import__("sys").modules, "lmms_eval.evaluator", None)
    with pytest.raises(harness.UserError, match="make install-lmms"):
        harness.require()


def test_the_shipped_lmms_suite_names_real_lmms_eval_tasks():
    from dowser_cli.config import find

    suite = tasks.load_suite(find("paper-upstream-lmms", "tasks", "--tasks"), check_files=False)
    lmms = {t.name: t.lmms_task for t in suite if t.harness == "lmms-eval"}
    assert lmms == {"textvqa": "textvqa_val", "gqa": "gqa", "okvqa": "ok_vqa_val2014"}
    assert {t.name for t in suite if t.harness == "dowser"} == {"mmbench-en", "mmbench-cn", "ocrvqa"}
    pytest.importorskip("lmms_eval", reason="the lmms extra (make install-lmms)")
    from lmms_eval.tasks import TaskManager

    assert set(lmms.values()) <= set(TaskManager(verbosity="WARNING").all_tasks)
