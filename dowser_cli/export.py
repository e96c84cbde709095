"""`dowser export`: a run directory's fine-tuned model (base + delta) as a plain `save_pretrained`
checkpoint with its tokenizer/processor."""
from __future__ import annotations

from pathlib import Path

import torch

from dowser_cli import artifacts
from dowser_cli.artifacts.runs import open_run
from dowser_cli.errors import UserError
from dowser_cli.models.runs import load_run


def export(run_path: Path, out: Path, dtype: str | None = None) -> Path:
    """Write a save_pretrained directory (weights, config, tokenizer/processor) of the fine-tuned model."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    run = open_run(run_path)
    lm = load_run(run, getattr(torch, dtype) if dtype else None)
    parent.mkdir(parents=True, exist_ok=True)     # like finetune's and merge's run directories
    with artifacts.atomic_dir(parent / out.name) as tmp:
        lm.model.save_pretrained(tmp)
        for extra in (lm.processor, lm.tokenizer):
            if extra is not None:
                extra.save_pretrained(tmp)
        artifacts.write_yaml(tmp / "dowser_export.yaml", {
            **artifacts.sidecar_header("dowser.export", f"dowser export {run_path} --out {out}"),
            "run": str(run_path), "delta_sha256": artifacts.sha256_file(run.delta),
            "base_model": run.sidecar["model"]})
    return out

