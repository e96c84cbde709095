"""The mask artifact (`dowser mask`, `combine`): packed trainable bits per masked parameter."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dowser_cli import artifacts, scoring
from dowser_cli.errors import UserError


def param_entry(shape: list[int], dtype: str, trainable: int) -> dict[str, Any]:
    numel = 1
    for d in shape:
        numel *= d
    return {"shape": shape, "dtype": dtype, "numel": numel, "trainable": trainable,
            "fraction": round(trainable / numel, 6)}


def write_mask(out: Path, packed: dict[str, torch.Tensor], params: dict[str, dict], fingerprint: str,
               digest: str, meta_extra: dict[str, Any], sidecar: dict[str, Any]) -> dict[str, Any]:
    """The one writer of mask artifacts: packed bits + the parameter table in the metadata, and the
    YAML sidecar (``sidecar`` fields, then totals and per-parameter counts)."""
    shapes = {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in params.items()}
    meta = artifacts.base_metadata(artifacts.MASK_KIND, fingerprint, weights_digest=digest,
                                   params=json.dumps(shapes, sort_keys=True), **meta_extra)
    numel = sum(v["numel"] for v in params.values())
    trainable = sum(v["trainable"] for v in params.values())
    sidecar = {**sidecar, "totals": {"numel": numel, "trainable": trainable,
                                     "fraction": round(trainable / max(numel, 1), 6)}, "params": params}
    artifacts.write_safetensors(out, packed, meta)
    artifacts.write_yaml(artifacts.sidecar_path(out), sidecar)
    return sidecar


@dataclass
class MaskFile:
    path: Path
    meta: dict[str, str]
    params: dict[str, dict]   # name -> {"shape", "dtype"}

    def packed(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def numel(self, name: str) -> int:
        n = 1
        for d in self.params[name]["shape"]:
            n *= d
        return n

    @property
    def dtype(self) -> torch.dtype | None:
        """The model dtype the mask's fingerprint was computed in (None when its tensors disagree)."""
        dtypes = {v["dtype"] for v in self.params.values()}
        return getattr(torch, dtypes.pop()) if len(dtypes) == 1 else None

    def dense(self, name: str) -> torch.Tensor:
        return scoring.unpack_bits(self.packed(name), self.numel(name)).reshape(self.params[name]["shape"])


def open_mask(path: Path) -> MaskFile:
    meta = artifacts.read_header(path, artifacts.MASK_KIND)
    try:
        params = json.loads(meta["params"])
    except (KeyError, ValueError):
        raise UserError(f"{path}: mask metadata has no readable parameter table") from None
    names = set(artifacts.tensor_names(path))
    if names != set(params):
        raise UserError(f"{path}: tensors and parameter table disagree")
    mf = MaskFile(path, meta, params)
    for name in params:
        want = (mf.numel(name) + 7) // 8
        with safe_open(str(path), framework="pt") as f:
            got = f.get_slice(name).get_shape()
        if list(got) != [want]:
            raise UserError(f"{path}: {name} has {got} packed bytes, its shape needs [{want}]")
    return mf
