"""The fine-tuning methods registry (dowser_cli/methods/): full-ft, masked, SPIDER and LoRA through the
same loop, on tiny models."""
import json

import pytest
import torch

from dowser_cli import artifacts, finetune
from dowser_cli import probing
from dowser_cli.artifacts.runs import open_run
from dowser_cli.models.runs import load_run
from dowser_cli.finetune import FinetuneConfig
from dowser_cli.methods import FINETUNE_METHODS

from conftest import run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    recs = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": str(2 * i)}]} for i in range(12)]
    (d / "t.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    return d / "t.jsonl"


def _run(data, out, method, **kw):
    cfg = FinetuneConfig(**{"method": method, "lr": 1e-3, "max_steps": 3, "batch_size": 4, "warmup_ratio": 0.0, **kw})
    return finetune.run("tiny-llava", data, out, cfg)


def _base():
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    return dict(load_model(src, load_config(src), torch.float32, "cpu", tokenizer=False).model.named_parameters())


def test_registry_has_the_papers_training_time_methods():
    import dowser_cli.methods.finetuning  # noqa: F401  (registers them)

    assert {"full-ft", "masked", "spider", "lora", "osf", "supertuning"} <= set(FINETUNE_METHODS.names())


def test_named_full_ft_is_the_default_without_a_mask(data, tmp_path):
    a = _run(data, tmp_path / "named", "full-ft")
    b = _run(data, tmp_path / "default", "")
    assert a["method"] == b["method"] == "full-ft" and b["config"]["method"] == "full-ft"
    assert (tmp_path / "named" / "delta.safetensors").read_bytes() == \
        (tmp_path / "default" / "delta.safetensors").read_bytes()


def test_spider_returns_low_importance_updates_to_theta0_and_reports_its_state(data, tmp_path):
    side = _run(data, tmp_path / "spider", "spider")
    full = _run(data, tmp_path / "full", "full-ft")
    base = _base()
    tuned = artifacts.read_tensors(tmp_path / "spider" / "delta.safetensors")
    dense = artifacts.read_tensors(tmp_path / "full" / "delta.safetensors")
    assert side["method"] == "spider" and set(tuned) == set(dense)
    numel = sum(v.numel() for v in tuned.values())
    # theta_0 (fp32 model: 4 bytes) and the accumulated gradient (fp32) per tuned entry
    assert side["optimizer"]["method_state_bytes"] == numel * (4 + 4)
    assert side["optimizer"]["state_bytes"] == full["optimizer"]["state_bytes"]
    for name, v in tuned.items():
        if v.dim() != 2:
            continue
        kept = v == base[name].detach()
        # every step returns the entries whose pretrained importance dominates exactly to theta_0
        assert 0.05 < kept.float().mean() < 0.95, name
        assert not torch.equal(v, dense[name])
    # SPIDER moves the model less than Full-FT with the same data, steps and optimiser
    d_spider = sum(float((v - base[n].detach()).norm() ** 2) for n, v in tuned.items())
    d_full = sum(float((v - base[n].detach()).norm() ** 2) for n, v in dense.items())
    assert d_spider < d_full


def test_spider_blends_every_trained_tensor_with_the_clipped_gradient_sum(data, tmp_path, monkeypatch):
    """Each step's blend, recomputed from the published formula: for every trained tensor (the
    projector included), theta <- theta_0 (1 - c) + theta c with c from theta_0 and the running sum of
    the CLIPPED gradients (a tiny --max-grad-norm makes the clipping visible: the sum's global norm
    after step 1 is exactly the clip)."""
    import sys
    from pathlib import Path

    from dowser_cli import scoring
    sys.path.insert(0, str(Path(__file__).parent))
    from test_scoring import _spider_reference

    calls, original = [], scoring.spider_blend_

    def spy(theta, theta0, grad_sum):
        before = theta.detach().clone()
        c = original(theta, theta0, grad_sum)
        calls.append((before, theta0.clone(), grad_sum.clone(), theta.detach().clone()))
        return c
    monkeypatch.setattr(scoring, "spider_blend_", spy)
    side = _run(data, tmp_path / "spider", "spider", max_steps=2, max_grad_norm=1e-3, train_projector=True)
    n_params = side["trainable"]["params"]
    assert len(calls) == 2 * n_params                                   # every trained tensor, every step
    first = calls[:n_params]
    norm = sum(float(g.double().pow(2).sum()) for _, _, g, _ in first) ** 0.5
    assert norm == pytest.approx(1e-3, rel=1e-4)                         # accumulated after clipping
    for before, theta0, grads, after in calls:
        _, want = _spider_reference(theta0, grads, before)
        torch.testing.assert_close(after.double(), want, rtol=1e-5, atol=1e-7)
    delta = artifacts.read_tensors(tmp_path / "spider" / "delta.safetensors")
    assert len(delta) == n_params and any("projector" in n for n in delta)     # the projector is blended too


def test_spider_from_the_cli(data, tmp_path):
    r = run_cli("finetune", "tiny-llava", "--method", "spider", "--data", data, "--max-steps", "2", "--batch-size", "4",
                "--lr", "1e-3", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(tmp_path / "run" / "run.yaml")
    assert side["method"] == "spider"
    assert "I_ft / (I_pre + I_ft)" in side["method_details"]["coefficient"]


def test_lora_trains_adapters_and_merges_them_into_the_delta_and_an_export(data, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "lora"
    side = _run(data, out, "lora", lora_r=4, lora_alpha=8.0)
    base = _base()
    delta = artifacts.read_tensors(out / "delta.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert side["method"] == "lora" and side["method_details"]["target_linears"] == 21      # 3 layers x 7
    n_adapter = sum(v.numel() for v in adapter.values())
    assert side["trainable"]["numel"] == n_adapter == side["method_details"]["adapter_params"]
    assert side["optimizer"]["state_bytes"] == 2 * 4 * n_adapter    # dense fp32 moments of the adapters only
    assert len(delta) == 21 and all(v.dim() == 2 for v in delta.values())
    for name, w in delta.items():                                   # W + alpha/r * B A, brute force
        stem = name.removesuffix(".weight")
        a = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_A.weight"))
        b = next(v for k, v in adapter.items() if k.endswith(f"{stem}.lora_B.weight"))
        torch.testing.assert_close(w, base[name].detach() + (8.0 / 4) * b @ a, rtol=1e-5, atol=1e-6)
        assert not torch.equal(w, base[name].detach())
    ours = load_run(open_run(out)).model
    assert all(torch.equal(p, base[n]) for n, p in ours.named_parameters() if "norm" in n)  # norms frozen
    r = run_cli("export", out, "--out", tmp_path / "exp")
    assert r.returncode == 0, r.stderr
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)


def test_supertuning_trains_the_largest_magnitude_entries_through_peft(data, tmp_path):
    out = tmp_path / "st"
    side = _run(data, out, "supertuning", ratio=0.25)
    base = _base()
    delta = artifacts.read_tensors(out / "delta.safetensors")
    assert side["method"] == "supertuning" and side["method_details"]["peft_tuner"] == "SupertuningConfig"
    assert len(delta) == 21
    for name, w in delta.items():
        b = base[name].detach()
        moved = w != b
        k = round(0.25 * b.numel())
        assert 0 < int(moved.sum()) <= k + 1, name
        # every entry that moved is among the k largest |W| (PEFT's magnitude top-k support)
        thresh = b.abs().flatten().kthvalue(b.numel() - k).values
        assert bool((b.abs()[moved] >= thresh).all()), name


def test_osf_keeps_the_top_singular_subspace_and_merges(data, tmp_path):
    out = tmp_path / "osf"
    side = _run(data, out, "osf", osf_effective_rank=0.5)
    base = _base()
    delta = artifacts.read_tensors(out / "delta.safetensors")
    assert side["method"] == "osf" and side["method_details"]["effective_rank"] == 0.5 and len(delta) == 21
    name = next(n for n in delta if n.endswith("q_proj.weight"))
    w0, w1 = base[name].detach().double(), delta[name].double()
    u, sv, vh = torch.linalg.svd(w0)
    r = min(w0.shape) // 2
    change = w1 - w0
    assert float(change.norm()) > 0
    # OSF's update lives in the low (trainable) subspace: nothing of it along the frozen top directions
    top = u[:, :r].T @ change @ vh[:r].T
    assert float(top.norm()) < 1e-3 * float(change.norm()) + 1e-9


def test_targets_attn_trains_only_the_attention_linears(data, tmp_path):
    out = tmp_path / "attn"
    side = _run(data, out, "full-ft", targets="attn", freeze_norms=True)
    delta = artifacts.read_tensors(out / "delta.safetensors")
    assert side["config"]["targets"] == "attn"
    assert delta and all(any(f".self_attn.{k}_proj." in n for k in "qkvo") for n in delta), sorted(delta)
    base = _base()
    ours = load_run(open_run(out)).model
    for n, p in ours.named_parameters():
        if ".mlp." in n or "norm" in n:
            assert torch.equal(p, base[n]), n


def test_a_mask_over_the_attention_alone_trains_with_targets_attn(data, tmp_path):
    from dowser_cli import mask as mask_mod
    from dowser_cli import probe

    scores = tmp_path / "s.safetensors"
    probe.run("tiny-llava", scores, probing.ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    m = tmp_path / "attn-mask.safetensors"
    mask_mod.run(scores, m, mask_mod.MaskConfig(ratio=0.2, targets="attn"))
    r = run_cli("finetune", "tiny-llava", "--data", data, "--out", tmp_path / "refused", "--mask", m, "--max-steps", "1")
    assert r.returncode == 2 and "is tuned but the mask does not cover it" in r.stderr, r.stderr
    side = finetune.run("tiny-llava", data, tmp_path / "masked",
                        FinetuneConfig(lr=1e-3, max_steps=2, batch_size=4, targets="attn"), mask_path=m)
    assert side["method"] == "dowser-mask"
    delta = artifacts.read_tensors(tmp_path / "masked" / "delta.safetensors")
    assert not any(".mlp." in n for n in delta)


@pytest.mark.parametrize("args,want", [
    (["--method", "dare"], "unknown fine-tuning method; available: full-ft, masked, replay, spider, lora, osf, supertuning"),
    (["--targets", "attn,conv"], "--targets 'attn,conv': unknown target(s) conv; available: attn, mlp"),
    (["--method", "osf", "--osf-effective-rank", "2.5"], "--osf-effective-rank 2.5: a fraction in (0, 1)"),
    (["--method", "spider", "--mask", "m.safetensors"], "--method spider: takes no --mask"),
    (["--method", "masked"], "--method masked: needs --mask"),
    (["--method", "lora", "--lora-r", "0"], "--lora-r 0: must be >= 1"),
    (["--method", "replay", "--replay-loss", "mse"], "--replay-loss 'mse': expected one of lm, kl"),
    (["--workers", "-1"], "--workers -1: must be >= 0 (0: the main process prepares the batches)"),
])
def test_method_errors_are_one_line(data, tmp_path, args, want):
    r = run_cli("finetune", "tiny-llava", "--data", data, "--out", tmp_path / "run", *args)
    assert r.returncode == 2 and want in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["spider", "lora", "replay"])
def test_interrupted_run_resumes_to_the_identical_delta(data, tmp_path, monkeypatch, method):
    from dowser_cli.errors import Interrupted

    _run(data, tmp_path / "whole", method, max_steps=4)
    original = finetune.train_step

    def stop_before_step_2(step, *a, **kw):   # as Ctrl-C between steps does
        if step == 2:
            raise KeyboardInterrupt
        return original(step, *a, **kw)

    monkeypatch.setattr(finetune, "train_step", stop_before_step_2)
    with pytest.raises(Interrupted):
        _run(data, tmp_path / "cut", method, max_steps=4)
    ckpt = artifacts.read_tensors(tmp_path / "cut" / "checkpoint" / "state.safetensors")
    assert any(k.startswith("method/spider_grad_sum/") for k in ckpt) == (method == "spider")
    monkeypatch.setattr(finetune, "train_step", original)
    cfg = FinetuneConfig(method=method, lr=1e-3, max_steps=4, batch_size=4, warmup_ratio=0.0)
    finetune.run("tiny-llava", data, tmp_path / "cut", cfg, resume=True)
    assert (tmp_path / "cut" / "delta.safetensors").read_bytes() == \
        (tmp_path / "whole" / "delta.safetensors").read_bytes()


# ---- data-free replay -----------------------------------------------------------------------------------

def test_replay_loss_against_brute_force(tiny_models):
    """lm: the mean next-token cross-entropy over the real tokens; kl: the mean over real positions of
    sum_v p_base (log p_base - log p_model), each position computed on its own."""
    from dowser_cli.methods.finetuning import replay_loss

    lm = tiny_models("tiny-llava")
    ids = torch.tensor([[1, 40, 50, 60, 70], [1, 41, 51, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        got = float(replay_loss(lm, ids, mask, None))
        terms = []
        for b in range(2):
            n = int(mask[b].sum())
            logits = lm.model(input_ids=ids[b:b + 1, :n]).logits[0].double()
            terms += [-float(torch.log_softmax(logits[t], -1)[ids[b, t + 1]]) for t in range(n - 1)]
        assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5)
        base_lp = torch.log_softmax(torch.randn(2, 5, lm.model.config.text_config.vocab_size,
                                                generator=torch.Generator().manual_seed(0)), -1)
        got = float(replay_loss(lm, ids, mask, base_lp))
        kls = []
        for b in range(2):
            n = int(mask[b].sum())
            lq = torch.log_softmax(lm.model(input_ids=ids[b:b + 1, :n]).logits[0].double(), -1)
            kls += [float((base_lp[b, t].double().exp() * (base_lp[b, t].double() - lq[t])).sum()) for t in range(n)]
        assert got == pytest.approx(sum(kls) / len(kls), rel=1e-4)


@pytest.mark.parametrize("loss", ["lm", "kl"])
def test_replay_adds_its_weighted_gradient_to_the_step(loss):
    """extra_backward's gradients scale with --replay-weight (weight 2 = twice weight 1), and depend on
    the step (another draw of replay texts). The pool (and kl's base distributions) come from the base;
    the weights are then moved off it."""
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    grads = {}
    for w, step in ((1.0, 0), (2.0, 0), (1.0, 5)):
        lm = load_model(src, load_config(src), torch.float32, "cpu")
        run = FINETUNE_METHODS.get("replay", "--method").make(
            lm, FinetuneConfig(method="replay", replay_weight=w, replay_loss=loss, replay_samples=6, replay_seq_len=10,
                               batch_size=4, tune_layers="all"))
        tr = run.trainable(list(range(lm.parts.num_layers)), {})
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():   # away from the base (where KL and its gradient are 0), the same way each time
            for p in tr.params.values():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
                p.grad = None
        run.extra_backward(step, "cpu", torch.float32)
        assert run.step_metrics()["replay_loss"] >= 0
        grads[(w, step)] = {n: p.grad.clone() for n, p in tr.params.items() if p.grad is not None}
    a, b, c = grads[(1.0, 0)], grads[(2.0, 0)], grads[(1.0, 5)]
    assert a and all(torch.allclose(2 * a[n], b[n], atol=1e-7) for n in a)
    assert any(not torch.allclose(a[n], c[n]) for n in a)


def test_replay_weight_zero_is_the_plain_run_and_replay_with_a_mask_keeps_frozen_entries(data, tmp_path):
    from dowser_cli import mask as mask_mod
    from dowser_cli import probe

    plain = _run(data, tmp_path / "plain", "full-ft")
    zero = _run(data, tmp_path / "zero", "replay", replay_weight=0.0, replay_samples=4, replay_seq_len=10)
    one = _run(data, tmp_path / "one", "replay", replay_samples=4, replay_seq_len=10)
    a, z, o = (artifacts.read_tensors(tmp_path / n / "delta.safetensors") for n in ("plain", "zero", "one"))
    assert all(torch.equal(a[k], z[k]) for k in a)              # no weight, no change
    assert any(not torch.equal(a[k], o[k]) for k in a)          # the replay loss moves the weights
    assert [x["loss"] for x in zero["loss_curve"]] == [x["loss"] for x in plain["loss_curve"]]
    assert all(x["replay_loss"] > 0 for x in one["loss_curve"]) and one["method"] == "replay"
    assert one["method_details"]["per_step"] == 1 and (tmp_path / "one" / "replay.safetensors").is_file()
    scores = tmp_path / "s.safetensors"
    probe.run("tiny-llava", scores, probing.ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    m = tmp_path / "m.safetensors"
    mask_mod.run(scores, m, mask_mod.MaskConfig(ratio=0.2))
    r = run_cli("finetune", "tiny-llava", "--data", data, "--out", tmp_path / "mr", "--mask", m, "--method", "replay",
                "--replay-samples", "4", "--replay-seq-len", "10", "--max-steps", "2", "--lr", "1e-2")
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(tmp_path / "mr" / "run.yaml")
    assert side["method"] == "dowser-mask+replay"
    tuned = dict(load_run(open_run(tmp_path / "mr")).model.named_parameters())
    from dowser_cli.artifacts.masks import open_mask
    mf = open_mask(m)
    base = _base()
    for name in mf.params:
        frozen = ~mf.dense(name)
        assert torch.equal(tuned[name][frozen], base[name][frozen]), name
    assert any(not torch.equal(tuned[n], base[n]) for n in mf.params)


def test_replay_settings_enter_the_resume_digest_of_replay_runs_only():
    """A checkpoint written before the replay options existed resumes (its digest lacks them), and a
    replay run cannot resume with other replay settings."""
    plain = FinetuneConfig(method="masked").training_digest()
    assert FinetuneConfig(method="masked", replay_weight=3.0, replay_loss="kl").training_digest() == plain
    assert FinetuneConfig(method="replay").training_digest() != FinetuneConfig(method="replay",
                                                                                replay_weight=3.0).training_digest()
    # the digest of the masked default as it was computed before the replay options were added
    assert plain == "c1e23ec0291f92b4"


def test_a_peft_wrapped_model_still_gets_its_image_inputs():
    """PeftModel's forward names only input_ids & co. (the rest through **kwargs): the batches' image
    inputs are chosen by the wrapped model's forward, so LoRA, OSF and Super-Tuning runs on image records
    get pixel_values."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dowser_cli.models import load_config, load_model, resolve_source
    from dowser_cli.training import forward_keys

    src = resolve_source("tiny-llava")
    model = load_model(src, load_config(src), torch.float32, "cpu").model
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert "pixel_values" not in __import__("inspect").signature(wrapped.forward).parameters
    assert {"pixel_values", "image_sizes"} <= forward_keys(wrapped)
