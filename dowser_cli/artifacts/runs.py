"""Run directories (`dowser finetune`, `merge`): delta.safetensors + run.yaml (+ mask.safetensors)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dowser_cli import artifacts
from dowser_cli.errors import UserError


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


def run_outputs(delta: Path, mask_sha: str | None = None, full_bytes: int | None = None) -> dict[str, Any]:
    """run.yaml's ``outputs``: the delta (path relative to the run, sha256, bytes), the run's mask copy
    when it has one, and the size a full checkpoint of the model would take."""
    out: dict[str, Any] = {"delta": {"path": delta.name, "sha256": artifacts.sha256_file(delta),
                                     "bytes": delta.stat().st_size}}
    if mask_sha is not None:
        out["mask"] = {"path": "mask.safetensors", "sha256": mask_sha}
    if full_bytes is not None:
        out["full_checkpoint_bytes"] = full_bytes
    return out


SNAPSHOT_KIND = "dowser.snapshot"


def snapshot_dir(run: Path, step: int) -> Path:
    return run / "snapshots" / f"step-{step:06d}"


def snapshot_steps(run: Path) -> list[int]:
    """The steps a run directory holds snapshots of (`finetune --snapshot-every`), ascending."""
    d = run / "snapshots"
    if not d.is_dir():
        return []
    return sorted(int(x.name.removeprefix("step-")) for x in d.iterdir()
                  if x.name.startswith("step-") and x.name[5:].isdigit() and (x / "snapshot.yaml").is_file())


def split_spec(spec: Path) -> tuple[Path, int | None]:
    """``RUN@STEP`` -> (RUN, STEP); a plain path -> (path, None)."""
    text = str(spec)
    head, sep, tail = text.rpartition("@")
    if sep and tail.isdigit() and head:
        return Path(head), int(tail)
    return spec, None


def open_run(path: Path, step: int | None = None) -> RunDir:
    """Check a run directory's files and their recorded hashes (no model loaded); with ``step``, the
    run's snapshot at that step (which a run still training already has)."""
    if not path.is_dir():
        raise UserError(f"{path}: not a run directory")
    if step is not None:
        snap = snapshot_dir(path, step)
        if not (snap / "snapshot.yaml").is_file():
            have = snapshot_steps(path)
            raise UserError(f"{path}@{step}: no snapshot at step {step}; "
                            + (f"it has {', '.join(map(str, have))}" if have else
                               "it has none (finetune --snapshot-every N keeps them)"))
        if not (snap / "delta.safetensors").is_file():
            raise UserError(f"{path}@{step}: {snap / 'delta.safetensors'} is missing")
        return _open(path, snap / "snapshot.yaml", snap / "delta.safetensors")
    side_path = path / "run.yaml"
    if not side_path.is_file():
        hint = " (unfinished: it has a checkpoint; finish it with --resume)" if (path / "checkpoint").exists() else ""
        raise UserError(f"{path}: no run.yaml{hint}")
    return _open(path, side_path, path / "delta.safetensors")


def _open(path: Path, side_path: Path, delta: Path) -> RunDir:
    side = artifacts.read_yaml(side_path)
    if side_path.name == "snapshot.yaml" and side.get("outputs", {}).get("delta", {}).get("sha256") != \
            artifacts.sha256_file(delta):
        raise UserError(f"{delta}: does not match the sha256 in {side_path} (truncated or altered)")
    meta = artifacts.read_header(delta, artifacts.DELTA_KIND)
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
