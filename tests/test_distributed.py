"""2 processes on this CPU with gloo, launched like users launch them (torchrun): DDP / FSDP2 masked
fine-tuning equals one process with the same global batch, frozen entries stay bit-identical, an
interrupted run resumes to the same bytes, and a distributed probe equals the single-process one."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dowser_cli import artifacts, finetune, mask, probe
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import open_run
from dowser_cli.models.runs import load_run
from dowser_cli.finetune import FinetuneConfig
from dowser_cli.masking import MaskConfig
from dowser_cli.probing import ProbeConfig

from conftest import ROOT, conv, run_cli

# faulthandler: a rank that dies of a signal prints where it was
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DOWSER_QUIET": "1", "PYTHONFAULTHANDLER": "1"}


def torchrun(*args, nproc: int = 2, timeout: int = 300, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dowser_cli", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def said(text: str) -> str:
    """What the ranks printed (faulthandler's stacks included), without the launcher's own report of
    the failure, which would fill an assertion message; plus the launcher's root-cause lines."""
    lines = text.splitlines()
    cut = next((i for i, line in enumerate(lines) if "torch/distributed/elastic" in line), len(lines))
    root = text[text.find("Root Cause"):][:500] if "Root Cause" in text else ""
    return "\n".join(lines[:cut])[-2500:] + "\n" + root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """tiny-llava scores and a rho 0.1 mask; 9 image records, so that with 2 ranks x batch 2 x accum 2
    the second step's only micro-batch has one example and rank 1 has none."""
    from PIL import Image

    d = tmp_path_factory.mktemp("dist")
    probe.run("tiny-llava", d / "scores.safetensors", ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    mask.run(d / "scores.safetensors", d / "mask.safetensors", MaskConfig(ratio=0.1))
    (d / "img").mkdir()
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(9):
        px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(d / "img" / f"{i}.png")
        # answers of different lengths: the global token count, not a per-rank mean, must weigh them
        answer = str(i) * (1 + i % 4)
        recs.append({"image": f"{i}.png", "conversations": conv("<image>\nWhat digit is shown?", answer)})
    (d / "train.json").write_text(json.dumps(recs))
    return d


# small max_grad_norm: clipping is active every step, so a per-rank (not global) norm would show
TRAIN = dict(lr=1e-3, weight_decay=0.1, warmup_ratio=0.0, max_grad_norm=0.01, grad_accum=2, max_steps=3)


def _args(work, out, **kw):
    opts = {**TRAIN, **kw}
    flat = [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", v)]
    return ["finetune", "tiny-llava", "--mask", work / "mask.safetensors", "--data", work / "train.json",
            "--image-folder", work / "img", "--out", out, *flat]


@pytest.fixture(scope="module")
def single(work, tmp_path_factory):
    """One process, batch 4 = the 2-rank runs' global micro-batch."""
    out = tmp_path_factory.mktemp("single") / "run"
    finetune.run("tiny-llava", work / "train.json", out, FinetuneConfig(batch_size=4, **TRAIN),
                 mask_path=work / "mask.safetensors", image_folder=work / "img")
    return out


@pytest.fixture(scope="module")
def single_bf16(work, tmp_path_factory):
    """One bf16 process whose micro-batches are the 2-rank runs' per-rank ones (2 examples, 4 per step
    instead of 2 ranks x 2): the same forward in bf16, so only the fp32 sums' order differs."""
    out = tmp_path_factory.mktemp("single-bf16") / "run"
    finetune.run("tiny-llava", work / "train.json", out,
                 FinetuneConfig(**{**TRAIN, "batch_size": 2, "grad_accum": 4, "dtype": "bfloat16"}),
                 mask_path=work / "mask.safetensors", image_folder=work / "img")
    return out


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_bf16_ranks_match_one_bf16_process(work, single_bf16, tmp_path, strategy):
    """In bf16 the ranks' gradients are summed over micro-batches and ranks in fp32 (and the masters are
    fp32): against one process that runs the same bf16 micro-batches, only the order of fp32 additions
    differs. Stated tolerance (DDP): losses within 1e-6; every trained value within one bf16 ulp, 99 %
    of them bit-equal; frozen entries exact. (Reduced in bf16, as DDP's buckets did, the sums round to
    8 bits and Adam's first steps, about lr x sign(g), turn that into other values.) FSDP: losses
    within 1e-3, values within an ulp plus 2 lr per step, half of them bit-equal, frozen entries exact."""
    out = tmp_path / "run"
    r = torchrun(*_args(work, out, batch_size=2, strategy=strategy, dtype="bfloat16"))
    assert r.returncode == 0, said(r.stderr)
    s1, s2 = artifacts.read_yaml(single_bf16 / "run.yaml"), artifacts.read_yaml(out / "run.yaml")
    # FSDP2's own bf16 forward differs from a plain one by ~1e-4 of the loss before any update (seen
    # with and without its MixedPrecisionPolicy); the stricter checks below are DDP's
    strict = strategy == "ddp"
    for x, y in zip(s1["loss_curve"], s2["loss_curve"], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6 if strict else 1e-3) and y["tokens"] == x["tokens"]
    a = artifacts.read_tensors(single_bf16 / "delta.safetensors")
    b = artifacts.read_tensors(out / "delta.safetensors")
    assert a.keys() == b.keys() and all(t.dtype == torch.bfloat16 for t in b.values())
    base = {n: p.to(torch.bfloat16) for n, p in _base().named_parameters()}
    mf = open_mask(out / "mask.safetensors")
    equal = total = 0
    for name in a:
        x, y = a[name].float(), b[name].float()
        ulp = torch.ldexp(torch.ones_like(x), torch.frexp(torch.maximum(x.abs(), y.abs())).exponent - 8)
        slack = 0 if strict else 2 * TRAIN["lr"] * TRAIN["max_steps"]   # Adam's steps of ~lr x sign(g)
        assert ((x - y).abs() <= ulp + slack).all(), name
        equal, total = equal + int((x == y).sum()), total + x.numel()
        if name in mf.params:
            assert not torch.equal(b[name], base[name][mf.dense(name)]), name        # it trained
    assert equal >= (0.99 if strict else 0.5) * total, (equal, total)
    tuned = dict(load_run(open_run(out)).model.named_parameters())
    for name in mf.params:
        m = mf.dense(name)
        assert torch.equal(tuned[name][~m], base[name][~m]), name


def test_gradient_checkpointing_recomputes_each_layer_and_changes_no_number(work, single, tmp_path, monkeypatch):
    """One process: with --gradient-checkpointing every decoder layer's MLP runs twice per micro-batch
    (once more when backward recomputes the layer), and the run's delta is the run's without it."""
    from transformers.models.llama import modeling_llama

    calls = []
    forward = modeling_llama.LlamaMLP.forward      # inside the checkpointed layer's forward

    def counted(self, *args, **kw):
        calls.append(1)
        return forward(self, *args, **kw)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    finetune.run("tiny-llava", work / "train.json", tmp_path / "gc",
                 FinetuneConfig(batch_size=4, gradient_checkpointing=True, **TRAIN),
                 mask_path=work / "mask.safetensors", image_folder=work / "img")
    micro, layers = 5, 3      # 9 records, batch 4, accum 2: steps of 2, 1 (the epoch's last record), 2
    assert len(calls) == 2 * layers * micro
    a = artifacts.read_tensors(single / "delta.safetensors")
    b = artifacts.read_tensors(tmp_path / "gc" / "delta.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def _base():
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    return load_model(src, load_config(src), torch.float32, "cpu", tokenizer=False).model


@pytest.mark.parametrize("strategy", ["ddp", "ddp+checkpointing", "fsdp", "fsdp+checkpointing"])
def test_two_ranks_give_the_single_process_delta_and_keep_frozen_entries(work, single, tmp_path, strategy):
    out = tmp_path / "run"
    # activation checkpointing re-runs each layer's forward (and FSDP's all-gather) in backward
    extra = ["--gradient-checkpointing"] if strategy.endswith("+checkpointing") else []
    strategy = strategy.split("+")[0]
    r = torchrun(*_args(work, out, batch_size=2, strategy=strategy), *extra)
    assert r.returncode == 0, said(r.stderr)
    assert r.stdout.strip() == str(out)                                   # rank 0 speaks for both
    a = artifacts.read_tensors(single / "delta.safetensors")
    b = artifacts.read_tensors(out / "delta.safetensors")
    assert a.keys() == b.keys() and len(a) == 27
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    base = _base()
    mf = open_mask(out / "mask.safetensors")
    assert all(not torch.allclose(b[n], base.get_parameter(n).detach()[mf.dense(n)]) for n in mf.params)  # trained
    tuned = dict(load_run(open_run(out)).model.named_parameters())
    for name, p0 in base.named_parameters():
        p1 = tuned[name].detach()
        if name in mf.params:
            m = mf.dense(name)
            assert torch.equal(p1[~m], p0.detach()[~m]), name            # frozen entries bit-identical
        elif name not in a:
            assert torch.equal(p1, p0.detach()), name
    s1, s2 = artifacts.read_yaml(single / "run.yaml"), artifacts.read_yaml(out / "run.yaml")
    for x, y in zip(s1["loss_curve"], s2["loss_curve"], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["tokens"] == x["tokens"]
    assert s2["trainable"] == s1["trainable"]
    d = s2["distributed"]
    assert d["world_size"] == 2 and d["strategy"] == strategy and d["global_step_examples"] == 8
    ranks = d["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1] and all(x["peak_memory"]["host_rss_mb"] > 0 for x in ranks)
    state = s1["optimizer"]["state_bytes"]
    if strategy == "ddp":  # every rank holds all of it
        assert all(x["optimizer_state_bytes"] == state for x in ranks)
    else:                  # the shards add up to the single-process state, each rank about half
        assert sum(x["optimizer_state_bytes"] for x in ranks) == state == s2["optimizer"]["state_bytes"]
        assert all(0.3 * state < x["optimizer_state_bytes"] < 0.7 * state for x in ranks)
        params = sum(q.numel() * 4 for q in base.parameters())
        assert all(x["param_bytes"] < 0.6 * params for x in ranks)


@pytest.mark.slow   # 35 s; tests/test_finetune.py's single-process interrupt-and-resume runs by default
def test_interrupted_two_rank_run_resumes_to_the_same_bytes(work, tmp_path):
    args = dict(batch_size=2, strategy="fsdp", max_steps=60, save_every=3)
    full = torchrun(*_args(work, tmp_path / "full", **args))
    assert full.returncode == 0, said(full.stderr)
    out = tmp_path / "cut"
    proc = torchrun(*_args(work, out, **args), popen=True)
    deadline = time.time() + 240
    while not (out / "checkpoint" / "state.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)        # to the launcher, which passes it on to both ranks
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "--resume" in err, said(err)
    assert not (out / "delta.safetensors").exists()
    step = artifacts.read_yaml(out / "checkpoint" / "state.yaml")["step"]
    assert 0 < step < 60
    other = tmp_path / "cut-ddp"
    shutil.copytree(out, other)
    r = torchrun(*_args(work, out, **args), "--resume")
    assert r.returncode == 0, said(r.stderr)
    assert (out / "delta.safetensors").read_bytes() == (tmp_path / "full" / "delta.safetensors").read_bytes()
    def curve(run):  # everything but the wall-clock seconds
        return [{k: v for k, v in x.items() if k != "seconds"} for x in artifacts.read_yaml(run / "run.yaml")["loss_curve"]]
    want = curve(tmp_path / "full")
    assert curve(out) == want and len(want) == 60
    # the checkpoint is in the single-process layout: the same global batch resumes it under DDP too
    r = torchrun(*_args(work, other, **{**args, "strategy": "ddp"}), "--resume")
    assert r.returncode == 0, said(r.stderr)
    a = artifacts.read_tensors(tmp_path / "full" / "delta.safetensors")
    b = artifacts.read_tensors(other / "delta.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, want", [(["--strategy", "fsdp"], "needs several processes"),
                                         (["--strategy", "zero3"], "expected one of ddp, fsdp")])
def test_bad_strategy_is_one_line_exit_2(work, tmp_path, extra, want):
    r = run_cli(*_args(work, tmp_path / "run", batch_size=2), *extra)
    assert r.returncode == 2 and want in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_two_rank_probe_equals_the_single_process_probe(tmp_path):
    # 5 batches over 2 ranks (rank 0 takes 0, 2, 4; rank 1 takes 1, 3), noise images on
    args = ["probe", "tiny-llava", "--samples", "10", "--batch-size", "2", "--probes", "3", "--seq-len", "12",
            "--images", "noise"]
    one = run_cli(*args, "--out", tmp_path / "one.safetensors", env=ENV)
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two.safetensors")
    assert two.returncode == 0, said(two.stderr)
    assert two.stdout.strip() == str(tmp_path / "two.safetensors")
    a = artifacts.read_tensors(tmp_path / "one.safetensors")
    b = artifacts.read_tensors(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:  # every row is computed by one rank from the same seeds and summed with zeros: exact
        assert a[k].shape[0] == (5 if k.endswith(".act_sq") else 15) and torch.equal(a[k], b[k]), k
        assert a[k].abs().sum(1).min() > 0, k                             # no row left empty
    side = artifacts.read_yaml(tmp_path / "two.yaml")
    assert side["distributed"]["world_size"] == 2 and [r["rank"] for r in side["distributed"]["ranks"]] == [0, 1]
    assert not artifacts.partial_path(tmp_path / "two.safetensors").exists()


def test_device_map_probe_equals_the_plain_probe_and_bad_maps_are_refused(tmp_path):
    # On this CPU-only machine accelerate places everything on the host: this checks the plumbing
    # (placement, input device, per-module hook buffers), not a split over several GPUs.
    args = ["probe", "tiny-llama", "--samples", "4", "--batch-size", "2", "--probes", "2", "--seq-len", "10"]
    plain = run_cli(*args, "--out", tmp_path / "plain.safetensors", env=ENV)
    mapped = run_cli(*args, "--device-map", "auto", "--out", tmp_path / "mapped.safetensors", env=ENV)
    assert plain.returncode == 0 and mapped.returncode == 0, plain.stderr + mapped.stderr
    a = artifacts.read_tensors(tmp_path / "plain.safetensors")
    b = artifacts.read_tensors(tmp_path / "mapped.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert artifacts.read_yaml(tmp_path / "mapped.yaml")["model"]["device_map"] == {"cpu": 1}
    bad = run_cli(*args, "--device-map", "everywhere", "--out", tmp_path / "bad.safetensors", env=ENV)
    assert bad.returncode == 2 and "--device-map 'everywhere'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    two = torchrun(*args, "--device-map", "auto", "--out", tmp_path / "two.safetensors")
    assert two.returncode != 0 and "without torchrun" in two.stderr and not (tmp_path / "two.safetensors").exists()


@pytest.mark.slow
def test_interrupted_two_rank_probe_resumes_to_the_single_process_scores(tmp_path):
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("probe:\n  checkpoint_every: 2\n")                 # a partial every 2 batches
    args = ["probe", "tiny-llava", "--samples", "160", "--batch-size", "1", "--probes", "1", "--seq-len", "12",
            "--config", cfg]
    one = run_cli(*args, "--out", tmp_path / "one.safetensors", env=ENV)
    assert one.returncode == 0, one.stderr
    out = tmp_path / "two.safetensors"
    partial = artifacts.partial_path(out)
    proc = torchrun(*args, "--out", out, popen=True)
    deadline = time.time() + 240
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "--resume" in err, said(err)
    assert not out.exists()
    done = int(artifacts.read_header(partial)["batches_done"])
    assert 0 < done < 160 and done % 2 == 0
    r = torchrun(*args, "--out", out, "--resume")
    assert r.returncode == 0, said(r.stderr)
    a, b = artifacts.read_tensors(tmp_path / "one.safetensors"), artifacts.read_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_methods_with_per_step_state_refuse_to_run_under_a_launcher(work, tmp_path):
    args = ["finetune", "tiny-llava", "--method", "spider", "--data", work / "train.json", "--image-folder",
            work / "img", "--out", tmp_path / "run", "--batch-size", "2", "--max-steps", "1"]
    r = torchrun(*args)
    assert r.returncode != 0 and "--method spider: runs in one process only" in r.stderr, said(r.stderr)
    # (the ranks print the one line; the traceback after it is torchrun's own report of a failed rank)
    assert not (tmp_path / "run" / "run.yaml").exists()
