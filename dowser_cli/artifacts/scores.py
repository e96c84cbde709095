"""The scores artifact: per scored module its factors psi [P, out] and act [P, in] (`dowser probe`), or
the dense importance itself, ``score`` [out, in] with its ``score_std`` (`dowser import-scores`, from the
authors' per-module files: a mask from them is the same selection)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dowser_cli import artifacts


@dataclass
class ScoresFile:
    path: Path
    meta: dict[str, str]
    sidecar: dict[str, Any]
    modules: list[str]

    dense: bool = False   # importance matrices instead of factors

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """psi [P, out], act [P, in] of one module, read on demand (memory-mapped)."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"{module}.psi"), f.get_tensor(f"{module}.act")

    def score(self, module: str) -> torch.Tensor:
        """The dense importance [out, in] of one module (dense scores only)."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(f"{module}.score")


def open_scores(path: Path) -> ScoresFile:
    meta = artifacts.read_header(path, artifacts.SCORES_KIND)
    keys = artifacts.tensor_names(path)
    dense = any(k.endswith(".score") for k in keys)
    suffixes = (".score",) if dense else (".psi", ".act")
    modules = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(suffixes)})
    side_path = artifacts.sidecar_path(path)
    sidecar = artifacts.read_yaml(side_path) if side_path.exists() else {}
    return ScoresFile(path, meta, sidecar, modules, dense)
