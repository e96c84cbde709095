#!/usr/bin/env python
"""The checks that need a GPU, as one script that prints one table (run it through gpu_check.sh).

  scale      probe / floor time and peak memory (bench_scale.py: LLaVA-1.5-7B's shape, random weights),
             and the masked / Full-FT step time and peak memory on the same layers
  bf16       tiny-llava in bf16 on the device: probe -> mask -> finetune (grad_accum 2, weight decay
             0.1) with every frozen entry checked bit-identical to the base, then export and
             eval-forgetting, each timed
  trainer    the Trainer's FSDP path on one GPU (accelerate launch --use_fsdp, one process): the masked
             callback must refuse it in one line (its FSDP wraps the parameters after the optimiser)
  lmms       eval-forgetting through lmms-eval (a local task): dowser's copies wait in host memory
             while lmms-eval holds its own (the device peak is about one model, not three)

--dry-run runs every check end to end on the CPU at toy sizes (CI runs it), so the script is known to
work the day a GPU is at hand. Each check is a subprocess; a failure is a FAIL row with its last line
and the script goes on, then exits 1.

    scripts/gpu_check.sh              # on one GPU: about 8 minutes on an H100
    scripts/gpu_check.sh --dry-run    # on the CPU, toy sizes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

TRAINER = '''import sys
import torch
from transformers import Trainer, TrainingArguments
import dowser_cli as dowser
from dowser_cli.integrations import hf

lm = dowser.load_model("tiny-llava")
mask = dowser.load_mask(sys.argv[1], lm.model)
args = TrainingArguments(output_dir=sys.argv[2], max_steps=2, per_device_train_batch_size=2, report_to=[],
                         fsdp=sys.argv[4], remove_unused_columns=False)
trainer = Trainer(model=lm.model, args=args, train_dataset=hf.read_examples(sys.argv[3], lm.tokenizer, lm.processor),
                  data_collator=hf.collator(lm.tokenizer, lm.processor),
                  optimizers=(hf.masked_optimizer(lm.model, mask, args), None),
                  callbacks=[hf.DowserCallback(mask, sys.argv[2])])
trainer.train()
'''
class Check:
    def __init__(self, env: dict):
        self.env, self.rows = env, []

    def sh(self, *args, expect: int = 0) -> subprocess.CompletedProcess:
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=self.env, cwd=ROOT)
        if r.returncode != expect:
            tail = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            raise RuntimeError(f"exit {r.returncode}: {' '.join(map(str, args[:4]))} ...: {tail}")
        return r

    def row(self, name: str, fn) -> None:
        t = time.perf_counter()
        try:
            result, status = fn(), "ok"
        except Exception as e:   # one failed check is a row, the others still run
            result, status = str(e)[-300:], "FAIL"
        self.rows.append((name, status, round(time.perf_counter() - t, 1), result))
        print(f"[{name}] {status}: {result}", file=sys.stderr, flush=True)


def scale(c: Check, a, d: Path) -> str:
    sizes = (["--tiny", "--layers", "1", "--samples", "2", "--batch-size", "1", "--probes", "2", "--steps", "3",
              "--tune", "1", "--seq", "32"] if a.dry_run else
             ["--samples", "16", "--batch-size", "4", "--probes", "8", "--steps", "10", "--tune", "8"])
    r = c.sh(PY, "scripts/bench_scale.py", "--device", a.device, "--dtype", "bfloat16", "--json", *sizes)
    res = json.loads(r.stdout)
    q, m, f = res["ratios"], res["masked"], res["full-ft"]
    key = "device_mb" if "device_mb" in m["peak_memory"] else "host_rss_mb"
    return (f"probe/floor time {q['probe_time_over_floor']}, memory {q['probe_memory_over_floor']}; "
            f"masked/Full-FT step {q['step_time_masked_over_full_ft']}, peak {key} "
            f"{m['peak_memory'][key]:.0f}/{f['peak_memory'][key]:.0f} MB")


def bf16_chain(c: Check, a, d: Path) -> str:
    import torch

    from dowser_cli.artifacts.masks import open_mask
    from dowser_cli.artifacts.runs import open_run
    from dowser_cli.models import load_config, load_model, resolve_source
    from dowser_cli.models.runs import load_run

    dw = [PY, "-m", "dowser_cli"]
    files = d / "digits"
    c.sh(*dw, "make-data", "digits", "--out", files)
    c.sh(*dw, "probe", "tiny-llava", "--samples", "4", "--batch-size", "2", "--probes", "2", "--device", a.device,
         "--dtype", "bfloat16", "--out", d / "scores.safetensors")
    c.sh(*dw, "mask", d / "scores.safetensors", "--ratio", "0.1", "--out", d / "mask.safetensors")
    c.sh(*dw, "finetune", "tiny-llava", "--data", files / "train.json", "--mask", d / "mask.safetensors",
         "--max-steps", "8", "--batch-size", "2", "--grad-accum", "2", "--weight-decay", "0.1", "--lr", "1e-3",
         "--dtype", "bfloat16", "--device", a.device, "--out", d / "run")
    src = resolve_source("tiny-llava")
    base = load_model(src, load_config(src), torch.bfloat16, "cpu").model
    tuned = load_run(open_run(d / "run"), device="cpu").model
    mask = open_mask(d / "mask.safetensors")
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    moved = frozen_moved = 0
    for n in mask.params:
        keep = ~mask.dense(n)
        frozen_moved += int((after[n][keep].float() != before[n][keep].float()).sum())
        moved += int((after[n][~keep].float() != before[n][~keep].float()).sum())
    if frozen_moved or not moved:
        raise RuntimeError(f"{frozen_moved} frozen entries moved, {moved} trainable ones did")
    t = time.perf_counter()
    c.sh(*dw, "export", d / "run", "--out", d / "export")
    export_s = time.perf_counter() - t
    (d / "facts.jsonl").write_text("".join(json.dumps({"question_id": f"f{i}", "text": f"Pick {c}.", "answer": c,
                                                        "options": ["red", "green", "blue"]}) + "\n"
                                            for i, c in enumerate(["red", "green", "blue"])))
    (d / "suite.yaml").write_text(
        "tasks:\n  - {name: digits, role: downstream, kind: vqa, metric: exact_match, data: "
        f"{files / 'test.jsonl'}, limit: 8, max_new_tokens: 3}}\n"
        "  - {name: facts, role: upstream, kind: likelihood, metric: choice_likelihood, data: "
        f"{d / 'facts.jsonl'}, prompt: '{{question}}', answer_template: 'The answer is {{answer}}.'}}\n")
    t = time.perf_counter()
    c.sh(*dw, "eval-forgetting", "--base", "tiny-llava", d / "run", "--tasks", d / "suite.yaml", "--device", a.device,
         "--out", d / "report", "--bootstrap", "20")
    eval_s = time.perf_counter() - t
    return (f"0 frozen entries moved ({moved} trainable did); export {export_s:.1f} s, "
            f"eval-forgetting {eval_s:.1f} s")


def trainer_fsdp(c: Check, a, d: Path) -> str:
    """accelerate launch --use_fsdp, one process: the masked callback refuses in one line."""
    if not (d / "mask.safetensors").exists():
        raise RuntimeError("needs the bf16 check's mask")
    (d / "trainer.py").write_text(TRAINER)
    script = [d / "trainer.py", d / "mask.safetensors", d / "trainer-out", d / "digits" / "train.json"]
    if a.dry_run:
        # on the CPU, TrainingArguments refuses fsdp itself ("only works in distributed training") and
        # accelerate's FSDP finds no device: the dry run sets what `accelerate launch --use_fsdp` sets
        launch = [PY, *script, ""]
        c.env["ACCELERATE_USE_FSDP"] = "true"
    else:
        launch = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--use_fsdp", *script, "full_shard"]
    try:
        r = c.sh(*launch, expect=1)
    finally:
        c.env.pop("ACCELERATE_USE_FSDP", None)
    if "FSDP wraps the parameters" not in r.stderr:
        raise RuntimeError("no one-line refusal: " + (r.stderr.strip().splitlines() or [""])[-1])
    return "refused in one line (the Trainer's FSDP wraps the parameters after the optimiser)"


def lmms(c: Check, a, d: Path) -> str:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        return "skipped: the lmms extra is not installed (make install-lmms)"
    recs = [json.loads(x) for x in (d / "digits" / "test.jsonl").read_text().splitlines()][:4]
    items = [{"question_id": i, "image": str((d / "digits" / r["image"]).resolve()), "text": r["text"],
              "answer": r["answers"][0] if "answers" in r else r.get("answer", "")} for i, r in enumerate(recs)]
    (d / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (d / "lmms").mkdir(exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))       # the lmms harness test's local task, reused
    from test_harness import TASK_UTILS, TASK_YAML

    (d / "lmms" / "local.yaml").write_text(TASK_YAML.format(items=d / "items.jsonl"))
    (d / "lmms" / "utils.py").write_text(TASK_UTILS)
    (d / "lmms-suite.yaml").write_text(
        (d / "suite.yaml").read_text() + "  - {name: theirs, role: upstream, harness: lmms-eval, "
        f"lmms_task: dowser_local_vqa, metric: exact_match, include_path: {d / 'lmms'}}}\n")
    t = time.perf_counter()
    c.sh(PY, "-m", "dowser_cli", "eval-forgetting", "--base", "tiny-llava", d / "run", "--tasks",
         d / "lmms-suite.yaml", "--device", a.device, "--out", d / "lmms-report", "--bootstrap", "20")
    wall = time.perf_counter() - t
    peak = yaml.safe_load((d / "lmms-report" / "report.yaml").read_text())["peak_memory"]
    own = yaml.safe_load((d / "report" / "report.yaml").read_text())["peak_memory"]   # dowser's evaluator alone
    key = "device_mb" if "device_mb" in peak else "host_rss_mb"
    return (f"{wall:.1f} s; peak {key} {peak[key]:.0f} MB with lmms-eval's copy beside base and run "
            f"({own[key]:.0f} MB for dowser's evaluator alone)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every check on the CPU at toy sizes")
    ap.add_argument("--keep", type=Path, help="keep the work directory here")
    a = ap.parse_args()
    a.device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (use --dry-run to run the checks on the CPU)")
    env = {**os.environ, "DOWSER_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    c = Check(env)
    d = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        for name, fn in (("scale", scale), ("bf16", bf16_chain), ("trainer", trainer_fsdp), ("lmms", lmms)):
            c.row(name, lambda fn=fn: fn(c, a, d))
    finally:
        if a.keep:
            shutil.copytree(d, a.keep, dirs_exist_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.dry_run else "CPU (dry run)"
    print(f"gpu_check {time.strftime('%Y-%m-%d')} on {device}")
    print("| check | status | seconds | result |")
    print("|---|---|---|---|")
    for name, status, secs, result in c.rows:
        print(f"| {name} | {status} | {secs} | {result} |")
    sys.exit(1 if any(s == "FAIL" for _, s, _, _ in c.rows) else 0)


if __name__ == "__main__":
    main()
