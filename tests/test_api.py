"""The Python API (dowser_cli.api): load_mask checks the model, MaskedAdamW.for_model trains only the
mask, save_delta writes a run directory the CLI reads."""
import json

import pytest
import torch

import dowser_cli as dowser
from dowser_cli import artifacts, mask, probe
from dowser_cli.artifacts.runs import open_run
from dowser_cli.masking import MaskConfig
from dowser_cli.models import load_config, load_model, resolve_source
from dowser_cli.probing import ProbeConfig

from conftest import conv, run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    probe.run("tiny-llava", d / "scores.safetensors", ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    mask.run(d / "scores.safetensors", d / "mask.safetensors", MaskConfig(ratio=0.1))
    recs = [{"conversations": conv(f"What is {i} plus {i}?", str(2 * i))} for i in range(4)]
    (d / "train.json").write_text(json.dumps(recs))
    return d


def _load(name="tiny-llava"):
    src = resolve_source(name)
    return load_model(src, load_config(src), torch.float32, "cpu")


def test_the_documented_loop_trains_only_the_mask_and_its_run_exports(work, tmp_path):
    lm = _load()
    model = lm.model
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the README's snippet
    m = dowser.load_mask(work / "mask.safetensors", model)
    opt = dowser.MaskedAdamW.for_model(model, m, lr=1e-3, weight_decay=0.1)
    batch = dowser.collate(dowser.read_examples(work / "train.json", lm.tokenizer, lm.processor), lm.tokenizer,
                           lm.processor)
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    run = dowser.save_delta(model, m, tmp_path / "run")

    moved = 0
    for n, p in model.named_parameters():
        if n in m.dense:
            keep = ~m.dense[n]
            assert torch.equal(p.detach()[keep], base[n][keep]), n     # frozen entries bit-identical
            moved += int((p.detach() != base[n]).sum())
        else:
            assert torch.equal(p.detach(), base[n]), n                 # not in the mask: untouched
    assert 0 < moved <= m.trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in m.dense)
    # optimiser state for the trainable entries only: two fp32 moments each
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == m.trainable

    rd = open_run(run)
    assert rd.sidecar["model"]["spec"] == "tiny-llava" and rd.sidecar["trainable"]["trainable_entries"] == m.trainable
    r = run_cli("export", run, "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForImageTextToText

    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    got = dict(back.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(got[n].detach(), p.detach()), n
    r = run_cli("inspect", run)
    assert r.returncode == 0 and "dowser-mask" in r.stdout, r.stderr


def test_load_mask_refuses_another_model_and_trained_weights(work):
    with pytest.raises(dowser.UserError, match="different model"):
        dowser.load_mask(work / "mask.safetensors", _load("tiny-llama").model)
    model = _load().model
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(dowser.UserError, match="different weights"):
        dowser.load_mask(work / "mask.safetensors", model)


def test_save_delta_never_overwrites_unasked_and_replaces_whole(work, tmp_path):
    model = _load().model
    m = dowser.load_mask(work / "mask.safetensors", model)
    out = dowser.save_delta(model, m, tmp_path / "run", steps=1)
    with pytest.raises(dowser.UserError, match="already holds a run"):
        dowser.save_delta(model, m, out)
    dowser.save_delta(model, m, out, steps=2, overwrite=True)
    assert artifacts.read_yaml(out / "run.yaml")["steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["delta.safetensors", "mask.safetensors", "mask.yaml", "run.yaml"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(dowser.UserError, match="holds files and no run"):
        dowser.save_delta(model, m, tmp_path / "other", overwrite=True)
