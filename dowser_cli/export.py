"""Reading fine-tuned run directories: check them, rebuild the fine-tuned model from the base model plus
`delta.safetensors`, and `dowser export` it as a plain `save_pretrained` checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dowser_cli import artifacts
from dowser_cli.errors import UserError
from dowser_cli.training import DELTA_KIND
from dowser_cli.models import LoadedModel, load_config, load_model, resolve_source


@dataclass
class RunDir:
    path: Path
    sidecar: dict[str, Any]
    delta: Path
    meta: dict[str, str]
    params: dict[str, dict]          # name -> {"shape", "dtype", "masked"}
    mask: Path | None

    @property
    def model_spec(self) -> str:
        return self.sidecar["model"]["spec"]


def open_run(path: Path) -> RunDir:
    """Check a run directory's files and their recorded hashes (no model loaded)."""
    if not path.is_dir():
        raise UserError(f"{path}: not a run directory")
    side_path = path / "run.yaml"
    if not side_path.is_file():
        hint = " (unfinished: it has a checkpoint; finish it with --resume)" if (path / "checkpoint").exists() else ""
        raise UserError(f"{path}: no run.yaml{hint}")
    side = artifacts.read_yaml(side_path)
    delta = path / "delta.safetensors"
    meta = artifacts.read_header(delta, DELTA_KIND)
    if meta.get("model_fingerprint") != side.get("model", {}).get("fingerprint"):
        raise UserError(f"{delta}: fingerprint differs from {side_path}")
    params = json.loads(meta["params"])
    mask = path / "mask.safetensors"
    masked = any(v["masked"] for v in params.values())
    if masked:
        if not mask.is_file():
            raise UserError(f"{path}: the delta is masked but mask.safetensors is missing")
        if artifacts.sha256_file(mask) != meta.get("mask_sha256"):
            raise UserError(f"{mask}: does not match the mask the run was trained with (sha256 differs)")
    return RunDir(path, side, delta, meta, params, mask if masked else None)


def apply_delta(lm: LoadedModel, run: RunDir) -> None:
    """Write the run's trained values into the (base) model in place."""
    from dowser_cli.mask import open_mask

    run_dtype = getattr(torch, run.sidecar["model"].get("dtype", "float32"))
    if artifacts.model_fingerprint(lm.model, run_dtype) != run.meta["model_fingerprint"]:
        raise UserError(f"{run.path}: was fine-tuned from a different base model than {lm.source.spec} "
                        f"(fingerprint mismatch)")
    # the digest reads values, which depend on the dtype loaded; compare it where they are comparable
    same_dtype = all(p.dtype == run_dtype for p in lm.model.parameters())
    if same_dtype and artifacts.weights_digest(lm.model) != run.meta.get("weights_digest"):
        raise UserError(f"{run.path}: was fine-tuned from different weights than {lm.source.spec} "
                        f"(same architecture, weights digest differs)")
    mf = open_mask(run.mask) if run.mask else None
    values = artifacts.read_tensors(run.delta)
    with torch.no_grad():
        for name, info in run.params.items():
            p = lm.model.get_parameter(name)
            v = values[name].to(p.device, p.dtype)
            if info["masked"]:
                idx = mf.dense(name).reshape(-1).nonzero().squeeze(1).to(p.device)
                p.view(-1)[idx] = v
            else:
                p.copy_(v.reshape(p.shape))


def load_run(run: RunDir, dtype: torch.dtype | None = None, device: str = "cpu", base: str | None = None) -> LoadedModel:
    """The base model named in run.yaml (or ``base``), with the run's delta applied."""
    info = run.sidecar["model"]
    source = resolve_source(base or info["spec"], random_init=bool(info.get("random_init")) and base is None)
    dtype = dtype or getattr(torch, info.get("dtype", "float32"))
    lm = load_model(source, load_config(source), dtype, device)
    apply_delta(lm, run)
    return lm


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


def describe_run(run_path: Path) -> dict[str, Any]:
    """What a run changed, per decoder layer and module type: trained entries, entries that moved,
    and the relative size of the change ||dW|| / ||W||."""
    from dowser_cli.selection import layer_of

    run = open_run(run_path)
    info = run.sidecar["model"]
    source = resolve_source(info["spec"], random_init=bool(info.get("random_init")))
    base = load_model(source, load_config(source), getattr(torch, info.get("dtype", "float32")), "cpu",
                      tokenizer=False)
    tuned = load_run(run)
    rows: dict[str, dict[str, float]] = {}
    for name in run.params:
        w0 = base.model.get_parameter(name).detach().float()
        w1 = tuned.model.get_parameter(name).detach().float()
        layer = layer_of(name, info["layers_path"])
        typ = name.rsplit(".", 2)[-2] if name.endswith(".weight") or name.endswith(".bias") else name
        key = f"{'-' if layer is None else layer}\t{typ}"
        r = rows.setdefault(key, {"numel": 0, "trained": 0, "changed": 0, "sq_delta": 0.0, "sq_base": 0.0})
        r["numel"] += w0.numel()
        r["trained"] += w0.numel() if not run.params[name]["masked"] else int(
            artifacts.read_tensors(run.delta, [name])[name].numel())
        r["changed"] += int((w1 != w0).sum())
        r["sq_delta"] += float((w1 - w0).pow(2).sum())
        r["sq_base"] += float(w0.pow(2).sum())
    table = []
    for key, r in rows.items():
        layer, typ = key.split("\t")
        table.append({"layer": layer, "module": typ, "numel": r["numel"], "trained": r["trained"],
                      "changed": r["changed"], "rel_change": (r["sq_delta"] / max(r["sq_base"], 1e-30)) ** 0.5})
    return {"kind": "dowser.run", "path": str(run_path), "method": run.sidecar.get("method"),
            "model": info["spec"], "steps": run.sidecar.get("steps"), "tuned_layers": run.sidecar.get("tuned_layers"),
            "trainable": run.sidecar.get("trainable"), "rows": table}
