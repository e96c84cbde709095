#!/usr/bin/env python
"""Probe, mask and fine-tune at real shape (LLaVA-1.5-7B by default) from the shipped config with
random weights (time and memory do not depend on the weights' values), against their floors, in one run.

Stages, each a fresh subprocess (so each peak memory is its own):
  floor     plain forward + M backward passes per probe batch (no hooks, nothing kept)   [bench_probe.py]
  probe     `dowser probe` with the given K / B / M                                       [bench_probe.py]
  dense     the authors' dense accumulation (optional: --dense; host fp32, slow at 7B)     [bench_probe.py]
  masked    `dowser finetune --mask SCORES --ratio 0.1` (mask built in-process), STEPS steps on TUNE layers
  full-ft   `dowser finetune` without a mask on the same layers, data and steps
Fine-tuning data: text-only records of about --seq tokens (a config-only model has no tokenizer; a
byte-level one stands in, so the lengths are real and the words are not).
Prints wall time, peak host / device memory, artifact sizes and the ratios.

    python scripts/bench_scale.py --layers 2 --dtype bfloat16 --device cpu          # 7B shape, 2 layers
    python scripts/bench_scale.py --device cuda --steps 20 --tune 20                # the full 7B on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(args: list, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stderr[-4000:]}")
    return r


def shape_dir(model: str, layers: int | None, into: Path, tiny: bool = False) -> Path:
    """The shipped config, with the decoder cut to ``layers`` layers if asked (and, ``tiny``, every
    width cut to a toy's: the same code paths, for a dry run)."""
    from dowser_cli.models import aliases

    entry = aliases()[model]
    cfg = json.loads((Path(entry["config"]) / "config.json").read_text())
    if layers:
        cfg["text_config"]["num_hidden_layers"] = layers
    if tiny:
        cfg["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=4, head_dim=16)
        cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                    num_hidden_layers=2, projection_dim=32)
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(cfg, indent=1))
    return into


def make_data(path: Path, n: int, seq: int) -> None:
    words = "the model keeps what it knew while it learns the new task from a few examples".split()
    recs = []
    for i in range(n):
        q = " ".join(words[(i + j) % len(words)] for j in range(max(seq // 6, 4)))
        recs.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"answer {i}"}]})
    path.write_text(json.dumps(recs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--layers", type=int, help="cut the decoder to N layers (all by default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tune", type=int, default=20, help="decoder layers to fine-tune (from the top)")
    ap.add_argument("--ft-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=640, help="tokens per fine-tuning record (LLaVA: ~576 image + text)")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--dense", action="store_true", help="also run the dense reference accumulation")
    ap.add_argument("--skip-full-ft", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="toy widths (a dry run of the same code paths)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    env = {**os.environ, "DOWSER_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    py = sys.executable
    res: dict = {"model": a.model, "layers": a.layers or "all", "device": a.device, "dtype": a.dtype,
                 "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = shape_dir(a.model, a.layers, d / "model", a.tiny)
        n_layers = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
        tune = min(a.tune, n_layers)
        variants = "floor,probe" + (",dense" if a.dense else "")
        t = time.perf_counter()
        r = sh([py, "scripts/bench_probe.py", "--model", model, "--random-init", "--samples", a.samples,
                "--batch-size", a.batch_size, "--probes", a.probes, "--device", a.device, "--dtype", a.dtype,
                "--variants", variants, "--keep-scores", d / "scores.safetensors", "--json"], env)
        res["probe"] = json.loads(r.stdout)
        res["probe"]["scores_bytes"] = (d / "scores.safetensors").stat().st_size
        res["probe"]["bench_wall_s"] = round(time.perf_counter() - t, 1)
        print(f"[probe] {json.dumps(res['probe'])}", file=sys.stderr, flush=True)
        make_data(d / "train.json", a.steps * a.ft_batch, a.seq)
        common = [py, "-m", "dowser_cli", "finetune", model, "--random-init", "--data", d / "train.json",
                  "--max-steps", a.steps, "--batch-size", a.ft_batch, "--tune-layers", f"last:{tune}",
                  "--device", a.device, "--dtype", a.dtype, "--max-len", a.seq + 64, "--lr", "2e-5"]
        runs = {"masked": ["--mask", d / "scores.safetensors", "--ratio", a.ratio]}
        if not a.skip_full_ft:
            runs["full-ft"] = []
        for name, extra in runs.items():
            t = time.perf_counter()
            sh(common + extra + ["--out", d / name], env)
            side = json.loads(json.dumps(__import__("yaml").safe_load((d / name / "run.yaml").read_text())))
            steps = [x["seconds"] for x in side["loss_curve"]]
            res[name] = {"wall_s": round(time.perf_counter() - t, 1), "load_s": side["timings"]["load_s"],
                         "median_step_s": sorted(steps[2:] or steps)[len(steps[2:] or steps) // 2],
                         "optimizer_state_bytes": side["optimizer"]["state_bytes"],
                         "trainable_entries": side["trainable"]["trainable_entries"],
                         "delta_bytes": side["outputs"]["delta"]["bytes"],
                         "full_checkpoint_bytes": side["outputs"]["full_checkpoint_bytes"],
                         "peak_memory": side["peak_memory"]}
            if name == "masked":
                mask = d / name / "mask.safetensors"
                masked_numel = __import__("yaml").safe_load(mask.with_suffix(".yaml").read_text())["totals"]["numel"]
                res[name]["mask_bytes"] = mask.stat().st_size
                res[name]["mask_bits_per_masked_param"] = round(8 * mask.stat().st_size / masked_numel, 4)
            print(f"[{name}] {json.dumps(res[name])}", file=sys.stderr, flush=True)
    ratios = {}
    p = res["probe"]
    ratios["probe_time_over_floor"] = p.get("time_probe_over_floor")
    ratios["probe_memory_over_floor"] = p.get("memory_probe_over_floor")
    if "full-ft" in res:
        m, f = res["masked"], res["full-ft"]
        ratios["step_time_masked_over_full_ft"] = round(m["median_step_s"] / f["median_step_s"], 3)
        ratios["optimizer_state_masked_over_full_ft"] = round(m["optimizer_state_bytes"] / f["optimizer_state_bytes"], 3)
        key = "device_mb" if "device_mb" in m["peak_memory"] else "host_rss_mb"
        ratios[f"peak_{key}_masked_over_full_ft"] = round(m["peak_memory"][key] / f["peak_memory"][key], 3)
    m = res["masked"]
    ratios["delta_over_full_checkpoint"] = round(m["delta_bytes"] / m["full_checkpoint_bytes"], 4)
    res["ratios"] = ratios
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
