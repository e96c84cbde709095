#!/usr/bin/env python
"""Reading a training set of many images: host memory, time to the first step, and steps/s.

Generates N images of 336 x 336 (JPEG, a few coloured shapes each; cached in --cache) with one
LLaVA record each, then runs `dowser finetune tiny-llava` on them in a fresh subprocess per setting
and reads its run.yaml: load_s (start to the first step: reading, checking and encoding the data,
loading the model), the peak RSS while loading and while training, and steps/s over the steps after
the first. Each --workers value is one run (workers: DataLoader worker processes; 0 = the main
process prepares each batch; the workers' own memory is not in the main process's RSS).

    python scripts/bench_data.py                          # 10,000 images, 24 steps of 8, workers 0 and 2
    python scripts/bench_data.py --images 2000 --workers 0
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def make_images(folder: Path, n: int, size: int = 336, seed: int = 0) -> Path:
    """``folder``/train.json with n records, each its own JPEG; reused when it holds n already."""
    from PIL import Image, ImageDraw

    data = folder / "train.json"
    if data.is_file() and len(json.loads(data.read_text())) == n:
        return data
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    recs = []
    for i in range(n):
        im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        name, rgb = rng.choice(list(colours.items()))
        x, y, r = rng.randrange(40, size - 40), rng.randrange(40, size - 40), rng.randrange(15, 40)
        d.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
        im.save(folder / "img" / f"{i:05d}.jpg", quality=90)
        recs.append({"image": f"img/{i:05d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": name}]})
    data.write_text(json.dumps(recs))
    return data


def run(data: Path, steps: int, batch: int, workers: int | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "dowser_cli", "finetune", "tiny-llava", "--data", str(data), "--out", str(out),
           "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "1e-4", "--warmup-ratio", "0"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    side = yaml.safe_load((out / "run.yaml").read_text())
    t, mem = side["timings"], side["peak_memory"]
    return {"workers": workers, "load_s": t["load_s"], "train_s": t["train_s"],
            "steps_per_s": round(steps / t["train_s"], 2),
            "peak_rss_mb": mem.get("host_rss_mb"), "pre_train_rss_mb": mem.get("pre_train_rss_mb"),
            "train_rss_mb": mem.get("train_rss_mb"), "steps": steps, "n": len(json.loads(data.read_text()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2],
                    help="one run per value; none: today's default path, without --workers")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dowser-bench-data")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    data = make_images(a.cache / str(a.images), a.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in (a.workers or [None]):
            rows.append(run(data, a.steps, a.batch_size, w, Path(tmp) / f"run-w{w}"))
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{rows[0]['n']} images of 336 x 336, tiny-llava, {a.steps} steps of {a.batch_size}")
    print("| workers | start to first step (s) | peak RSS, main process (MB) | RSS when training starts (MB) "
          "| steps/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers'] if r['workers'] is not None else '-'} | {r['load_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['pre_train_rss_mb']:.0f} | {r['steps_per_s']:.2f} |")
    if len(rows) == 2 and rows[0]["steps_per_s"]:
        print(f"steps/s ratio workers {rows[1]['workers']} / {rows[0]['workers']}: "
              f"{rows[1]['steps_per_s'] / rows[0]['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
