#!/usr/bin/env python
"""Per-rank memory of FSDP2 against DDP fine-tuning, in one run: the same model, data and steps under
`torchrun --nproc-per-node N` with --strategy ddp, then fsdp; prints per rank, from each run.yaml:
  param/grad/state MiB   parameters (FSDP: this rank's shards), gradients and optimiser state held at
                         the first step's peak (after its backward)
  load peak RSS          peak host RSS while loading and sharding (before the first step)
  start RSS              host RSS when training begins (after loading and, under FSDP, sharding)
  train peak RSS         peak host RSS from the first step on (Linux VmHWM reset after loading)
  peak RSS               peak host RSS of the whole process, loading included (under FSDP only rank 0
                         reads the weights; the other ranks build the model on "meta" and get their shards)
  device peak            on CUDA, torch.cuda.max_memory_allocated after loading
and the FSDP / DDP ratios. The model is LLaVA-1.5's shape from the shipped config, scaled down to a few
hundred M parameters (--hidden/--layers/...), built with --random-init (memory does not depend on the
weights' values); data are text-only records of about --seq tokens (byte-level tokenizer stand-in).

    python scripts/bench_distributed.py                                   # ~250M params, 2 CPU ranks
    python scripts/bench_distributed.py --nproc 8 --device cuda --hidden 4096 --inter 11008 --layers 32
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
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_scale import make_data  # noqa: E402


def shape_dir(a, into: Path) -> tuple[Path, int]:
    """The shipped llava-1.5-7b config with the decoder (and vision tower) resized; returns its params."""
    from dowser_cli.models import aliases

    entry = aliases()["llava-1.5-7b"]
    cfg = json.loads((Path(entry["config"]) / "config.json").read_text())
    t = cfg["text_config"]
    t.update(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
             num_attention_heads=a.hidden // 128, num_key_value_heads=a.hidden // 128)
    cfg["vision_config"]["num_hidden_layers"] = a.vision_layers
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(cfg, indent=1))
    v, h, i, n = t["vocab_size"], a.hidden, a.inter, a.layers
    text = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    return into, text


def run(a, model: Path, data: Path, out: Path, strategy: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "-m", "dowser_cli", "finetune", str(model), "--random-init", "--data", str(data), "--out", str(out),
           "--strategy", strategy, "--max-steps", str(a.steps), "--batch-size", str(a.batch), "--tune-layers",
           "all", "--device", a.device, "--dtype", a.dtype, "--max-len", str(a.seq + 64), "--lr", "2e-5"]
    env = {**os.environ, "DOWSER_QUIET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-4000:]}")
    import yaml

    side = yaml.safe_load((out / "run.yaml").read_text())
    return {"wall_s": round(time.perf_counter() - t, 1), "ranks": side["distributed"]["ranks"],
            "trainable_entries": side["trainable"]["trainable_entries"]}


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="examples per rank per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res: dict = {"nproc": a.nproc, "device": a.device, "dtype": a.dtype}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model, text_params = shape_dir(a, d / "model")
        res["text_params"] = text_params
        make_data(d / "train.json", a.steps * a.batch * a.nproc, a.seq)
        for strategy in ("ddp", "fsdp"):
            res[strategy] = run(a, model, d / "train.json", d / strategy, strategy)
            print(f"[{strategy}] {json.dumps(res[strategy])}", file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{a.nproc} ranks, {a.device}, {a.dtype}; LLaVA shape, text {text_params / 1e6:.0f}M params, "
          f"all {a.layers} decoder layers tuned (dense), {res['ddp']['trainable_entries'] / 1e6:.0f}M trainable")
    print(f"{'':5} {'rank':>4} {'param MiB':>10} {'grad MiB':>9} {'state MiB':>10} {'load peak RSS':>14} {'start RSS':>10} "
          f"{'train peak RSS':>15} {'peak RSS':>9} {'device peak':>11}")
    for s in ("ddp", "fsdp"):
        for r in res[s]["ranks"]:
            pm = r["peak_memory"]
            print(f"{s:5} {r['rank']:>4} {mib(r['param_bytes']):>10} {mib(r['grad_bytes']):>9} "
                  f"{mib(r['optimizer_state_bytes']):>10} {r.get('load_peak_host_rss_mb') or '-':>14} "
                  f"{r.get('train_start_host_rss_mb') or '-':>10} "
                  f"{r.get('train_peak_host_rss_mb') or '-':>15} "
                  f"{pm['host_rss_mb']:>9} {pm.get('device_mb', '-'):>11}")

    def worst(s, key):
        vals = [k(r) for r in res[s]["ranks"] if (k := key)(r) is not None]
        return max(vals) if vals else None

    keys = {"param+grad+state bytes": lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"],
            "load peak RSS": lambda r: r.get("load_peak_host_rss_mb"),
            "start RSS": lambda r: r.get("train_start_host_rss_mb"),
            "train peak RSS": lambda r: r.get("train_peak_host_rss_mb"),
            "peak RSS": lambda r: r["peak_memory"]["host_rss_mb"],
            "device peak": lambda r: r["peak_memory"].get("device_mb")}
    print("FSDP / DDP, largest rank:")
    for name, key in keys.items():
        f, dd = worst("fsdp", key), worst("ddp", key)
        if f is not None and dd:
            print(f"  {name:24} {f / dd:.3f}")


if __name__ == "__main__":
    main()
