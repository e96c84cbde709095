"""dowser finetune / export on tiny models: frozen entries bit-identical, state ~ rho, resume, export."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dowser_cli import artifacts, finetune, mask, probe, training
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import open_run
from dowser_cli.models.runs import load_run
from dowser_cli.finetune import FinetuneConfig
from dowser_cli.masking import MaskConfig
from dowser_cli.probing import ProbeConfig

from conftest import ROOT, conv, run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Scores and masks (rho 0.1, 0.5) of tiny-llava, an image dataset and a text-only JSONL."""
    from PIL import Image

    d = tmp_path_factory.mktemp("ft")
    probe.run("tiny-llava", d / "scores.safetensors", ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    for rho in (0.1, 0.5):
        mask.run(d / "scores.safetensors", d / f"mask{rho}.safetensors", MaskConfig(ratio=rho))
    (d / "img").mkdir()
    recs = []
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(d / "img" / f"{i}.png")
        recs.append({"image": f"{i}.png", "conversations": conv("<image>\nWhat digit is shown?", str(i % 10))})
    (d / "train.json").write_text(json.dumps(recs))
    text = [{"conversations": conv(f"What is {i} plus {i}?", str(2 * i))} for i in range(10)]
    (d / "text.jsonl").write_text("\n".join(json.dumps(r) for r in text))
    return d


def _base(name):
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source(name)
    return load_model(src, load_config(src), torch.float32, "cpu", tokenizer=False).model


def _train(work, out, rho=0.1, **kw):
    cfg = FinetuneConfig(**{"lr": 1e-3, "max_steps": 4, "batch_size": 4, "weight_decay": 0.1, "warmup_ratio": 0.0,
                            **kw})
    return finetune.run("tiny-llava", work / "train.json", out, cfg, mask_path=work / f"mask{rho}.safetensors",
                        image_folder=work / "img")


def test_frozen_entries_stay_bit_identical_and_tuned_matrices_change_only_inside_the_mask(work, tmp_path):
    side = _train(work, tmp_path / "run")
    base = dict(_base("tiny-llava").named_parameters())
    tuned = dict(load_run(open_run(tmp_path / "run")).model.named_parameters())
    mf = open_mask(tmp_path / "run" / "mask.safetensors")
    assert set(mf.params) and side["trainable"]["masked_params"] == len(mf.params)
    for name, p0 in base.items():
        p1 = tuned[name].detach()
        if name in mf.params:
            m = mf.dense(name)
            assert torch.equal(p1[~m], p0.detach()[~m]), name        # weight decay 0.1 did not touch them
            assert (p1[m] != p0.detach()[m]).float().mean() > 0.9, name
        elif "layernorm" in name and ".layers." in name:
            assert not torch.equal(p1, p0.detach()), name            # norms of tuned layers train densely
        else:
            assert torch.equal(p1, p0.detach()), name                # vision tower, projector, embeddings...
    losses = [x["loss"] for x in side["loss_curve"]]
    assert len(losses) == 4 and side["steps"] == 4


def test_optimiser_state_scales_with_rho(work, tmp_path):
    sizes = {}
    for rho in (0.1, 0.5):
        side = _train(work, tmp_path / f"r{rho}", rho=rho, max_steps=1)
        c = side["trainable"]
        mf = open_mask(work / f"mask{rho}.safetensors")
        k = sum(int(mf.dense(n).sum()) for n in mf.params)
        dense = c["trainable_entries"] - k                              # norms
        # two fp32 moments per trainable entry + one int32 index per masked entry, nothing for frozen ones
        assert side["optimizer"]["state_bytes"] == 2 * 4 * (k + dense) + 4 * k
        sizes[rho] = k
    assert sizes[0.5] / sizes[0.1] == pytest.approx(5, rel=0.01)


def test_gradient_accumulation_equals_one_big_batch(work, tmp_path):
    _train(work, tmp_path / "big", max_steps=2, batch_size=4, grad_accum=1)
    _train(work, tmp_path / "acc", max_steps=2, batch_size=2, grad_accum=2)
    a = artifacts.read_tensors(tmp_path / "big" / "delta.safetensors")
    b = artifacts.read_tensors(tmp_path / "acc" / "delta.safetensors")
    # equal up to float rounding (other padding widths, other summation order), which Adam's m/sqrt(v)
    # can lift to ~1e-6 on an entry whose gradient is near zero: 0.1 % of one step's update at lr 1e-3
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=5e-6)


