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


# SmolLM2's ChatML, which takes a string per message (smol-llava's template)
STRING_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def _half_answered(d, spec: str) -> None:
    """items.jsonl's references: the model's own greedy answer (dowser's evaluator) on every other item."""
    import torch

    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source(spec)
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    task = [t for t in tasks.load_suite(d / "suite.yaml") if t.name == "ours"][0]
    recs = tasks.read_records(task)
    preds = evaluate.generate_answers(lm, task, recs, 4, 2048, "cpu", torch.float32, lambda k: None)
    items = [json.loads(x) for x in (d / "items.jsonl").read_text().splitlines()]
    for i, p in enumerate(preds):
        items[i]["answer"] = p if i % 2 == 0 else "zzz"
    _write_items(d, items)


def _agree(d, base, tmp_path) -> None:
    out = tmp_path / "report"
    r = run_cli("eval-forgetting", "--base", base, "--tasks", d / "suite.yaml", "--out", out, "--json",
                "--bootstrap", "20")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    (row,) = json.loads(r.stdout)
    assert row["scores"]["ours"] > 0 and row["scores"]["theirs"] == pytest.approx(row["scores"]["ours"]), row
    cached = [json.loads(f.read_text()) for f in (out / "cache").glob("*.json")]
    theirs = [c["per_item"] for c in cached if "lmms" in c]
    ours = [c["per_item"] for c in cached if "lmms" not in c]
    assert len(theirs) == 1 and theirs == ours            # item by item


def test_a_model_whose_chat_template_takes_strings_is_evaluated_by_both_harnesses_alike(setup, tmp_path):
    """lmms-eval's chat wrapper hands the template typed parts (a list); a template that takes strings
    (SmolLM2's ChatML) failed inside it with a 40-line traceback. The checkpoint lmms-eval reads gets
    the model's own template made to take parts too, and both harnesses score each item alike."""
    from dowser_cli.models import load_config, load_model, resolve_source
    import shutil
    import torch

    src = resolve_source("tiny-llava")
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    model = tmp_path / "chatml-llava"
    for o in (lm.processor, lm.tokenizer):
        o.chat_template = STRING_TEMPLATE
    lm.model.save_pretrained(model)
    lm.processor.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    d = tmp_path / "suite"
    shutil.copytree(setup, d, ignore=shutil.ignore_patterns("run", "digits"))
    (d / "items.jsonl").write_text((setup / "items.jsonl").read_text())
    (d / "lmms" / "local.yaml").write_text(TASK_YAML.format(items=d / "items.jsonl"))
    _half_answered(d, str(model))
    _agree(d, model, tmp_path)


@pytest.mark.slow
def test_smol_llava_is_evaluated_by_both_harnesses_alike(setup, tmp_path):
    """The embedded smol-llava (SmolLM2's string template) through lmms-eval and dowser's evaluator."""
    import shutil

    d = tmp_path / "suite"
    shutil.copytree(setup, d, ignore=shutil.ignore_patterns("run", "digits"))
    (d / "lmms" / "local.yaml").write_text(TASK_YAML.format(items=d / "items.jsonl"))
    _half_answered(d, "smol-llava")
    _agree(d, "smol-llava", tmp_path)


