"""`dowser import-scores`: the authors' per-module importance files as a dowser scores artifact.

setup (read every ``*.pt`` of the directory with ``torch.load(weights_only=True)``; the model's module
tree, no weights) -> compute (map the original LLaVA module names to the transformers ones, check
shapes) -> save (a scores artifact of the dense kind: ``<module>.score`` [out, in], the mean
importance, and ``<module>.score_std``, + its YAML).

The official script (``LLaVA/scripts/llava_importance_self_gen_prompt.py``) writes one file per scored
linear, ``{name with dots as underscores}.pt``, holding a dict: ``name`` (``llm.{i}.self_attn.q_proj``,
``llm.{i}.mlp.down_proj``, ``proj.{j}``, ``vision.{path}``, ``lm_head``), ``importance_matrix_mean`` and
``importance_matrix_std`` [out, in] (bf16 by default), ``W_shape``, ``W_fro``, ``num_samples``. Their mean
is dowser's score (the mean over probes of psi_i |W_ij| a_j), so `dowser mask` selects from it exactly
as from a probe's factors."""
from __future__ import annotations

import pickle
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dowser_cli import artifacts
from dowser_cli.errors import UserError
from dowser_cli.models import load_config, meta_model, resolve_source
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.progress import stderr_console
from dowser_cli.runtime import resolve_dtype
from dowser_cli.selection import layer_of

REQUIRED = ("name", "importance_matrix_mean", "importance_matrix_std")
LLM = re.compile(r"^llm\.(\d+)\.(.+)$")


def read_official(directory: Path) -> dict[str, dict[str, Any]]:
    """{original name: the file's dict} for every ``*.pt`` in ``directory`` (weights_only loads only)."""
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    files = sorted(directory.glob("*.pt"))
    if not files:
        raise UserError(f"{directory}: no .pt files (expected the official llm_<i>_<module>.pt layout)")
    out = {}
    for f in files:
        try:
            d = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
            raise UserError(f"{f}: not a torch file that loads with weights_only=True "
                            f"({str(e).splitlines()[0][:120]})") from None
        if not isinstance(d, dict) or any(k not in d for k in REQUIRED):
            raise UserError(f"{f}: expected a dict with {', '.join(REQUIRED)}")
        if d["name"] in out:
            raise UserError(f"{f}: a second file for {d['name']}")
        out[str(d["name"])] = d
    return out


def map_names(names: list[str], model: nn.Module, parts) -> dict[str, str]:
    """{original name: transformers module name}. ``proj.{j}``: the projector's linears in order;
    ``vision.{path}``: under the vision tower; ``llm.{i}.{sub}``: decoder layer i."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    proj_orig = sorted((n for n in names if n.startswith("proj.")), key=lambda n: [int(x) if x.isdigit() else x
                                                                                 for x in n.split(".")[1:]])
    proj_hf = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and parts.projector
               and n.startswith(parts.projector + ".")]
    if proj_orig and len(proj_orig) != len(proj_hf):
        raise UserError(f"{len(proj_orig)} projector files but the model's projector has {len(proj_hf)} linears")
    out = dict(zip(proj_orig, proj_hf))
    for n in names:
        if n in out:
            continue
        if n == "lm_head":
            target = parts.lm_head
        elif (m := LLM.match(n)):
            target = f"{parts.layers_path}.{m.group(1)}.{m.group(2)}"
        elif n.startswith("vision.") and parts.vision_tower:
            target = f"{parts.vision_tower}.{n.removeprefix('vision.')}"
        else:
            target = None
        if target not in linears:
            raise UserError(f"{n}: no such linear in the model ({target or 'no mapping'}); the files are from "
                            f"another architecture or layout")
        out[n] = target
    return out


def run(directory: Path, model_spec: str, out: Path, dtype: str = "float32", random_init: bool = False,
        command: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    artifacts.check_writable(out)
    official = read_official(directory)
    source = resolve_source(model_spec, random_init=random_init)
    config = load_config(source)
    torch_dtype = resolve_dtype(dtype, "cpu")
    model = meta_model(source, config, torch_dtype)   # names and shapes only
    adapter = adapter_for_config(config)
    parts = resolve_parts(adapter, model)
    names = map_names(list(official), model, parts)
    tensors, modules = {}, {}
    for orig, target in sorted(names.items(), key=lambda kv: kv[1]):
        d = official[orig]
        weight = model.get_submodule(target).weight
        mean, std = d["importance_matrix_mean"], d["importance_matrix_std"]
        for what, t in (("mean", mean), ("std", std)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(weight.shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise UserError(f"{orig}: importance_matrix_{what} is {got}, {target}.weight is "
                                f"{tuple(weight.shape)}")
        mean = mean.float()
        if not bool(torch.isfinite(mean).all()) or bool((mean < 0).any()):
            raise UserError(f"{orig}: importance_matrix_mean holds negative or non-finite values")
        tensors[f"{target}.score"] = mean.contiguous()
        tensors[f"{target}.score_std"] = std.float().contiguous()
        modules[target] = {"type": target.rsplit(".", 1)[-1], "layer": layer_of(target, parts.layers_path),
                           "shape": list(weight.shape), "official_name": orig,
                           "num_samples": int(d.get("num_samples", 0) or 0),
                           "score_mean": float(mean.mean())}
    fingerprint = artifacts.model_fingerprint(model)
    meta = artifacts.base_metadata(artifacts.SCORES_KIND, fingerprint, scores_form="dense",
                                   source_sha256=artifacts.files_digest(directory, directory.glob("*.pt")))
    sidecar = {
        **artifacts.sidecar_header(artifacts.SCORES_KIND, command),
        "form": "dense (imported)",
        "model": {"spec": source.spec, "random_init": source.random_init, "adapter": adapter.name,
                  "dtype": str(torch_dtype).removeprefix("torch."), "fingerprint": fingerprint,
                  "layers_path": parts.layers_path, "num_layers": parts.num_layers},
        "inputs": {"official_dir": str(directory), "files": len(official), "sha256": meta["source_sha256"]},
        "modules": modules,
        "timings": {"total_s": round(time.perf_counter() - t0, 3)},
    }
    artifacts.write_safetensors(out, tensors, meta)
    artifacts.write_yaml(artifacts.sidecar_path(out), sidecar)
    stderr_console().print(f"{out}: {len(modules)} modules imported from {directory} (dense scores)")
    return sidecar