def test_export_loads_in_plain_transformers_with_the_fine_tuned_logits(work, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _train(work, tmp_path / "run", max_steps=2)
    r = run_cli("export", tmp_path / "run", "--out", tmp_path / "exp")
    assert r.returncode == 0, r.stderr
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "exp")
    ours = load_run(open_run(tmp_path / "run")).model
    ids = torch.tensor([[256, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
        assert not torch.equal(plain(input_ids=ids).logits, _base("tiny-llava")(input_ids=ids).logits)
    assert proc.image_token == "<image>"
    r = run_cli("export", tmp_path / "run", "--out", tmp_path / "exp")
    assert r.returncode == 2 and "not empty" in r.stderr


def test_text_only_jsonl_full_ft_on_tiny_llama_from_the_cli(work, tmp_path):
    out = tmp_path / "run"
    r = run_cli("finetune", "tiny-llama", "--data", work / "text.jsonl", "--out", out, "--max-steps", "3",
                "--lr", "1e-3", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(out / "run.yaml")
    assert side["method"] == "full-ft" and side["steps"] == 3 and side["data"]["used"] == 10
    assert not (out / "mask.safetensors").exists() and not (out / "checkpoint").exists()
    delta = artifacts.read_tensors(out / "delta.safetensors")
    # Full-FT of all 3 layers (fewer than 20): dense tensors, 9 per layer (7 linears + 2 norms)
    assert len(delta) == 27 and all(v.dim() in (1, 2) for v in delta.values())
    r = run_cli("inspect", out, "--json")
    rows = json.loads(r.stdout)["rows"]
    assert {row["layer"] for row in rows} == {"0", "1", "2"} and all(row["changed"] > 0 for row in rows)


def test_report_to_tensorboard_logs_every_steps_scalars(work, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = run_cli("finetune", "tiny-llama", "--data", work / "text.jsonl", "--out", out, "--max-steps", "3",
                "--lr", "1e-3", "--batch-size", "2", "--report-to", "tensorboard")
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "train/host_rss_mb"} <= tags
    curve = artifacts.read_yaml(out / "run.yaml")["loss_curve"]
    logged = acc.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [round(e.value, 4) for e in logged] == [round(c["loss"], 4) for c in curve]
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    r = run_cli("finetune", "tiny-llama", "--data", work / "text.jsonl", "--out", tmp_path / "r2", "--max-steps", "1",
                "--report-to", "mlflow")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "dowser: error: --report-to 'mlflow': expected one of none, tensorboard, wandb"]


def test_report_to_wandb_offline_needs_no_network(work, tmp_path):
    pytest.importorskip("wandb")
    import re

    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = run_cli("finetune", "tiny-llama", "--data", work / "text.jsonl", "--out", out, "--max-steps", "3",
                "--lr", "1e-3", "--batch-size", "2", "--report-to", "wandb", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)                       # stdout carries data only
    runs = list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # the run file is a record log of protobufs whose history values are JSON text
    raw = runs[0].read_bytes()
    # each step's value appears in its history record and again in the running summary
    logged = list(dict.fromkeys(float(v) for v in re.findall(rb"train/loss\x82\x01.([-+0-9.e]+)", raw, re.S)))
    curve = [c["loss"] for c in artifacts.read_yaml(out / "run.yaml")["loss_curve"]]
    assert len(logged) >= 3 and all(abs(v - c) < 2e-6 for v, c in zip(logged, curve))   # run.yaml: 6 decimals
    assert b"train/grad_norm" in raw and b"train/tokens_per_s" in raw


def test_mask_built_from_scores_in_process(work, tmp_path):
    cfg = FinetuneConfig(lr=1e-3, max_steps=1, ratio=0.1)
    finetune.run("tiny-llava", work / "train.json", tmp_path / "run", cfg, mask_path=work / "scores.safetensors",
                 image_folder=work / "img")
    a, b = open_mask(tmp_path / "run" / "mask.safetensors"), open_mask(work / "mask0.1.safetensors")
    assert all(torch.equal(a.packed(n), b.packed(n)) for n in b.params)     # same as `dowser mask` gives


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_then_resume_gives_the_identical_delta(work, tmp_path):
    """...and so do DataLoader workers: the cut and resumed legs read their batches through 2 workers,
    the uninterrupted run in its own process."""
    args = ["finetune", "tiny-llava", "--mask", work / "mask0.1.safetensors", "--data", work / "train.json",
            "--image-folder", work / "img", "--max-steps", "100", "--lr", "1e-3", "--weight-decay", "0.1",
            "--batch-size", "2", "--save-every", "5"]
    full = run_cli(*args, "--out", tmp_path / "full", timeout=900)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dowser_cli", *map(str, args), "--out", str(out), "--workers", "2"],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default,
                            env={**os.environ, "DOWSER_QUIET": "1"})
    deadline = time.time() + 300
    while not (out / "checkpoint" / "state.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err and not (out / "delta.safetensors").exists()
    step = artifacts.read_yaml(out / "checkpoint" / "state.yaml")["step"]
    assert 0 < step < 100
    r = run_cli(*args, "--out", out, "--resume", "--workers", "2", timeout=900)
    assert r.returncode == 0, r.stderr
    assert (out / "delta.safetensors").read_bytes() == (tmp_path / "full" / "delta.safetensors").read_bytes()
    def curve(run):  # everything but the wall-clock seconds
        return [{k: v for k, v in x.items() if k != "seconds"} for x in artifacts.read_yaml(run / "run.yaml")["loss_curve"]]
    assert curve(out) == curve(tmp_path / "full") and len(curve(out)) == 100


@pytest.fixture(scope="module")
def interrupted(work, tmp_path_factory):
    """A run interrupted at step 3 of 6 (its checkpoint), made once for the damage cases."""
    from dowser_cli.errors import Interrupted

    out = tmp_path_factory.mktemp("cut") / "run"
    original = finetune.train_step

    def stop_at_3(step, *a, **kw):   # as Ctrl-C between steps does
        if step == 3:
            raise KeyboardInterrupt
        return original(step, *a, **kw)
    finetune.train_step = stop_at_3
    try:
        cfg = FinetuneConfig(lr=1e-3, max_steps=6, batch_size=2, warmup_ratio=0.0)
        with pytest.raises(Interrupted):
            finetune.run("tiny-llava", work / "train.json", out, cfg, mask_path=work / "mask0.1.safetensors",
                         image_folder=work / "img")
    finally:
        finetune.train_step = original
    return out


@pytest.mark.parametrize("damage", ["one-byte", "truncated", "missing"])
def test_a_damaged_checkpoint_is_refused_before_any_training(work, interrupted, tmp_path, damage):
    import shutil

    out = tmp_path / "cut"
    shutil.copytree(interrupted, out)
    state = out / "checkpoint" / "state.safetensors"
    data = bytearray(state.read_bytes())
    if damage == "one-byte":
        data[-7] ^= 0x01
        state.write_bytes(bytes(data))
    elif damage == "truncated":
        state.write_bytes(bytes(data[: len(data) // 2]))
    else:
        state.unlink()
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    r = run_cli("finetune", "tiny-llava", "--mask", work / "mask0.1.safetensors", "--data", work / "train.json",
                "--image-folder", work / "img", "--max-steps", "6", "--batch-size", "2", "--lr", "1e-3",
                "--warmup-ratio", "0", "--out", out, "--resume")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "state.safetensors" in lines[0]
    assert ("is missing" if damage == "missing" else "does not match the sha256") in lines[0]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before   # left as it was
    assert not (out / "delta.safetensors").exists() and not (out / "run.yaml").exists()


@pytest.mark.parametrize("case", ["other-model-mask", "not-json", "missing-image", "empty", "layers-out-of-range",
                                  "resume-nothing", "existing-run"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, tmp_path, case):
    out = tmp_path / "run"
    data, extra = work / "train.json", []
    m = work / "mask0.1.safetensors"
    if case == "other-model-mask":
        probe.run("tiny-llama", tmp_path / "s.safetensors", ProbeConfig(samples=2, batch_size=2, probes=1, seq_len=8))
        mask.run(tmp_path / "s.safetensors", tmp_path / "m.safetensors", MaskConfig())
        m, want = tmp_path / "m.safetensors", "different model"
    elif case == "not-json":
        data = tmp_path / "d.json"
        data.write_text("[{'image': broken")
        want = "not valid JSON"
    elif case == "missing-image":
        data = tmp_path / "d.json"
        data.write_text(json.dumps([{"image": "nope.png", "conversations": conv("<image>\nx", "y")}]))
        want = "record 0: image"
    elif case == "empty":
        data = tmp_path / "d.json"
        data.write_text("[]")
        want = "empty dataset"
    elif case == "layers-out-of-range":
        m, extra, want = None, ["--tune-layers", "last:7"], "has 3 decoder layers"
    elif case == "resume-nothing":
        extra, want = ["--resume"], "no checkpoint"
    else:
        out.mkdir()
        (out / "run.yaml").write_text("kind: dowser.run\n")
        want = "already holds a run"
    args = ["finetune", "tiny-llava", "--data", data, "--image-folder", work / "img", "--out", out, "--max-steps", "1",
            *extra, *(["--mask", m] if m else [])]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    if case != "existing-run":
        assert not out.exists()


# ---- divergence -------------------------------------------------------------------------------------------

def test_a_learning_rate_that_overflows_stops_in_one_line_and_keeps_the_last_good_checkpoint(work, tmp_path):
    args = ["finetune", "tiny-llava", "--data", work / "text.jsonl", "--max-steps", "6", "--batch-size", "4",
            "--lr", "1e30", "--warmup-ratio", "0"]
    out = tmp_path / "run"
    r = run_cli(*args, "--out", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite loss or gradient norm" in lines[0], r.stderr
    assert "no checkpoint was written" in lines[0] and not out.exists()            # nothing half-written
    out = tmp_path / "saved"
    r = run_cli(*args, "--save-every", "1", "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    step = artifacts.read_yaml(out / "checkpoint" / "state.yaml")["step"]
    assert f"the last good checkpoint (step {step}) is kept" in r.stderr
    n = int(r.stderr.split("step ", 2)[1].split("/")[0])
    assert n == step + 1                                                              # the step that diverged
    ckpt = artifacts.read_tensors(out / "checkpoint" / "state.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in ckpt.values() if v.is_floating_point())
    assert not (out / "delta.safetensors").exists() and not (out / "run.yaml").exists()


def _nan_on(monkeypatch, steps):
    """Make the loss NaN on the given (1-based) optimiser steps: one micro-batch per step here."""
    calls = {"n": 0}
    original = training.LossHead.__call__

    def call(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] in steps else loss
    monkeypatch.setattr(training.LossHead, "__call__", call)


def test_skip_step_drops_the_update_counts_it_and_stops_after_too_many_in_a_row(work, tmp_path, monkeypatch):
    from dowser_cli.errors import UserError

    _nan_on(monkeypatch, {2})
    side = _train(work, tmp_path / "skip", nan_policy="skip-step")
    assert side["nonfinite"] == {"policy": "skip-step", "skipped_steps": [2], "count": 1}
    assert side["steps"] == 4 and side["loss_curve"][1].get("skipped") is True
    delta = artifacts.read_tensors(tmp_path / "skip" / "delta.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in delta.values())
    monkeypatch.undo()
    _nan_on(monkeypatch, {2, 3, 4})
    with pytest.raises(UserError, match=r"step 4/4: 3 non-finite steps in a row \(--nan-max-skips 2\)"):
        _train(work, tmp_path / "stop", nan_policy="skip-step", nan_max_skips=2)
    assert not (tmp_path / "stop" / "delta.safetensors").exists()
    monkeypatch.undo()
    _nan_on(monkeypatch, {2})
    with pytest.raises(UserError, match=r"step 2/4: a non-finite loss or gradient norm \(nan\)"):
        _train(work, tmp_path / "default")                                            # stop is the default


# ---- forgetting curves: snapshots and the live drift meter ---------------------------------------------

def test_snapshots_hold_the_model_of_their_step_and_the_last_equals_the_run(work, tmp_path):
    """--snapshot-every 2 over 4 steps with the drift meter every step: the snapshot of step 2, loaded
    on its own, has exactly the drift the meter measured on the live model at step 2 (so it holds the
    model of that step); step 4's delta is the run's own."""
    from dowser_cli import drift
    from dowser_cli.models import load_config, load_model, resolve_source

    run = tmp_path / "run"
    side = _train(work, run, snapshot_every=2, drift_every=1, drift_samples=3, drift_seq_len=10)
    assert side["snapshots"] == [2, 4]
    assert [d["step"] for d in side["drift_curve"]] == [1, 2, 3, 4]
    assert all(d["drift"] > 0 for d in side["drift_curve"])
    final, snap4 = open_run(run), open_run(run, 4)
    a, b = artifacts.read_tensors(final.delta), artifacts.read_tensors(snap4.delta)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    snap2 = open_run(run, 2)
    assert snap2.sidecar["kind"] == "dowser.snapshot" and snap2.sidecar["step"] == 2
    assert snap2.sidecar["drift"] == side["drift_curve"][1]["drift"]
    v2 = artifacts.read_tensors(snap2.delta)
    assert any(not torch.equal(v2[k], a[k]) for k in a)  # training went on after step 2
    src = resolve_source("tiny-llava")
    base = load_model(src, load_config(src), torch.float32, "cpu")
    texts = drift.probe_texts(base, 3, 10, 0, "cpu")
    sums, counts = drift.kl_per_sequence(base, load_run(snap2), texts, 4, "cpu")
    assert sum(sums) / sum(counts) == pytest.approx(snap2.sidecar["drift"], rel=1e-4)
    with pytest.raises(Exception, match="no snapshot at step 3; it has 2, 4"):
        open_run(run, 3)


def test_max_drift_stops_and_keeps_the_last_snapshot_under_the_budget(work, tmp_path):
    """A budget between the drift of step 1 and step 2 (measured by an unbounded run of the same
    settings): the run stops at step 2 and its delta is step 1's snapshot."""
    free = _train(work, tmp_path / "free", drift_every=1, drift_samples=3, drift_seq_len=10, lr=1e-2)
    d1, d2 = (d["drift"] for d in free["drift_curve"][:2])
    assert d2 > d1, free["drift_curve"]
    budget = (d1 + d2) / 2
    run = tmp_path / "run"
    side = _train(work, run, drift_every=1, drift_samples=3, drift_seq_len=10, lr=1e-2, max_drift=budget)
    assert side["max_drift"] == {"budget": budget, "passed_at_step": 2, "kept_step": 1}
    assert side["steps"] == 2 and side["snapshots"] == [0, 1]
    from dowser_cli.evaluate import final_step
    assert final_step(side) == 1                # the report puts the run at the step it kept
    kept = artifacts.read_tensors(open_run(run, 1).delta)
    got = artifacts.read_tensors(open_run(run).delta)
    assert all(torch.equal(kept[k], got[k]) for k in kept)
    r = run_cli("finetune", "tiny-llava", "--data", work / "train.json", "--mask", work / "mask0.1.safetensors",
                "--max-drift", "0.5", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "--max-drift 0.5: needs --drift-every N" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", "tiny-llava", "--data", work / "train.json", "--method", "lora", "--snapshot-every", "2",
                "--out", tmp_path / "bad")
    assert r.returncode == 2 and "--method lora: keeps no snapshots" in r.stderr


def test_a_parameter_no_mask_can_cover_is_refused_not_trained_densely():
    """Qwen3-VL-MoE's experts are 3-D parameters, not linears: the probe does not score them and a mask
    cannot cover them. Tuning the MLP with a mask would have trained them densely beside a "10 %" mask."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from dowser_cli.errors import UserError
    from dowser_cli.models import LoadedModel
    from dowser_cli.models.registry import adapter_for_config, resolve_parts
    from dowser_cli.selection import TARGETS

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                                num_heads=2, out_hidden_size=32, patch_size=14))
    model = Qwen3VLMoeForConditionalGeneration(cfg)
    adapter = adapter_for_config(model.config)
    lm = LoadedModel(None, model, model.config, adapter, resolve_parts(adapter, model), None, None)
    linears = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
               if p.dim() == 2 and lm.parts.layers_path in n and any(rx.search(n) for rx in TARGETS.values())}
    experts = [n for n, p in model.named_parameters() if p.dim() == 3 and lm.parts.layers_path in n]
    assert experts                                  # the model under test has them
    mlp = {n: m for n, m in linears.items() if TARGETS["mlp"].search(n)}     # the router, a linear
    with pytest.raises(UserError, match="3-D parameter .* a mask cannot cover .*--targets attn"):
        training.select_trainable(lm, FinetuneConfig(targets="mlp"), [0, 1], mlp)
    attn = {n: m for n, m in linears.items() if TARGETS["attn"].search(n)}
    tr = training.select_trainable(lm, FinetuneConfig(targets="attn"), [0, 1], attn)
    assert not set(experts) & set(tr.params) and set(attn) <= set(tr.params)
    full = training.select_trainable(lm, FinetuneConfig(targets="mlp"), [0, 1], {})   # Full-FT: dense, counted
    assert set(experts) <= set(full.params)
    assert full.counts()["trainable_entries"] == sum(p.numel() for p in full.params.values())


@pytest.mark.slow   # 60 s; test_optim's fp32-accumulation test and the 2-rank bf16 DDP test run by default
def test_bf16_end_to_end_from_the_cli_keeps_frozen_entries_bit_identical(work, tmp_path):
    """probe -> mask -> finetune (grad_accum 4, weight decay 0.1, norms trained densely) -> export ->
    eval-forgetting, all in bf16 on the CPU."""
    from dowser_cli.models import load_config, load_model, resolve_source

    bf = ["--dtype", "bfloat16"]
    steps = [("probe", "tiny-llava", *bf, "--samples", "4", "--batch-size", "2", "--probes", "2", "--seq-len", "12",
              "--out", tmp_path / "s.safetensors"),
             ("mask", tmp_path / "s.safetensors", "--ratio", "0.1", "--out", tmp_path / "m.safetensors"),
             ("finetune", "tiny-llava", *bf, "--mask", tmp_path / "m.safetensors", "--data", work / "train.json",
              "--image-folder", work / "img", "--batch-size", "2", "--grad-accum", "4", "--weight-decay", "0.1",
              "--lr", "1e-3", "--warmup-ratio", "0", "--max-steps", "2", "--out", tmp_path / "run"),
             ("export", tmp_path / "run", "--out", tmp_path / "exp"),
             ("eval-forgetting", "--base", "tiny-llava", tmp_path / "run", *bf, "--tasks", tmp_path / "suite.yaml",
              "--batch-size", "4", "--out", tmp_path / "rep")]
    facts = ROOT / "dowser_cli" / "configs" / "tasks" / "data" / "facts.jsonl"
    (tmp_path / "suite.yaml").write_text(f"""tasks:
  - {{name: digits, role: downstream, kind: vqa, metric: exact_match, data: "builtin:digits/test.jsonl", limit: 4,
     max_new_tokens: 2}}
  - {{name: facts, role: upstream, kind: likelihood, metric: choice_likelihood, data: {facts}, limit: 4,
     answer_template: "The answer is {{answer}}."}}
  - {{name: drift, role: upstream, kind: drift, samples: 2, seq_len: 12}}
""")
    for args in steps[:4]:
        r = run_cli(*args)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
    side = artifacts.read_yaml(tmp_path / "run" / "run.yaml")
    assert side["model"]["dtype"] == "bfloat16" and side["trainable"]["params"] > side["trainable"]["masked_params"]
    run = open_run(tmp_path / "run")
    src = resolve_source("tiny-llava")
    base = dict(load_model(src, load_config(src), torch.bfloat16, "cpu", tokenizer=False).model.named_parameters())
    tuned = dict(load_run(run).model.named_parameters())
    mf = open_mask(tmp_path / "m.safetensors")
    moved = 0
    for n, p0 in base.items():
        p1 = tuned[n]
        assert p1.dtype == torch.bfloat16
        if n in mf.params:
            m = mf.dense(n)
            assert torch.equal(p1[~m], p0[~m]), n                 # frozen entries bit-identical
            moved += int(not torch.equal(p1[m], p0[m]))
        elif n not in run.params:
            assert torch.equal(p1, p0), n
    assert moved == len(mf.params)
    exported = load_model(resolve_source(str(tmp_path / "exp")), load_config(resolve_source(str(tmp_path / "exp"))),
                          torch.bfloat16, "cpu", tokenizer=False).model
    assert all(torch.equal(p, tuned[n]) for n, p in exported.named_parameters())
    r = run_cli(*steps[4], timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = artifacts.read_yaml(tmp_path / "rep" / "report.yaml")
    assert rep["config"]["dtype"] == "bfloat16" and [x["model"] for x in rep["rows"]] == ["base (tiny-llava)", "run"]
