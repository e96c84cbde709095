"""The scores artifact: per scored module its factors psi [P, out], act [P, in] and act_sq [B, in] (the
sum of squared inputs of each of the probe's B batches; `dowser probe`), or
the dense importance itself, ``score`` [out, in] with its ``score_std`` (`dowser import-scores`, from the
authors' per-module files: a mask from them is the same selection)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dowser_cli import artifacts
from dowser_cli.errors import UserError


@dataclass
class ScoresFile:
    path: Path
    meta: dict[str, str]
    sidecar: dict[str, Any]
    modules: list[str]

    dense: bool = False   # importance matrices instead of factors

    def factors(self, module: str, names: tuple[str, ...] = ("psi", "act")) -> dict[str, torch.Tensor]:
        """{name: tensor} of one module's factors, read on demand (memory-mapped): psi [P, out], act
        [P, in], act_sq [B, in] (each probe batch's sum of squared inputs)."""
        with safe_open(str(self.path), framework="pt") as f:
            have = set(f.keys())
            missing = [n for n in names if f"{module}.{n}" not in have]
            if missing:
                raise UserError(f"{self.path}: has no {module}.{missing[0]} (written by an earlier dowser probe, "
                                f"before it kept what this strategy reads); probe again")
            return {n: f.get_tensor(f"{module}.{n}") for n in names}

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
