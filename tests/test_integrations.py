"""dowser_cli.integrations.hf: the Hugging Face Trainer and TRL's SFTTrainer train inside a mask and
write a run directory equal to `dowser finetune`'s with the same data, seed and steps."""
import json

import pytest
import torch

import dowser_cli as dowser
from dowser_cli import finetune, mask, probe
from dowser_cli.masking import MaskConfig
from dowser_cli.models import load_config, load_model, resolve_source
from dowser_cli.models.runs import load_run
from dowser_cli.artifacts.runs import open_run
from dowser_cli.probing import ProbeConfig
from dowser_cli.training import FinetuneConfig

from conftest import conv

STEPS, LR, WD = 3, 1e-3, 0.1


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("hf")
    probe.run("tiny-llava", d / "scores.safetensors", ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12))
    mask.run(d / "scores.safetensors", d / "mask.safetensors", MaskConfig(ratio=0.1))
    (d / "img").mkdir()
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(4):
        px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(d / "img" / f"{i}.png")
        recs.append({"image": f"{i}.png", "conversations": conv("<image>\nWhat digit is shown?", str(i))})
    (d / "train.json").write_text(json.dumps(recs))
    # the reference: dowser finetune, one step = the whole (4-record) file, constant lr, norms frozen
    # (the Trainer path trains the mask's matrices only)
    cfg = FinetuneConfig(lr=LR, max_steps=STEPS, batch_size=4, warmup_ratio=0.0, lr_scheduler="constant",
                         weight_decay=WD, max_grad_norm=1.0, freeze_norms=True)
    finetune.run("tiny-llava", d / "train.json", d / "ref", cfg, mask_path=d / "mask.safetensors",
                 image_folder=d / "img")
    return d


def _train(work, out, trainer_cls="Trainer", per_device=4):
    from transformers import Trainer, TrainingArguments
    from dowser_cli.integrations import hf

    src = resolve_source("tiny-llava")
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    model = lm.model
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = dowser.load_mask(work / "mask.safetensors", model)
    kw = dict(output_dir=str(out / "trainer"), per_device_train_batch_size=per_device, max_steps=STEPS, learning_rate=LR,
              weight_decay=WD, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
              save_strategy="no", report_to=[], use_cpu=True, seed=0, remove_unused_columns=False)
    if trainer_cls == "SFTTrainer":
        from trl import SFTConfig, SFTTrainer

        # SFTConfig turns on bf16 autocast and gradient checkpointing by default: off, to compare in fp32
        args = SFTConfig(**kw, dataset_kwargs={"skip_prepare_dataset": True}, bf16=False, gradient_checkpointing=False)
        cls, extra = SFTTrainer, {"processing_class": lm.tokenizer}
    else:
        args = TrainingArguments(**kw)
        cls, extra = Trainer, {}
    trainer = cls(model=model, args=args,
                  train_dataset=hf.read_examples(work / "train.json", lm.tokenizer, lm.processor, work / "img",
                                                 hf_dataset=trainer_cls == "SFTTrainer"),
                  data_collator=hf.collator(lm.tokenizer, lm.processor),
                  optimizers=(hf.masked_optimizer(model, m, args), None),
                  callbacks=[hf.DowserCallback(m, out / "run")], **extra)
    trainer.train()
    return model, base, m


@pytest.mark.parametrize("trainer_cls", ["Trainer", "SFTTrainer"])
def test_a_trainer_moves_no_frozen_entry_and_matches_dowser_finetune(work, tmp_path, trainer_cls):
    if trainer_cls == "SFTTrainer":
        pytest.importorskip("trl")
    model, base, m = _train(work, tmp_path, trainer_cls)
    for n, p in model.named_parameters():
        if n in m.dense:
            assert torch.equal(p.detach()[~m.dense[n]], base[n][~m.dense[n]]), n   # weight decay 0.1
        else:
            assert torch.equal(p.detach(), base[n]), n
    run = open_run(tmp_path / "run")
    assert run.sidecar["steps"] == STEPS
    ours = dict(load_run(run).model.named_parameters())
    ref = dict(load_run(open_run(work / "ref")).model.named_parameters())
    for n in m.dense:
        assert not torch.equal(ref[n], base[n]), n
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-6)


