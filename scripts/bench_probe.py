#!/usr/bin/env python
"""Probe cost against its floor and against the authors' dense accumulation, measured in one run.

Three variants, each in a fresh subprocess (so peak memory is its own), on the same batches:
  floor  the same generate calls, forward and M backward passes, no hooks, nothing kept
  probe  `dowser probe` itself (dowser_cli.probe.run: hooks, factored storage, artifact written)
  dense  the same passes + a dense |W| * outer(psi, a) per probe per module into fp32 running mean
         and variance on the host (what the authors' script does)
Prints wall time (after the model is loaded) and peak memory of each, and the ratios.

    python scripts/bench_probe.py                      # smollm2-135m, paper defaults (K 64, B 4, M 8)
    python scripts/bench_probe.py --samples 16 --json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RANDOM_INIT = bool(os.environ.get("BENCH_RANDOM_INIT"))  # set by --random-init for the variant subprocesses


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(model: str, cfg):
    from dowser_cli.models import load_config, load_model, resolve_source
    from dowser_cli import runtime

    device = runtime.resolve_device(cfg.device)
    src = resolve_source(model, random_init=RANDOM_INIT)
    lm = load_model(src, load_config(src), runtime.resolve_dtype(cfg.dtype, device), device)
    lm.model.requires_grad_(False)
    return lm, device


def variant(name: str, model: str, cfg_json: str) -> dict:
    from dowser_cli import probe, probing, scoring

    cfg = probing.ProbeConfig(**json.loads(cfg_json))
    if name == "probe":
        keep = os.environ.get("BENCH_KEEP_SCORES")
        with tempfile.TemporaryDirectory() as d:
            side = probe.run(model, Path(keep) if keep else Path(d) / "s.safetensors", cfg, random_init=RANDOM_INIT)
        t = side["timings"]
        device = side["model"]["device"]
        return {"seconds": t["total_s"] - t["load_s"], "peak_mb": _peak_mb(device)}

    lm, device = _setup(model, cfg)
    ids = probing.token_ids(lm)
    layers = list(range(lm.parts.num_layers))
    scored = probe.scored_modules(lm, cfg, layers)
    mods = scored.modules
    source = probe.BatchSource(lm, cfg, ids, None, device)
    dense = {n: scoring.DenseRunningMoments(m.weight.cpu()) for n, m in mods.items()} if name == "dense" else None
    emb = lm.model.get_input_embeddings()
    t0 = time.perf_counter()
    for b, n in enumerate(cfg.batch_sizes()):
        input_ids, mask, img = source.batch(b)
        xi_gen = probe.xi_generator(cfg.seed, b)
        if name == "floor":
            # the same forward as the probe (last positions through lm_head), backward to the embeddings
            seen = {}
            h = emb.register_forward_hook(lambda m, a, o: seen.setdefault("e", o.requires_grad_(True)))
            last = mask.long().sum(1) - 1
            keep = torch.unique(last)
            out = lm.model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device),
                           logits_to_keep=keep.to(device), use_cache=False)
            h.remove()
            f = out.logits[torch.arange(n), torch.searchsorted(keep, last).to(device)]
            xi = torch.stack([scoring.rademacher(tuple(f.shape), xi_gen, device) for _ in range(cfg.probes)])
            cot = (xi / n).to(f.dtype)
            # the same M backward passes as the probe (vmapped or one by one), down to the embeddings
            if probing.use_batched_probes(cfg, device):
                torch.autograd.grad(f, seen["e"], grad_outputs=cot, is_grads_batched=True)
            else:
                for p in range(cfg.probes):
                    torch.autograd.grad(f, seen["e"], grad_outputs=cot[p], retain_graph=p + 1 < cfg.probes)
            del out, f, seen
        else:
            with scored.hooks(device, cfg.probes) as hooks:
                batch_psi = probe.probe_batch(lm, hooks, input_ids, mask, img, xi_gen, cfg.probes, device,
                                              probing.use_batched_probes(cfg, device))
                for mname in mods:
                    psi, act, _ = hooks.batch_factors(mname, batch_psi, cfg.probes)
                    for p in range(cfg.probes):
                        dense[mname].update(psi[p].cpu(), act.cpu())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batched", choices=["auto", "on", "off"], default="auto",
                    help="probe backward passes vmapped (on) or one by one (off)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    ap.add_argument("--random-init", action="store_true", help="build MODEL from its config (no weights)")
    ap.add_argument("--variants", default="floor,probe,dense", help="which of floor,probe,dense to run")
    ap.add_argument("--keep-scores", help="also keep the probe variant's scores file here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(variant(args.variant, args.model, args.cfg)))
        return
    cfg = {"samples": args.samples, "batch_size": args.batch_size, "probes": args.probes, "seq_len": args.seq_len,
           "device": args.device, "dtype": args.dtype, "batched_probes": args.batched}
    env = {**os.environ, "DOWSER_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error",
           **({"BENCH_RANDOM_INIT": "1"} if args.random_init else {}),
           **({"BENCH_KEEP_SCORES": str(Path(args.keep_scores).resolve())} if args.keep_scores else {})}
    res = {}
    variants = args.variants.split(",")
    for name in variants:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--model", args.model,
                              "--cfg", json.dumps(cfg)], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr}")
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    summary = {"model": args.model, "config": cfg,
               "seconds": {k: round(v["seconds"], 2) for k, v in res.items()},
               "peak_mb": {k: round(v["peak_mb"], 1) for k, v in res.items()}}
    ratios = [("time_probe_over_floor", "probe", "floor", "seconds", "(target <= 1.2)"),
              ("time_probe_over_dense", "probe", "dense", "seconds", "(target < 0.5)"),
              ("memory_probe_over_floor", "probe", "floor", "peak_mb", "(target <= 1.15)"),
              ("memory_dense_over_floor", "dense", "floor", "peak_mb", "")]
    for key, a, b, what, _ in ratios:
        if a in res and b in res:
            summary[key] = round(res[a][what] / res[b][what], 3)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"model {args.model}, K={args.samples} B={args.batch_size} M={args.probes} seq={args.seq_len}")
    for k in variants:
        print(f"  {k:5s}  {summary['seconds'][k]:8.2f} s   peak {summary['peak_mb'][k]:9.1f} MB")
    for key, _, _, _, target in ratios:
        if key in summary:
            print(f"{key.replace('_', ' '):26s}{summary[key]:.3f}   {target}")


if __name__ == "__main__":
    main()
