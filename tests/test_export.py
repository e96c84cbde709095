"""dowser export --format peft: a masked run as a PEFT Super-Tuning adapter that PeftModel loads to
the exported checkpoint's logits; what it cannot hold is refused in one line."""
import json

import pytest
import torch

from dowser_cli import artifacts, finetune, mask, probe
from dowser_cli.export import peft_sparsity
from dowser_cli.masking import MaskConfig
from dowser_cli.probing import ProbeConfig
from dowser_cli.training import FinetuneConfig

from conftest import conv, run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    probe.run("tiny-llava", d / "scores.safetensors", ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    mask.run(d / "scores.safetensors", d / "peft.safetensors", MaskConfig(ratio=0.1, count_rule="peft"))
    mask.run(d / "scores.safetensors", d / "layer.safetensors", MaskConfig(ratio=0.1, granularity="layer"))
    recs = [{"conversations": conv(f"What is {i} plus {i}?", str(2 * i))} for i in range(8)]
    (d / "train.json").write_text(json.dumps(recs))
    cfg = FinetuneConfig(lr=1e-3, max_steps=3, batch_size=4, warmup_ratio=0.0)   # norms train densely
    finetune.run("tiny-llava", d / "train.json", d / "run", cfg, mask_path=d / "peft.safetensors")
    return d


def test_peft_sparsity_is_the_one_rate_that_gives_every_count():
    s = peft_sparsity({"a": (33178, 331776), "b": (88474, 884736)})
    assert s is not None and int(331776 * (1 - s)) == 33178 and int(884736 * (1 - s)) == 88474
    assert peft_sparsity({"a": (10, 100), "b": (30, 100)}) is None          # 10 % and 30 %: no one rate


def test_the_adapter_loads_in_peft_to_the_exported_checkpoints_logits(work, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    r = run_cli("export", work / "run", "--format", "peft", "--out", tmp_path / "adapter")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", work / "run", "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SUPERTUNING" and cfg["modules_to_save"]          # the norms, trained densely
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    base = load_model(src, load_config(src), torch.float32, "cpu").model
    base_logits_in = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        before = base(input_ids=base_logits_in).logits
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    full = AutoModelForImageTextToText.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        got, want = peft_model(input_ids=base_logits_in).logits, full(input_ids=base_logits_in).logits
    assert not torch.allclose(before, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert size < (work / "run" / "delta.safetensors").stat().st_size * 3


def test_what_an_adapter_cannot_hold_is_one_line_exit_2(work, tmp_path):
    cfg = FinetuneConfig(lr=1e-3, max_steps=1, batch_size=4, warmup_ratio=0.0)
    finetune.run("tiny-llava", work / "train.json", tmp_path / "layer", cfg, mask_path=work / "layer.safetensors")
    r = run_cli("export", tmp_path / "layer", "--format", "peft", "--out", tmp_path / "a1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--count-rule peft" in lines[0], r.stderr
    finetune.run("tiny-llava", work / "train.json", tmp_path / "full", FinetuneConfig(lr=1e-3, max_steps=1))
    r = run_cli("export", tmp_path / "full", "--format", "peft", "--out", tmp_path / "a2")
    assert r.returncode == 2 and "no mask" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("export", work / "run", "--format", "onnx", "--out", tmp_path / "a3")
    assert r.returncode == 2 and "expected one of checkpoint, peft" in r.stderr
    assert not any((tmp_path / n).exists() for n in ("a1", "a2", "a3"))
    r = run_cli("mask", work / "scores.safetensors", "--count-rule", "peft", "--granularity", "layer", "--out",
                tmp_path / "m.safetensors")
    assert r.returncode == 2 and "use --granularity matrix" in r.stderr


def test_a_lora_runs_adapter_is_exported_as_peft_trained_it(work, tmp_path):
    cfg = FinetuneConfig(method="lora", lr=1e-3, max_steps=1, batch_size=4, warmup_ratio=0.0)
    finetune.run("tiny-llava", work / "train.json", tmp_path / "lora", cfg)
    r = run_cli("export", tmp_path / "lora", "--format", "peft", "--out", tmp_path / "adapter")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert artifacts.sha256_file(tmp_path / "adapter" / "adapter_model.safetensors") == \
        artifacts.sha256_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