def test_a_failure_inside_lmms_eval_is_one_line(setup, tmp_path):
    """An exception inside lmms-eval's loop (here its task's doc_to_text raising) is one line on stderr."""
    import shutil

    d = tmp_path / "suite"
    shutil.copytree(setup, d, ignore=shutil.ignore_patterns("run", "digits"))
    (d / "lmms" / "local.yaml").write_text(TASK_YAML.format(items=d / "items.jsonl"))
    (d / "lmms" / "utils.py").write_text(TASK_UTILS.replace('return doc["text"]', 'return doc["no_such_key"]'))
    r = run_cli("eval-forgetting", "--base", "tiny-llava", "--tasks", d / "suite.yaml", "--out", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "lmms-eval failed on dowser_local_vqa (llava_hf wrapper): KeyError: 'no_such_key'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


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


def _refused(tmp_path, entry: str, match: str) -> None:
    (tmp_path / "s.yaml").write_text(f"tasks:\n  - {entry}\n")
    with pytest.raises(tasks.UserError, match=match):
        tasks.load_suite(tmp_path / "s.yaml")


def test_suite_keys_for_lmms_tasks(tmp_path):
    _refused(tmp_path, "{name: t, harness: lmms-eval}", "needs lmms_task")
    _refused(tmp_path, "{name: t, harness: lmms-eval, lmms_task: x, data: a.jsonl}", "drop data")
    _refused(tmp_path, "{name: t, harness: other}", "unknown harness 'other'; available: dowser, lmms-eval")
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


def test_each_wrapper_gets_only_the_arguments_its_constructor_names():
    pytest.importorskip("lmms_eval", reason="the lmms extra (make install-lmms)")
    import inspect

    import torch
    from lmms_eval import models

    from dowser_cli import harness
    from dowser_cli.models import registry

    for wrapper in sorted(set(registry.lmms_wrappers().values())):
        accepted = inspect.signature(models.get_model(wrapper).__init__).parameters
        kw = harness.model_kwargs(wrapper, __import__("pathlib").Path("/ckpt, a=b"), "cuda:1", torch.bfloat16)
        assert set(kw) <= set(accepted), wrapper               # most wrappers assert that no other reaches them
        assert kw["pretrained"] == "/ckpt, a=b" and kw["device"] == "cuda:1" and kw["batch_size"] == 1, wrapper
        assert kw.get("device_map", "cuda:1") == "cuda:1", wrapper   # never their "auto" over every GPU
        assert ("dtype" in kw) == ("dtype" in accepted), wrapper
    assert harness.model_kwargs("llava_hf", __import__("pathlib").Path("/c"), "cpu", torch.float32) == {
        "pretrained": "/c", "device": "cpu", "device_map": "cpu", "batch_size": 1, "dtype": "float32"}
    assert "dtype" not in harness.model_kwargs("qwen2_vl", __import__("pathlib").Path("/c"), "cpu", torch.float32)


def test_lmms_warnings_go_to_stderr_not_to_json_stdout():
    pytest.importorskip("lmms_eval", reason="the lmms extra (make install-lmms)")
    import subprocess
    import sys

    code = ("from dowser_cli import harness; harness.require(); from loguru import logger; "
            "logger.warning('from lmms-eval'); print('{}')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "{}\n" and "from lmms-eval" in r.stderr


def _res(docs, filters, metric="exact_match"):
    """simple_evaluate's results for one task: each document logged once per filter, filter after filter."""
    samples = [{"doc_id": d, "target": "a", "filtered_resps": [f"{f}-{d}"], metric: float((d + i) % 2)}
               for i, f in enumerate(filters) for d in reversed(range(docs))]
    results = {}
    for i, f in enumerate(filters):
        results[f"{metric},{f}"] = sum((d + i) % 2 for d in range(docs)) / docs
        results[f"{metric}_stderr,{f}"] = 0.1
    return {"results": {"t": results}, "samples": {"t": samples}}


def test_reading_results_picks_the_filters_block_of_samples():
    from dowser_cli import harness

    task = lambda metric: tasks.Task(name="x", role="upstream", kind="lmms", metric=metric, prompt="",
                                     max_new_tokens=0, harness="lmms-eval", lmms_task="t")
    got = harness.read_results(_res(4, ["none"]), task("exact_match"), "0.7.3")
    assert got["per_item"] == [0.0, 1.0, 0.0, 1.0] and got["score"] == 0.5 and got["lmms"]["metric"] == "exact_match,none"
    assert [p["id"] for p in got["predictions"]] == ["0", "1", "2", "3"]
    res = _res(3, ["strict", "flexible"])
    got = harness.read_results(res, task("exact_match,flexible"), "0.7.3")
    assert got["per_item"] == [1.0, 0.0, 1.0] and got["n"] == 3 and got["predictions"][0]["prediction"] == "flexible-0"
    assert got["score"] == pytest.approx(sum(got["per_item"]) / 3)
    with pytest.raises(harness.UserError, match=r"under several filters; name one as metric: exact_match,strict, "
                                                r"exact_match,flexible"):
        harness.read_results(res, task("exact_match"), "0.7.3")
    with pytest.raises(harness.UserError, match=r"reports no 'exact_match,loose'; it reports: exact_match,strict, "
                                                r"exact_match,flexible"):
        harness.read_results(res, task("exact_match,loose"), "0.7.3")
    only = harness.read_results(_res(2, ["flexible"]), task("exact_match"), "0.7.3")   # one filter, not "none"
    assert only["lmms"]["metric"] == "exact_match,flexible"
    group = {"results": {"t": {}, "t_a": {}}, "samples": {"t_a": [], "t_b": []}}
    with pytest.raises(harness.UserError, match=r"t is a group of lmms-eval tasks \(t_a, t_b\)"):
        harness.read_results(group, task("exact_match"), "0.7.3")


def test_editing_a_local_lmms_task_changes_its_cache_identity(tmp_path):
    (tmp_path / "lmms").mkdir()
    (tmp_path / "lmms" / "local.yaml").write_text("task: local\n")
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, lmms_task: local, include_path: lmms}\n")
    (before,) = tasks.load_suite(tmp_path / "s.yaml")
    (tmp_path / "lmms" / "utils.py").write_text("def doc_to_text(doc): return doc['q']\n")
    (after,) = tasks.load_suite(tmp_path / "s.yaml")
    assert before.include_sha256 != after.include_sha256 and before.digest() != after.digest()


def test_task_limit_and_an_explicit_dowser_harness_are_checked(tmp_path):
    _refused(tmp_path, "{name: t, lmms_task: x, limit: all}", "limit 'all': expected a positive whole number")
    _refused(tmp_path, "{name: t, harness: dowser, lmms_task: x}", "unknown kind None")
