#!/usr/bin/env python
"""Masked (Model-Dowser) against dense (Full-FT) fine-tuning of the same layers, measured in one run.

On a small generated task (reverse the letters of a word: something SmolLM2 cannot already do),
`dowser finetune` runs twice, each in a fresh subprocess so peak memory is its own: once with a
dowser mask at --ratio (from a quick `dowser probe`), once without (Full-FT), same layers, data, steps.
Prints per run: median step time (first steps excluded: allocator warm-up), optimiser-state bytes,
delta bytes, peak RSS; and the ratios masked/dense.

    python scripts/bench_finetune.py                       # smollm2-135m, rho 0.1, 12 steps of 8
    python scripts/bench_finetune.py --steps 20 --json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("garden window river planet silver market doctor pencil basket winter castle rocket forest mirror "
         "button candle dragon engine finger guitar hammer island jacket kitten ladder magnet needle orange "
         "parrot rabbit saddle tomato violin walnut yellow zipper anchor bridge cactus").split()


def make_task(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        w = rng.choice(WORDS)
        recs.append({"conversations": [{"from": "human", "value": f"Reverse the letters of the word '{w}'."},
                                       {"from": "gpt", "value": w[::-1]}]})
    path.write_text(json.dumps(recs))


def dowser(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "dowser_cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dowser {' '.join(map(str, args[:1]))} failed:\n{r.stderr}")


def summary(run: Path, warmup: int) -> dict:
    import yaml

    side = yaml.safe_load((run / "run.yaml").read_text())
    steps = [x["seconds"] for x in side["loss_curve"]][warmup:]
    return {"median_step_s": statistics.median(steps), "optimizer_state_bytes": side["optimizer"]["state_bytes"],
            "delta_bytes": side["outputs"]["delta"]["bytes"],
            "full_checkpoint_bytes": side["outputs"]["full_checkpoint_bytes"],
            "peak_rss_mb": side["peak_memory"]["host_rss_mb"], "trainable_entries": side["trainable"]["trainable_entries"],
            "final_loss": side["loss_curve"][-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_task(d / "train.json", 256)
        t = time.perf_counter()
        dowser("probe", a.model, "--out", d / "scores.safetensors", "--samples", 8, "--probes", 4)
        dowser("mask", d / "scores.safetensors", "--ratio", a.ratio, "--out", d / "mask.safetensors")
        common = ["--data", d / "train.json", "--max-steps", a.steps, "--batch-size", a.batch_size, "--lr", "1e-4",
                  "--device", "cpu", "--dtype", "float32"]
        dowser("finetune", a.model, "--mask", d / "mask.safetensors", "--out", d / "masked", *common)
        dowser("finetune", a.model, "--out", d / "dense", *common)
        res = {"model": a.model, "ratio": a.ratio, "steps": a.steps, "batch_size": a.batch_size,
               "masked": summary(d / "masked", a.warmup), "full_ft": summary(d / "dense", a.warmup),
               "wall_s": round(time.perf_counter() - t, 1)}
    m, f = res["masked"], res["full_ft"]
    res["ratios"] = {
        "step_time_masked_over_full": m["median_step_s"] / f["median_step_s"],
        "optimizer_state_masked_over_full": m["optimizer_state_bytes"] / f["optimizer_state_bytes"],
        "delta_over_full_checkpoint": m["delta_bytes"] / m["full_checkpoint_bytes"],
        "peak_rss_masked_over_full": m["peak_rss_mb"] / f["peak_rss_mb"],
    }
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{a.model}, rho {a.ratio}, {a.steps} steps of {a.batch_size}, same layers and data ({res['wall_s']} s)")
    print(f"{'':22}{'masked':>14}{'full-ft':>14}")
    for key, fmt in (("median_step_s", "{:.3f}"), ("optimizer_state_bytes", "{:,}"), ("delta_bytes", "{:,}"),
                     ("peak_rss_mb", "{:.0f}"), ("trainable_entries", "{:,}"), ("final_loss", "{:.4f}")):
        print(f"{key:22}{fmt.format(m[key]):>14}{fmt.format(f[key]):>14}")
    print(f"full checkpoint bytes {m['full_checkpoint_bytes']:,}")
    targets = {"step_time_masked_over_full": 1.10, "optimizer_state_masked_over_full": 0.2}
    for k, v in res["ratios"].items():
        tgt = f"  (target <= {targets[k]}: {'ok' if v <= targets[k] else 'MISSED'})" if k in targets else ""
        print(f"{k:36}{v:.3f}{tgt}")


if __name__ == "__main__":
    main()
