"""A write that fails (a full disk, a file-size limit) ends in one line naming the file, leaves no
partial artifact and no temp file, and leaves what was there before unchanged: scores under a real
`ulimit -f`, mask / delta / checkpoint / report with ENOSPC injected into the writer."""
import errno
import json
import subprocess
import sys

import pytest

from dowser_cli import artifacts, evaluate, finetune, mask, probe
from dowser_cli.errors import UserError
from dowser_cli.evaluate import EvalConfig
from dowser_cli.finetune import FinetuneConfig
from dowser_cli.masking import MaskConfig
from dowser_cli.probing import ProbeConfig

from conftest import ROOT

FULL = "No space left on device"


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _no_temp(d):
    return not [p for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".") and p.is_dir()]


def _fail_writes(monkeypatch, when):
    """Every safetensors / YAML / text write whose target ``when(path)`` accepts fails with ENOSPC."""
    save, write_text = artifacts.save_file, artifacts.Path.write_text

    def failing_save(tensors, filename, metadata=None):
        if when(filename):
            raise OSError(errno.ENOSPC, FULL)
        return save(tensors, filename, metadata=metadata)

    def failing_text(self, *a, **kw):
        if when(str(self)):
            raise OSError(errno.ENOSPC, FULL)
        return write_text(self, *a, **kw)
    monkeypatch.setattr(artifacts, "save_file", failing_save)
    monkeypatch.setattr(artifacts.Path, "write_text", failing_text)


def test_scores_under_a_real_file_size_limit(tmp_path):
    out = tmp_path / "s.safetensors"
    cmd = (f"ulimit -f 8; exec {sys.executable} -m dowser_cli probe tiny-llama --samples 2 --batch-size 2 "
           f"--probes 1 --seq-len 8 --out {out}")                           # 8 KB: the scores do not fit
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == (f"dowser: error: {out}: cannot write it (File too large (os error 27)); nothing of it was "
                         f"written and any earlier s.safetensors is unchanged")
    assert len([ln for ln in lines if "error" in ln]) == 1
    assert list(tmp_path.iterdir()) == []                                   # no partial file, no temp, no lock


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("wf")
    probe.run("tiny-llava", d / "s.safetensors", ProbeConfig(samples=2, batch_size=2, probes=1, seq_len=8))
    return d / "s.safetensors"


def test_mask_write_fails_and_the_earlier_mask_is_unchanged(scores, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    mask.run(scores, out, MaskConfig(ratio=0.1))
    before = _files(tmp_path)
    _fail_writes(monkeypatch, lambda p: "m.safetensors" in p)
    with pytest.raises(UserError, match=f"m.safetensors: cannot write it \\({FULL}\\); nothing of it was written"):
        mask.run(scores, out, MaskConfig(ratio=0.5))
    assert _files(tmp_path) == before and _no_temp(tmp_path)


def _data(tmp_path):
    recs = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": str(2 * i)}]} for i in range(8)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    return tmp_path / "t.jsonl"


def test_delta_write_fails_in_one_line_and_no_delta_or_run_yaml_is_left(tmp_path, monkeypatch):
    data = _data(tmp_path)
    _fail_writes(monkeypatch, lambda p: "delta.safetensors" in p)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="delta.safetensors: cannot write it"):
        finetune.run("tiny-llava", data, out, FinetuneConfig(lr=1e-3, max_steps=2, batch_size=4, warmup_ratio=0.0))
    assert not (out / "delta.safetensors").exists() and not (out / "run.yaml").exists() and _no_temp(tmp_path)


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data = _data(tmp_path)
    out = tmp_path / "run"
    calls = {"n": 0}

    def second_checkpoint(path):
        if "state.safetensors" in path:
            calls["n"] += 1
            return calls["n"] >= 2
        return False
    _fail_writes(monkeypatch, second_checkpoint)
    with pytest.raises(UserError, match="state.safetensors: cannot write it"):
        finetune.run("tiny-llava", data, out, FinetuneConfig(lr=1e-3, max_steps=6, batch_size=4, warmup_ratio=0.0,
                                                             save_every=2))
    side = artifacts.read_yaml(out / "checkpoint" / "state.yaml")
    assert side["step"] == 2                                                 # the first checkpoint, whole
    assert side["state_sha256"] == artifacts.sha256_file(out / "checkpoint" / "state.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"] and _no_temp(tmp_path)
    monkeypatch.undo()
    side = finetune.run("tiny-llava", data, out, FinetuneConfig(lr=1e-3, max_steps=6, batch_size=4,
                                                                warmup_ratio=0.0, save_every=2), resume=True)
    assert side["steps"] == 6                                                # and it resumes from it


def test_a_failed_report_write_keeps_the_earlier_report(tmp_path, monkeypatch):
    data = _data(tmp_path)
    finetune.run("tiny-llava", data, tmp_path / "run", FinetuneConfig(lr=1e-3, max_steps=1, batch_size=4,
                                                                      warmup_ratio=0.0))
    facts = ROOT / "dowser_cli" / "configs" / "tasks" / "data" / "facts.jsonl"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""tasks:
  - {{name: facts, role: upstream, kind: exact, metric: contains, data: "{facts}", limit: 2, max_new_tokens: 2}}
  - {{name: facts-down, role: downstream, kind: exact, metric: contains, data: "{facts}", limit: 2, max_new_tokens: 2}}
""")
    out = tmp_path / "report"
    evaluate.run("tiny-llava", [tmp_path / "run"], suite, out, EvalConfig(batch_size=2, bootstrap=20))
    before = {k: v for k, v in _files(out).items() if k.parts[0] != "cache"}
    _fail_writes(monkeypatch, lambda p: p.endswith("report.yaml") or ".report.yaml." in p)
    with pytest.raises(UserError, match="report.yaml: cannot write it"):
        evaluate.run("tiny-llava", [tmp_path / "run"], suite, out, EvalConfig(batch_size=2, bootstrap=30))
    assert {k: v for k, v in _files(out).items() if k.parts[0] != "cache"} == before and _no_temp(out)