def test_two_ddp_ranks_under_torchrun_match_dowser_finetune(work, tmp_path):
    """The Trainer's DDP path (torchrun, gloo on the CPU): two ranks of 2 records make the reference's
    4-record step (every record has one answer token, so the mean of the ranks' means is the 4-record
    mean); rank 0 writes the run directory."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "ddp.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom pathlib import Path\n"
                      f"from test_integrations import _train\n"
                      f"_train(Path({str(work)!r}), Path({str(tmp_path)!r}), per_device=2)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = open_run(tmp_path / "run")
    assert run.sidecar["steps"] == STEPS
    ours = dict(load_run(run).model.named_parameters())
    ref = dict(load_run(open_run(work / "ref")).model.named_parameters())
    src = resolve_source("tiny-llava")
    base_model = load_model(src, load_config(src), torch.float32, "cpu", tokenizer=False).model
    base = dict(base_model.named_parameters())
    m = dowser.load_mask(work / "mask.safetensors", base_model)
    for n in m.dense:
        assert torch.equal(ours[n][~m.dense[n]], base[n][~m.dense[n]]), n
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-6)


def test_deepspeed_and_the_trainers_fsdp_are_refused_in_one_line(work, tmp_path, monkeypatch):
    from dowser_cli.integrations import hf

    model = load_model(resolve_source("tiny-llava"), load_config(resolve_source("tiny-llava")), torch.float32,
                       "cpu").model
    cb = hf.DowserCallback(dowser.load_mask(work / "mask.safetensors", model), tmp_path / "run")

    class Args:
        deepspeed = {"zero_optimization": {"stage": 3}}
        fsdp = ""
    with pytest.raises(dowser.UserError, match="DeepSpeed ZeRO partitions"):
        cb.on_init_end(Args(), None, None)
    Args.deepspeed, Args.fsdp = None, "full_shard"
    with pytest.raises(dowser.UserError, match="FSDP wraps the parameters"):
        cb.on_init_end(Args(), None, None)
    with pytest.raises(dowser.UserError, match="not a MaskedAdamW"):
        cb.on_train_begin(Args(), None, None, optimizer=torch.optim.AdamW(model.parameters()))


def test_a_bf16_trainer_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(work, tmp_path):
    """Resuming a Trainer run of a bf16 model with the masked optimiser: torch's loader cast the moments
    and fp32 master copy to bf16 (and the next step failed); the Trainer's own resume read none of a
    LLaVA checkpoint's weights (saved under the original checkpoint's key names), so the run went on
    from the base weights. The resumed run now ends bit-identical to one that never stopped, its
    optimiser state fp32."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from dowser_cli.integrations import hf

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_save = control.should_training_stop = True

    def trainer(out, stop=False):
        src = resolve_source("tiny-llava")
        lm = load_model(src, load_config(src), torch.bfloat16, "cpu")
        m = dowser.load_mask(work / "mask.safetensors", lm.model)
        args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, max_steps=4,
                                 learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", warmup_steps=0,
                                 max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 remove_unused_columns=False)
        opt = hf.masked_optimizer(lm.model, m, args)
        t = Trainer(model=lm.model, args=args, optimizers=(opt, None), data_collator=hf.collator(lm.tokenizer, lm.processor),
                    train_dataset=hf.read_examples(work / "train.json", lm.tokenizer, lm.processor, work / "img"),
                    callbacks=[hf.DowserCallback(m, out / "run")] + ([StopAt()] if stop else []))
        return t, opt, m

    whole, _, m = trainer(tmp_path / "whole")
    whole.train()
    first, _, _ = trainer(tmp_path / "resumed", stop=True)
    first.train()
    ckpt = tmp_path / "resumed" / "trainer" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file()
    second, opt, _ = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 4
    states = [s for s in opt.state.values() if "exp_avg" in s]
    assert states and all(s["master"].dtype == s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
                          and s["step"] == 4 for s in states)
    want = dict(whole.model.named_parameters())
    base = dict(trainer(tmp_path / "base")[0].model.named_parameters())
    for n, p in second.model.named_parameters():
        assert torch.equal(p, want[n]), n
        if n in m.dense:
            assert not torch.equal(p, base[n]), n            # the runs did move the mask's entries
    # the checkpoint still loads as a model, and the run directory holds the resumed run's weights
    saved = dict(load_model(resolve_source(str(ckpt)), load_config(resolve_source(str(ckpt))), torch.bfloat16,
                            "cpu", tokenizer=False).model.named_parameters())
    assert all(torch.equal(saved[n], p) for n, p in dict(first.model.named_parameters()).items())
    ours = dict(load_run(open_run(tmp_path / "resumed" / "run")).model.named_parameters())     # bf16, as trained
    assert all(torch.equal(ours[n], want[n]) for n in m.dense)
