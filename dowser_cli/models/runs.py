"""The fine-tuned model of a run directory: its base model with the run's delta applied."""
from __future__ import annotations

import torch

from dowser_cli import artifacts
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import RunDir
from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel, load_config, load_model, resolve_source


def digest_dtype(sidecar: dict) -> torch.dtype:
    """The dtype a run's base weights digest was read in: the run's own, or the mask's where the run
    trained in another (the HF Trainer in bf16 with a mask probed in fp32)."""
    info = sidecar["model"]
    return getattr(torch, info.get("weights_digest_dtype", info.get("dtype", "float32")))


def apply_delta(lm: LoadedModel, run: RunDir) -> None:
    """Write the run's trained values into the (base) model in place."""
    run_dtype = getattr(torch, run.sidecar["model"].get("dtype", "float32"))
    if artifacts.model_fingerprint(lm.model, run_dtype) != run.meta["model_fingerprint"]:
        raise UserError(f"{run.path}: was fine-tuned from a different base model than {lm.source.spec} "
                        f"(fingerprint mismatch)")
    # the digest reads values, which depend on the dtype loaded; compare it where they are comparable
    if artifacts.held_in(lm.model, digest_dtype(run.sidecar)) and \
            artifacts.weights_digest(lm.model) != run.meta.get("weights_digest"):
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
