"""The Python API: a dowser mask inside a training loop of your own (DESIGN section 3, integrations).

    import dowser_cli as dowser
    mask = dowser.load_mask("mask.safetensors", model)      # checks the mask was made from this model
    opt = dowser.MaskedAdamW.for_model(model, mask, lr=2e-5, weight_decay=0.0)
    batch = dowser.collate(dowser.read_examples("train.json", tokenizer, processor), tokenizer, processor)
    for step in range(100):                                 # (your loop: batches, schedule, logging)
        model(**batch).loss.backward()
        opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    dowser.save_delta(model, mask, "runs/mine")             # `dowser export / eval-forgetting / merge / inspect`

`dowser finetune` is built on the same pieces (the masked AdamW, the delta writer, the run directory's
format), so a run written here is read exactly as one of its runs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from dowser_cli import artifacts, data, models
from dowser_cli.artifacts.masks import MaskFile, open_mask
from dowser_cli.artifacts.runs import run_outputs
from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel, resolve_source
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.optim import MaskedAdamW
from dowser_cli.progress import stderr_console
from dowser_cli.runtime import resolve_dtype
from dowser_cli.selection import layer_of
from dowser_cli.training import Trainable, write_delta


@dataclass
class Mask:
    """A mask checked against one model: which entries of which parameters may train.

    ``dense``: {parameter name: bool tensor of the parameter's shape, on its device} (True = trainable).
    ``weights_digest``: the base model's, from the mask file (the run's delta records it, so that
    export and eval-forgetting check they apply it to the same base)."""

    path: Path
    file: MaskFile
    dense: dict[str, torch.Tensor]
    fingerprint: str
    weights_digest: str
    model_spec: str | None        # the model the mask was made from, as its sidecar names it
    random_init: bool

    @property
    def trainable(self) -> int:
        return sum(int(m.sum()) for m in self.dense.values())

    def __repr__(self) -> str:
        numel = sum(m.numel() for m in self.dense.values())
        return (f"Mask({str(self.path)!r}, {len(self.dense)} tensors, {self.trainable:,} of {numel:,} entries "
                f"trainable)")


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", random_init: bool = False,
               trust_remote_code: bool = False) -> LoadedModel:
    """A model as every dowser command loads it: an alias (`dowser configs`), a local
    ``save_pretrained`` directory or a hub id. ``.model``, ``.tokenizer``, ``.processor``."""
    source = resolve_source(spec, random_init=random_init, trust_remote_code=trust_remote_code)
    return models.load_model(source, models.load_config(source), resolve_dtype(dtype, device), device)


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def load_mask(path: str | os.PathLike, model: nn.Module) -> Mask:
    """Read a mask artifact and check it against ``model`` (a transformers model): its fingerprint
    (parameter names, shapes; in the dtype the mask was made for) and, when the dtypes agree, the
    weights digest (the same base weights). Raises ``dowser_cli.errors.UserError`` saying which differs."""
    path = Path(path)
    mf = open_mask(path)
    mask_dtype = mf.dtype
    fp = artifacts.model_fingerprint(model, mask_dtype)
    if mf.meta.get("model_fingerprint") != fp:
        raise UserError(f"{path}: was made from a different model (fingerprint {mf.meta.get('model_fingerprint', '?')[:12]}"
                        f" != {fp[:12]}: other parameter names, shapes or dtype)")
    digest = mf.meta.get("weights_digest", "")
    if digest and mask_dtype in (None, _model_dtype(model)) and digest != artifacts.weights_digest(model):
        raise UserError(f"{path}: was made from different weights (same architecture, weights digest differs); "
                        f"load the mask before training, on the base model")
    named = dict(model.named_parameters())
    dense = {n: mf.dense(n).to(named[n].device) for n in mf.params}
    side = artifacts.sidecar_path(path)
    info = artifacts.read_yaml(side).get("model", {}) if side.exists() else {}
    return Mask(path, mf, dense, fp, digest, info.get("spec"), bool(info.get("random_init")))


def read_examples(path: str | os.PathLike, tokenizer, processor=None, image_folder: str | os.PathLike | None = None,
                  max_len: int = 2048, stop_ids: list[int] | None = None) -> list[data.Example]:
    """A training file (any layout `dowser finetune --data` reads: LLaVA, LLaMA-Factory sharegpt,
    OpenAI-style messages) encoded exactly as finetune encodes it: token ids, labels on the assistant
    turns only (each to its turn end: the tokenizer's EOS or one of ``stop_ids``, e.g. the model's
    ``generation_config.eos_token_id``), the image path."""
    ds = data.read_dataset(tokenizer, processor, Path(path), Path(image_folder) if image_folder else None, max_len,
                           False, stderr_console(), stop_ids)
    return ds.examples


def collate(examples: list[data.Example], tokenizer, processor=None) -> dict[str, torch.Tensor]:
    """A padded batch: input_ids, attention_mask, labels [B, T] (and pixel_values for image records)."""
    return data.collate(list(examples), data.pad_id(tokenizer), processor)


def save_delta(model: nn.Module, mask: Mask, out: str | os.PathLike, train: Iterable[str] = (),
               base: str | None = None, method: str = "dowser-mask", steps: int | None = None,
               overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write ``out`` as a run directory (delta.safetensors with the mask's trainable values and the
    ``train`` parameters whole, mask.safetensors, run.yaml) that `dowser export`, `eval-forgetting`,
    `merge` and `inspect` read. ``base``: the base model as those commands should load it (an alias,
    a directory or a hub id; default: the model the mask's scores were probed on). ``overwrite``:
    replace an earlier run in ``out`` (whole, never half). Returns ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "run.yaml").exists():
            raise UserError(f"{out}: holds files and no run; choose an empty or new directory")
        if not overwrite:
            raise UserError(f"{out}: already holds a run (overwrite=True replaces it)")
    spec = base or mask.model_spec
    if not spec:
        raise UserError(f"{mask.path}: its sidecar names no model; pass base= (how to load the base model)")
    named = dict(model.named_parameters())
    adapter = adapter_for_config(model.config)
    parts = resolve_parts(adapter, model)
    names = [*mask.dense, *train]
    layers = sorted({layer_of(n, parts.layers_path) for n in names} - {None})
    tr = Trainable({n: named[n] for n in names}, dict(mask.dense), layers)
    fingerprint = artifacts.model_fingerprint(model)
    with artifacts.replace_dir(out) as tmp:   # the directory appears whole or not at all
        artifacts.copy_with_sidecar(mask.path, tmp / "mask.safetensors")
        mask_sha = artifacts.sha256_file(tmp / "mask.safetensors")
        delta = tmp / "delta.safetensors"
        write_delta(delta, tr, fingerprint, mask.weights_digest, mask_sha)
        sidecar = {
            **artifacts.sidecar_header("dowser.run", "python: dowser_cli.save_delta"),
            "method": method,
            "model": {"spec": spec, "random_init": mask.random_init and base is None, "adapter": adapter.name,
                      "dtype": str(_model_dtype(model)).removeprefix("torch."),
                      "device": str(next(iter(named.values())).device), "fingerprint": fingerprint,
                      "weights_digest": mask.weights_digest, "layers_path": parts.layers_path,
                      # the digest is the mask's, read in the dtype it was made in (a bf16 run from an
                      # fp32 probe: readers compare it where they load that dtype)
                      **({"weights_digest_dtype": str(mask.file.dtype).removeprefix("torch.")}
                         if mask.file.dtype not in (None, _model_dtype(model)) else {}),
                      "num_layers": parts.num_layers},
            "inputs": {"mask": {"path": str(mask.path), "sha256": mask_sha}},
            "outputs": run_outputs(delta, mask_sha, sum(q.numel() * q.element_size() for q in model.parameters())),
            "tuned_layers": layers,
            "trainable": tr.counts(),
            **({"steps": steps} if steps is not None else {}),
            **(extra or {}),
        }
        artifacts.write_yaml(tmp / "run.yaml", sidecar)
    return out


__all__ = ["Mask", "MaskedAdamW", "collate", "load_mask", "load_model", "read_examples", "save_delta"]
