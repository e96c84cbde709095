"""`dowser export`: a run directory's fine-tuned model (base + delta) as a plain `save_pretrained`
checkpoint with its tokenizer/processor."""
from __future__ import annotations

from pathlib import Path

import torch

from dowser_cli import artifacts
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import open_run
from dowser_cli.errors import UserError
from dowser_cli.models import load_config, load_model, resolve_source
from dowser_cli.models.runs import load_run


def _out_parent(out: Path) -> Path:
    """``out`` must be new or empty, its parent a directory (or creatable). Returns the parent."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    return parent


def export(run_path: Path, out: Path, dtype: str | None = None) -> Path:
    """Write a save_pretrained directory (weights, config, tokenizer/processor) of the fine-tuned model."""
    parent = _out_parent(out)
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



FORMATS = ("checkpoint", "peft")


def peft_sparsity(counts: dict[str, tuple[int, int]]) -> float | None:
    """A ``sparsity`` s for which PEFT's Super-Tuning count rule ``int(numel * (1 - s))`` gives every
    matrix exactly its mask's k, or None where none exists. ``counts``: name -> (k, numel). The rule
    needs k_i <= numel_i (1 - s) < k_i + 1 for all i: the intersection of those intervals, checked
    again in float arithmetic exactly as PEFT computes it."""
    lo = max(k / n for k, n in counts.values())
    hi = min((k + 1) / n for k, n in counts.values())
    if not lo < hi:
        return None
    for t in (lo + (hi - lo) / 2, lo + (hi - lo) / 4, lo + 3 * (hi - lo) / 4):
        s = 1.0 - t
        if 0.0 <= s < 1.0 and all(int(n * (1 - s)) == k for k, n in counts.values()):
            return s
    return None


def _supertuning_layout(run_path: Path, run, mf) -> tuple[dict[str, str], float, list[str]]:
    """What a Super-Tuning adapter of this masked run holds: {masked weight: its linear}, the one
    sparsity whose count rule gives every mask's k, the densely trained modules (modules_to_save).
    Everything it cannot hold is one UserError."""
    masked = [n for n, v in run.params.items() if v["masked"]]
    bad = [n for n in masked if not n.endswith(".weight")]
    if bad:
        raise UserError(f"{bad[0]}: a masked tensor that is not a linear's weight; PEFT's Super-Tuning adapts "
                        f"linear weights only")
    counts = {n: (int(mf.dense(n).sum()), mf.numel(n)) for n in masked}
    sparsity = peft_sparsity(counts)
    if sparsity is None:
        ks = sorted(counts.items(), key=lambda kv: kv[1][0] / kv[1][1])
        raise UserError(f"{run_path}: PEFT's Super-Tuning keeps int(numel * (1 - sparsity)) entries of every "
                        f"matrix, and no one sparsity gives this mask's counts (e.g. {ks[0][0]}: {ks[0][1][0]} of "
                        f"{ks[0][1][1]}, {ks[-1][0]}: {ks[-1][1][0]} of {ks[-1][1][1]}); build the mask with "
                        f"`dowser mask --count-rule peft` (one rate per matrix, PEFT's rounding)")
    modules = {n: n.rsplit(".", 1)[0] for n in masked}
    dense_modules = sorted({n.rsplit(".", 1)[0] for n, v in run.params.items() if not v["masked"]})
    clash = sorted(set(dense_modules) & set(modules.values()))
    if clash:
        raise UserError(f"{clash[0]}: has a masked weight and a densely trained tensor (its bias); a Super-Tuning "
                        f"adapter cannot hold both")
    return modules, sparsity, dense_modules


def export_peft(run_path: Path, out: Path) -> Path:
    """Write the run as a PEFT adapter directory (``PeftModel.from_pretrained(base, out)``): a masked
    run as a Super-Tuning adapter whose precomputed indices are the mask's trainable entries and whose
    values are the fine-tuned minus the base values there, densely trained modules (norms) through
    ``modules_to_save``; a run of a PEFT method (LoRA, OSF, Super-Tuning) as the adapter it trained."""
    import shutil

    parent = _out_parent(out)
    run = open_run(run_path)
    parent.mkdir(parents=True, exist_ok=True)
    adapter = run.path / "adapter"
    if adapter.is_dir():            # --method lora | osf | supertuning kept PEFT's own adapter
        with artifacts.atomic_dir(parent / out.name) as tmp:
            for f in adapter.iterdir():
                shutil.copy2(f, tmp / f.name)
        return out
    if run.mask is None:
        raise UserError(f"{run_path}: {run.sidecar.get('method', 'this run')} trained whole matrices (no mask): "
                        f"there is no sparse adapter to write; export it as a checkpoint (--format checkpoint)")
    from peft import SupertuningConfig, get_peft_model

    mf = open_mask(run.mask)
    modules, sparsity, dense_modules = _supertuning_layout(run_path, run, mf)
    info = run.sidecar["model"]
    source = resolve_source(info["spec"], random_init=bool(info.get("random_init")))
    lm = load_model(source, load_config(source), getattr(torch, info.get("dtype", "float32")), "cpu")
    values = artifacts.read_tensors(run.delta)
    config = SupertuningConfig(target_modules=sorted(modules.values()), sparsity=sparsity,
                               modules_to_save=dense_modules or None, save_precomputed_indices=True)
    model = get_peft_model(lm.model, config)
    inner = model.base_model.model
    with torch.no_grad():
        for n, module in modules.items():   # the mask's entries and their change from the base
            layer = inner.get_submodule(module)
            w = layer.get_base_layer().weight
            idx = mf.dense(n).reshape(-1).nonzero().squeeze(1)
            layer.supertuning_indices["default"] = idx.to(torch.int32)
            layer.supertuning_values["default"].data = values[n].float() - w.detach().reshape(-1)[idx].float()
        for n, v in run.params.items():     # densely trained tensors: the modules_to_save copies
            if not v["masked"]:
                module, attr = n.rsplit(".", 1)
                target = getattr(inner.get_submodule(module).modules_to_save["default"], attr)
                target.copy_(values[n].reshape(target.shape))
    with artifacts.atomic_dir(parent / out.name) as tmp:
        model.save_pretrained(tmp)
        artifacts.write_yaml(tmp / "dowser_export.yaml", {
            **artifacts.sidecar_header("dowser.export", f"dowser export {run_path} --format peft --out {out}"),
            "run": str(run_path), "format": "peft-supertuning", "delta_sha256": artifacts.sha256_file(run.delta),
            "sparsity": sparsity, "base_model": run.sidecar["model"]})
    return out
