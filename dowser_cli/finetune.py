"""`dowser finetune`: sparse fine-tuning that never moves a frozen weight (DESIGN sections 1 and 2).

setup (config, model, what trains, data) -> train (masked AdamW, checkpoints, Ctrl-C) -> save
(`delta.safetensors` with only the trainable values, `run.yaml`, the mask used).

A run directory holds: ``delta.safetensors`` + ``run.yaml`` (the product), ``mask.safetensors`` (+ .yaml)
when a mask was used, and ``checkpoint/`` while a run is unfinished (trainable values, optimiser state,
step), from which ``--resume`` continues bit for bit."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dowser_cli import artifacts, data, distributed
from dowser_cli.errors import Interrupted, UserError
from dowser_cli.models import (LoadedModel, ModelSource, load_config, load_model, meta_model, num_decoder_layers,
                               resolve_source)
from dowser_cli.models.registry import adapter_for_config, resolve_parts
from dowser_cli.optim import MaskedAdamW
from dowser_cli.probe import resolve_device, resolve_dtype
from dowser_cli.progress import stderr_console
from dowser_cli.resources import host_peak_since_reset_mb, peak_memory, reset_host_peak
from dowser_cli.selection import TARGETS, layer_of, parse_layers, parse_targets

DELTA_KIND = "dowser.delta"
CHECKPOINT_KIND = "dowser.checkpoint"
DEFAULT_LAYERS = "last:20"  # the paper's 20 of LLaVA's 32; all layers on models with fewer
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
NAN_POLICIES = ("stop", "skip-step")


@dataclass
class FinetuneConfig:
    method: str = ""              # "" = masked with --mask, else full-ft (methods.finetuning)
    lr: float = 2e-5
    projector_lr: float = 0.0     # > 0: its own peak lr for a trained projector (e.g. a fresh one); 0 = lr
    epochs: float = 5.0
    max_steps: int = 0            # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0    # 0 disables clipping
    tune_layers: str = ""         # "" = the mask's layers, or last:20 (all on smaller models) without one
    targets: str = "attn,mlp"     # which linears of the tuned layers train (attn: q/k/v/o; mlp: gate/up/down)
    ratio: float = 0.1            # when --mask is a scores file
    train_projector: bool = False
    train_vision_tower: bool = False
    train_embeddings: bool = False
    train_lm_head: bool = False
    freeze_norms: bool = False
    gradient_checkpointing: bool = False
    max_len: int = 2048
    skip_bad: bool = False
    seed: int = 0
    save_every: int = 0           # optimiser steps between checkpoints; 0 = only on interrupt
    nan_policy: str = "stop"      # a non-finite loss or gradient norm: stop | skip-step (drop that update)
    nan_max_skips: int = 5        # skip-step: stop after this many non-finite steps in a row
    lora_r: int = 8               # --method lora
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    osf_effective_rank: float = 0.5   # --method osf: frozen top singular directions (fraction, or a count if > 1)
    dtype: str = "auto"
    device: str = "auto"
    strategy: str = ""            # ddp | fsdp under torchrun / accelerate launch; "" = ddp there, none alone

    def training_digest(self) -> str:
        """What must match for --resume to continue the same run (save_every may change; so may the
        strategy, whose checkpoints share one layout). Under a launcher the batch is the global one."""
        d = dataclasses.asdict(self)
        d.pop("save_every")
        d.pop("nan_policy")       # they decide what happens after a divergence, not the numbers before it
        d.pop("nan_max_skips")
        d.pop("device")
        d.pop("strategy")
        d["batch_size"] *= distributed.world_size()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: FinetuneConfig) -> None:
    checks = [
        (cfg.lr > 0, f"--lr {cfg.lr}: must be > 0"),
        (cfg.projector_lr >= 0, f"--projector-lr {cfg.projector_lr}: must be >= 0"),
        (cfg.epochs > 0 or cfg.max_steps > 0, "--epochs must be > 0 (or give --max-steps)"),
        (cfg.max_steps >= 0, f"--max-steps {cfg.max_steps}: must be >= 0"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be >= 1"),
        (cfg.grad_accum >= 1, f"--grad-accum {cfg.grad_accum}: must be >= 1"),
        (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: must be >= 0"),
        (0 <= cfg.warmup_ratio < 1, f"--warmup-ratio {cfg.warmup_ratio}: must be in [0, 1)"),
        (cfg.lr_scheduler in SCHEDULERS, f"lr_scheduler {cfg.lr_scheduler!r}: expected one of {', '.join(SCHEDULERS)}"),
        (0 < cfg.ratio <= 1, f"--ratio {cfg.ratio}: must be in (0, 1]"),
        (cfg.max_len >= 8, f"--max-len {cfg.max_len}: must be >= 8"),
        (cfg.save_every >= 0, f"--save-every {cfg.save_every}: must be >= 0"),
        (cfg.nan_policy in NAN_POLICIES, f"--nan-policy {cfg.nan_policy!r}: expected one of {', '.join(NAN_POLICIES)}"),
        (cfg.nan_max_skips >= 1, f"--nan-max-skips {cfg.nan_max_skips}: must be >= 1"),
        (cfg.lora_r >= 1, f"--lora-r {cfg.lora_r}: must be >= 1"),
        (cfg.lora_alpha > 0, f"--lora-alpha {cfg.lora_alpha}: must be > 0"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)"),
        (cfg.osf_effective_rank > 0 and (cfg.osf_effective_rank < 1 or float(cfg.osf_effective_rank).is_integer()),
         f"--osf-effective-rank {cfg.osf_effective_rank}: a fraction in (0, 1) or a whole number of directions"),
        (cfg.strategy in ("",) + distributed.STRATEGIES,
         f"--strategy {cfg.strategy!r}: expected one of {', '.join(distributed.STRATEGIES)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    parse_targets(cfg.targets)


# ---- setup: what trains -----------------------------------------------------------------------------------

@dataclass
class MaskInput:
    """The mask as given: a mask artifact, or scores to build one from (``--mask scores --ratio``)."""

    path: Path
    kind: str                      # dowser.mask | dowser.scores
    meta: dict[str, str]
    layers: list[int] | None       # decoder layers the mask covers
    dtype: torch.dtype             # the model dtype the artifact's fingerprint was computed in


def open_mask_input(path: Path) -> MaskInput:
    from dowser_cli import mask as mask_mod

    meta = artifacts.read_header(path)
    kind = meta.get("dowser_kind")
    if kind == artifacts.MASK_KIND:
        mf = mask_mod.open_mask(path)
        dtypes = {v["dtype"] for v in mf.params.values()}
        side = artifacts.sidecar_path(path)
        layers = artifacts.read_yaml(side).get("layers") if side.exists() else None
        return MaskInput(path, kind, meta, layers, getattr(torch, dtypes.pop() if len(dtypes) == 1 else "float32"))
    if kind == artifacts.SCORES_KIND:
        sf = mask_mod.open_scores(path)
        return MaskInput(path, kind, meta, None, getattr(torch, sf.sidecar.get("model", {}).get("dtype", "float32")))
    raise UserError(f"--mask {path}: is a {kind} artifact, expected a mask or a scores file")


@dataclass
class Trainable:
    """The parameters that train: name -> parameter, and the trainable masks of the masked ones."""

    params: dict[str, nn.Parameter]
    masks: dict[str, torch.Tensor]  # bool, parameter's shape
    layers: list[int]

    def counts(self) -> dict[str, int]:
        numel = sum(p.numel() for p in self.params.values())
        trainable = sum(int(self.masks[n].sum()) if n in self.masks else p.numel() for n, p in self.params.items())
        return {"params": len(self.params), "masked_params": len(self.masks), "numel": numel,
                "trainable_entries": trainable}


def _layer_params(lm: LoadedModel, layers: list[int]) -> dict[str, nn.Parameter]:
    prefix = lm.parts.layers_path
    return {n: p for n, p in lm.model.named_parameters() if layer_of(n, prefix) in layers}


def _is_norm(name: str, p: nn.Parameter) -> bool:
    return p.dim() == 1 and ("norm" in name.rsplit(".", 2)[-2].lower() or "ln" in name.rsplit(".", 2)[-2].lower())


def _part_params(lm: LoadedModel, part: str | None, flag: str) -> dict[str, nn.Parameter]:
    if part is None:
        raise UserError(f"{flag}: the {lm.adapter.name} model has no such part")
    return {f"{part}.{n}": p for n, p in lm.model.get_submodule(part).named_parameters()}


def select_trainable(lm: LoadedModel, cfg: FinetuneConfig, layers: list[int],
                     masks: dict[str, torch.Tensor]) -> Trainable:
    """Decoder layers ``layers``: masked linears train inside their masks, other linears, biases and
    (unless --freeze-norms) norms densely; projector / vision tower / embeddings / lm_head only when
    asked. Everything else is frozen (requires_grad False)."""
    model = lm.model
    model.requires_grad_(False)
    targets = parse_targets(cfg.targets)
    # a linear of an untargeted kind (e.g. the MLP under --targets attn) stays frozen, bias included
    untargeted = [TARGETS[t] for t in TARGETS if t not in targets]
    chosen = {n: p for n, p in _layer_params(lm, layers).items() if not (cfg.freeze_norms and _is_norm(n, p))
              and not any(rx.search(n) for rx in untargeted)}
    if cfg.train_projector:
        chosen.update(_part_params(lm, lm.parts.projector, "--train-projector"))
    if cfg.train_vision_tower:
        chosen.update(_part_params(lm, lm.parts.vision_tower, "--train-vision-tower"))
    if cfg.train_embeddings:
        emb = model.get_input_embeddings()
        chosen.update({n: p for n, p in model.named_parameters() if p is emb.weight})
    if cfg.train_lm_head:
        head = model.get_output_embeddings()
        chosen.update({n: p for n, p in model.named_parameters() if head is not None and p is head.weight})
    missing = sorted(set(masks) - set(chosen))
    if missing:
        raise UserError(f"--mask: {missing[0]} (and {len(missing) - 1} more) is masked but not tuned (--tune-layers "
                        f"{cfg.tune_layers or '(default)'}, --targets {cfg.targets}); use the mask's layers and "
                        f"targets") if len(missing) > 1 else \
            UserError(f"--mask: {missing[0]} is masked but not tuned (--tune-layers "
                      f"{cfg.tune_layers or '(default)'}, --targets {cfg.targets})")
    if masks:
        # a tuned layer's targeted linear without a mask would silently train densely
        uncovered = [n for n, p in chosen.items() if layer_of(n, lm.parts.layers_path) is not None and p.dim() == 2
                     and any(TARGETS[t].search(n) for t in TARGETS) and n not in masks]
        if uncovered:
            raise UserError(f"--tune-layers {cfg.tune_layers or '(default)'}: {uncovered[0]} is tuned but the mask "
                            f"does not cover it ({len(uncovered)} such); tune the mask's layers and --targets, "
                            f"or build a mask for these")
    for p in chosen.values():
        p.requires_grad_(True)
    return Trainable(chosen, masks, layers)


# ---- setup: the plan -------------------------------------------------------------------------------------

@dataclass
class Plan:
    cfg: FinetuneConfig
    source: ModelSource
    config: Any
    device: str
    dtype: torch.dtype
    layers: list[int]
    mask: MaskInput | None
    out: Path
    method: Any                    # methods.FinetuneMethod


def resolve_method(cfg: FinetuneConfig, mask_path: Path | None):
    """The registered method; with no --method, masked when there is a mask, else full-ft."""
    from dowser_cli.methods.finetuning import FINETUNE_METHODS

    name = cfg.method or ("masked" if mask_path else "full-ft")
    method = FINETUNE_METHODS.get(name, "--method")
    if method.mask == "required" and mask_path is None:
        raise UserError(f"--method {name}: needs --mask (a mask from `dowser mask`, or scores with --ratio)")
    if method.mask == "forbidden" and mask_path is not None:
        raise UserError(f"--method {name}: takes no --mask (it decides itself which weights move)")
    cfg.method = name  # the resolved name is what run.yaml and --resume see
    return method


def plan(model_spec: str, cfg: FinetuneConfig, out: Path, mask_path: Path | None, random_init: bool,
         resume: bool) -> Plan:
    """Everything checkable before weights load: options, output dir, model config, the mask's model."""
    validate(cfg)
    method = resolve_method(cfg, mask_path)
    _check_out(out, resume)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = resolve_source(model_spec, random_init=random_init)
    config = load_config(source)
    adapter = adapter_for_config(config)
    n_layers = num_decoder_layers(config)
    mask = open_mask_input(mask_path) if mask_path else None
    if mask is not None:
        meta = meta_model(source, config, mask.dtype)
        fp = artifacts.model_fingerprint(meta)
        if mask.meta.get("model_fingerprint") != fp:
            raise UserError(f"--mask {mask.path}: was made from a different model than {model_spec} "
                            f"(fingerprint {mask.meta.get('model_fingerprint', '?')[:12]} != {fp[:12]})")
        if mask.layers is None and mask.kind == artifacts.MASK_KIND:
            parts = resolve_parts(adapter, meta)
            mask.layers = sorted({layer_of(n, parts.layers_path) for n in artifacts.tensor_names(mask.path)} - {None})
        del meta
    spec = cfg.tune_layers or (_ranges_spec(mask.layers) if mask is not None and mask.layers else
                               ("all" if n_layers < 20 else DEFAULT_LAYERS))
    layers = parse_layers(spec, n_layers, "--tune-layers")
    if mask is not None and mask.layers is not None and cfg.tune_layers and layers != list(mask.layers):
        raise UserError(f"--tune-layers {cfg.tune_layers}: the mask {mask.path} covers layers "
                        f"{_ranges_spec(mask.layers)}; tune exactly those or make a mask for these layers")
    return Plan(cfg, source, config, device, dtype, layers, mask, out, method)


def _ranges_spec(layers: list[int]) -> str:
    from dowser_cli.mask import _ranges

    return _ranges(sorted(layers))


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if resume:
        if not (out / "checkpoint" / "state.yaml").is_file():
            raise UserError(f"--resume: no checkpoint in {out} (nothing to resume)")
        return
    if (out / "run.yaml").exists() or (out / "checkpoint").exists():
        raise UserError(f"--out {out}: already holds a run; pass --resume to continue it or choose another --out")


def load_masks(p: Plan, lm: LoadedModel, command: str) -> dict[str, torch.Tensor]:
    """Dense bool masks by parameter name; a mask built from scores is written into the run dir."""
    mf = prepare_mask(p, lm, command)
    if mf is None:
        return {}
    return {name: mf.dense(name).to(lm.model.get_parameter(name).device) for name in mf.params}


def prepare_mask(p: Plan, lm: LoadedModel, command: str):
    """Put the run's mask file in place (a copy, or built from scores) and check it; the opened MaskFile."""
    from dowser_cli import mask as mask_mod

    if p.mask is None:
        return None
    if p.mask.kind == artifacts.SCORES_KIND:
        scores = mask_mod.open_scores(p.mask.path)
        mcfg = mask_mod.MaskConfig(ratio=p.cfg.ratio, layers=_ranges_spec(p.layers), targets=p.cfg.targets)
        strategy = mask_mod.validate(mcfg)
        modules, layers = mask_mod.select_modules(scores, lm, mcfg)
        packed, params = mask_mod.build_masks(lm, scores, strategy, mcfg, modules, stderr_console())
        target = p.out / "mask.safetensors"
        mask_mod.write_for(target, packed, params, mcfg, scores, lm, artifacts.weights_digest(lm.model), layers,
                           command)
        p.mask = MaskInput(target, artifacts.MASK_KIND, artifacts.read_header(target), layers, p.mask.dtype)
    elif p.mask.path.resolve() != (p.out / "mask.safetensors").resolve():
        _copy_beside(p.mask.path, p.out / "mask.safetensors")
    mf = mask_mod.open_mask(p.mask.path)
    digest = p.mask.meta.get("weights_digest")
    if digest and digest != artifacts.weights_digest(lm.model):
        raise UserError(f"--mask {p.mask.path}: was made from different weights than {p.source.spec} "
                        f"(same architecture, weights digest differs)")
    return mf


def _copy_beside(src: Path, dst: Path) -> None:
    """The run keeps its own copy of the mask (a hard link when possible), so it is self-contained."""
    for a, b in ((src, dst), (artifacts.sidecar_path(src), artifacts.sidecar_path(dst))):
        if not a.exists():
            continue
        b.unlink(missing_ok=True)
        try:
            os.link(a, b)
        except OSError:
            shutil.copyfile(a, b)


# ---- training --------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_schedule(n_examples: int, cfg: FinetuneConfig) -> Schedule:
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return Schedule(steps_per_epoch, total, math.ceil(cfg.warmup_ratio * total))


def step_examples(step: int, n: int, sched: Schedule, cfg: FinetuneConfig) -> list[list[int]]:
    """Example indices of optimiser step ``step``, as grad_accum micro-batches. Each epoch is a fresh
    permutation seeded by (seed, epoch), so any step's batch is known without replaying earlier ones."""
    epoch, pos = divmod(step, sched.steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
    per_step = cfg.batch_size * cfg.grad_accum
    chunk = order[pos * per_step:(pos + 1) * per_step]
    return [chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]


def param_groups(tr: Trainable, lm: LoadedModel, cfg: FinetuneConfig) -> list[dict]:
    """One group at --lr; a trained projector gets --projector-lr when given (a freshly initialised
    projector, as in smol-llava, holds nothing to protect and learns faster at a higher rate)."""
    proj = lm.parts.projector
    in_proj = {n for n in tr.params if proj and cfg.projector_lr > 0 and n.startswith(proj + ".")}
    groups = [{"params": [p for n, p in tr.params.items() if n not in in_proj], "peak_lr": cfg.lr}]
    if in_proj:
        groups.append({"params": [tr.params[n] for n in in_proj], "peak_lr": cfg.projector_lr})
    return [g for g in groups if g["params"]]


def make_lr_lambda(sched: Schedule, cfg: FinetuneConfig):
    """lr multiplier per step from transformers' schedule functions (the ones HF Trainer uses)."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = get_scheduler(cfg.lr_scheduler, dummy, num_warmup_steps=sched.warmup_steps,
                      num_training_steps=sched.total_steps)
    return s.lr_lambdas[0]


class LossHead:
    """Summed next-token cross-entropy over labelled positions. Runs the backbone for hidden states and
    lm_head only at the labelled positions (the full [B, T, V] logits are the largest activation of a
    fine-tuning step, and most positions carry no loss)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        model = lm.model
        self.backbone = getattr(model, "model", None)
        self.head = model.get_output_embeddings()
        if not isinstance(self.head, nn.Module) or not isinstance(self.backbone, nn.Module):
            self.backbone = self.head = None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.lm.adapter.sequence_kwargs is not None:
            inputs.update(self.lm.adapter.sequence_kwargs(self.lm.config, inputs["input_ids"]))
        target = labels[:, 1:]
        keep = target != data.IGNORE
        if self.backbone is not None:
            hidden = self.backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
            logits = self.head(hidden[keep])
        else:
            logits = self.lm.model(**inputs, use_cache=False).logits[:, :-1][keep]
        return nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum")


@dataclass
class TrainState:
    step: int = 0
    losses: list[dict[str, float]] = dataclasses.field(default_factory=list)
    train_s: float = 0.0
    tokens: int = 0
    skipped: list[int] = dataclasses.field(default_factory=list)   # non-finite steps dropped (skip-step)
    in_a_row: int = 0


def to_device(batch: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def train_step(step: int, ds: data.Dataset, sched: Schedule, cfg: FinetuneConfig, loss_head: LossHead,
               opt: MaskedAdamW, lr_at, lm: LoadedModel, device: str, dtype: torch.dtype,
               method=None) -> tuple[float, int, int, bool]:
    """One optimiser step over batch_size * grad_accum examples; the loss is the mean over all their
    assistant tokens (so accumulation equals one big batch). Returns (loss, assistant tokens, tokens,
    finite): not finite (the loss or the gradient norm, returned in the loss's place when the loss
    itself is finite) means no update was made."""
    micro = step_examples(step, len(ds.examples), sched, cfg)
    n_tokens = sum(ds.examples[i].n_labels for mb in micro for i in mb)
    n_input = sum(len(ds.examples[i].input_ids) for mb in micro for i in mb)
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout (if any) depends only on the step
    total = 0.0
    for mb in micro:
        batch = data.collate([ds.examples[i] for i in mb], data.pad_id(lm.tokenizer), lm.processor)
        loss = loss_head(to_device(batch, device, dtype)) / n_tokens
        loss.backward()
        total += float(loss.detach())
    # the norm is taken even without clipping: a non-finite one means this update must not happen
    norm = opt.clip_grad_norm_(cfg.max_grad_norm)
    if not (math.isfinite(total) and math.isfinite(norm)):
        opt.zero_grad()
        return total if not math.isfinite(total) else norm, n_tokens, n_input, False
    for group in opt.param_groups:
        group["lr"] = group["peak_lr"] * lr_at(step)
    if method is not None:
        method.before_step(opt)
    opt.step()
    if method is not None:
        method.after_step(opt)
    opt.zero_grad()
    return total, n_tokens, n_input, True


def trainable_values(tr: Trainable) -> dict[str, torch.Tensor]:
    """The delta's tensors: masked parameters' trainable entries (1-D, mask order), dense ones whole."""
    out = {}
    for name, p in tr.params.items():
        v = p.detach()
        out[name] = v.reshape(-1)[tr.masks[name].reshape(-1)] if name in tr.masks else v
        out[name] = out[name].cpu()
    return out


def apply_values(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
                 values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            v = values[name].to(p.device, p.dtype)
            if name in masks:
                p.view(-1)[masks[name].reshape(-1).nonzero().squeeze(1)] = v
            else:
                p.copy_(v)


# ---- checkpoints --------------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, tr: Trainable, opt: MaskedAdamW, state: TrainState, cfg: FinetuneConfig,
                    fingerprint: str, method=None, dist: distributed.Dist | None = None) -> None:
    if dist is not None:  # every rank joins the gather; rank 0 writes the same layout as one process
        tensors = distributed.checkpoint_tensors(dist, tr, opt)
        if not dist.main:
            return
    else:
        names = {p: n for n, p in tr.params.items()}
        tensors = {f"value/{n}": v for n, v in trainable_values(tr).items()}
        tensors.update({k: v.cpu() for k, v in opt.named_state(names).items()})
    if method is not None:  # (methods with state of their own run in one process only: see plan)
        tensors.update({f"method/{k}": v.cpu() for k, v in method.state().items()})
    meta = artifacts.base_metadata(CHECKPOINT_KIND, fingerprint, step=state.step,
                                   training_digest=cfg.training_digest())
    # the new checkpoint is built beside the old one and replaces it whole: a failed write (a full
    # disk) leaves the previous checkpoint as it was
    with artifacts.replace_dir(run_dir / "checkpoint") as ckpt:
        artifacts.write_safetensors(ckpt / "state.safetensors", tensors, meta)
        artifacts.write_yaml(ckpt / "state.yaml", {"step": state.step, "training_digest": cfg.training_digest(),
                                                    "state_sha256": artifacts.sha256_file(ckpt / "state.safetensors"),
                                                    "train_s": state.train_s, "tokens": state.tokens,
                                                    "losses": state.losses, "skipped": state.skipped})


def load_checkpoint(run_dir: Path, tr: Trainable, opt: MaskedAdamW, cfg: FinetuneConfig,
                    fingerprint: str, method=None, dist: distributed.Dist | None = None) -> TrainState:
    ckpt = run_dir / "checkpoint"
    side = artifacts.read_yaml(ckpt / "state.yaml")
    path = ckpt / "state.safetensors"
    # verified before anything reads it: a truncated or altered file is refused whole
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing (state.yaml names it)")
    if side.get("state_sha256") != artifacts.sha256_file(path):
        raise UserError(f"--resume: {path} does not match the sha256 in its state.yaml (truncated or altered); "
                        f"nothing was resumed")
    meta = artifacts.read_header(path, CHECKPOINT_KIND)
    if meta.get("model_fingerprint") != fingerprint:
        raise UserError(f"--resume: {path} is from a different model (fingerprint mismatch)")
    if side.get("training_digest") != cfg.training_digest() or meta.get("training_digest") != cfg.training_digest():
        raise UserError(f"--resume: {run_dir} was trained with different settings; resume with the same options "
                        f"(see {run_dir / 'checkpoint' / 'state.yaml'} and the run's config) or start a new --out")
    if dist is not None and dist.strategy == "fsdp":
        distributed.load_sharded_checkpoint(dist, path, tr, opt, int(side["step"]))
    else:
        tensors = artifacts.read_tensors(path)
        apply_values(tr.params, tr.masks, {n: tensors[f"value/{n}"] for n in tr.params})
        opt.load_named_state({p: n for n, p in tr.params.items()}, tensors, int(side["step"]))
        if method is not None:
            method.load_state({k.removeprefix("method/"): v for k, v in tensors.items() if k.startswith("method/")})
    return TrainState(int(side["step"]), list(side.get("losses") or []), float(side.get("train_s", 0.0)),
                      int(side.get("tokens", 0)), list(side.get("skipped") or []))


# ---- the run ---------------------------------------------------------------------------------------------

def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)


def run(model_spec: str, data_path: Path, out: Path, cfg: FinetuneConfig, mask_path: Path | None = None,
        image_folder: Path | None = None, random_init: bool = False, resume: bool = False,
        command: str = "") -> dict[str, Any]:
    t0 = time.perf_counter()
    with artifacts.output_lock(out, command), \
            distributed.session(cfg.strategy, cfg.device) as dist:   # None when not launched by torchrun & co.
        return _run(dist, t0, model_spec, data_path, out, cfg, mask_path, image_folder, random_init, resume,
                    command)


def _run(dist: distributed.Dist | None, t0: float, model_spec: str, data_path: Path, out: Path, cfg: FinetuneConfig,
         mask_path: Path | None, image_folder: Path | None, random_init: bool, resume: bool,
         command: str) -> dict[str, Any]:
    p = plan(model_spec, cfg, out, mask_path, random_init, resume)
    if dist is not None:
        if not p.method.distributed:
            raise UserError(f"--method {cfg.method}: runs in one process only, not under torchrun / accelerate "
                            f"launch (its per-step hooks and state are not sharded)")
        p.device = dist.device
    # FSDP: rank 0 loads the weights on the host, the others only the module tree; fully_shard then moves
    # one unit at a time to the device, as shards, and rank 0 sends every rank its rows
    empty = distributed.empty_on_this_rank(dist)
    lm = load_model(p.source, p.config, p.dtype, "cpu" if dist is not None and dist.strategy == "fsdp" else p.device,
                    empty=empty)
    console = stderr_console() if dist is None or dist.main else stderr_console(quiet=True)
    ensure_tokenizer(lm, console)
    ds = _read_data(lm, data_path, image_folder, cfg, console)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = artifacts.model_fingerprint(lm.model)
    # (only rank 0 writes it; an empty rank has no values to digest)
    base_digest = "" if empty else artifacts.weights_digest(lm.model)
    masks = distributed.load_masks(dist, p, lm, command) if dist else load_masks(p, lm, command)
    method = p.method.make(lm, cfg)
    tr = method.trainable(p.layers, masks)
    model = distributed.wrap(dist, lm, tr, p) if dist else None  # FSDP: tr now holds this rank's shards
    # DDP and FSDP need the dense (sharded) gradient in .grad for their reduction: no compact hooks there
    opt = MaskedAdamW(param_groups(tr, lm, cfg), masks={tr.params[n]: m for n, m in tr.masks.items()}, lr=cfg.lr,
                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                      compact_grads=dist is None)
    state = load_checkpoint(out, tr, opt, cfg, fingerprint, method, dist) if resume else TrainState()
    sched = make_schedule(len(ds.examples), distributed.global_cfg(dist, cfg) if dist else cfg)
    if cfg.gradient_checkpointing:
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if p.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # the training steps' peak apart from loading's (under FSDP rank 0 holds the whole model while loading)
    load_peak_rss = host_peak_since_reset_mb()
    pre_train_rss = reset_host_peak()
    if dist is not None:
        dist.start_rss_mb, dist.load_peak_rss_mb = pre_train_rss, load_peak_rss
    load_s = time.perf_counter() - t0
    _train(p, lm, ds, tr, opt, state, sched, fingerprint, console, method, dist, model)
    timings = {"load_s": round(load_s, 3), "train_s": round(state.train_s, 3)}
    sidecar = _save(p, lm, ds, tr, opt, state, sched, fingerprint, base_digest, data_path, timings, t0, command,
                    method, pre_train_rss, dist, model)
    if dist is None or dist.main:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        _print_summary(console, sidecar, out)
    return sidecar


def ensure_tokenizer(lm: LoadedModel, console) -> None:
    """A config-only model (benchmarks at real shape) has no tokenizer: bytes as token ids keep every
    id inside the vocabulary; the numbers mean nothing, the costs are the real ones."""
    if lm.tokenizer is not None:
        return
    if not lm.source.random_init:
        raise UserError(f"model {lm.source.spec}: no tokenizer found")
    from dowser_cli.models.embedded import byte_tokenizer

    lm.tokenizer = byte_tokenizer()
    console.print("[yellow]--random-init: no tokenizer with the config; using a byte-level one[/yellow]")


def _read_data(lm: LoadedModel, path: Path, image_folder: Path | None, cfg: FinetuneConfig, console) -> data.Dataset:
    from dowser_cli.progress import progress_bar

    if image_folder is not None and not image_folder.is_dir():
        raise UserError(f"--image-folder {image_folder}: no such directory")
    encoder = data.Encoder(lm.tokenizer, lm.processor, cfg.max_len)
    with progress_bar(console) as bar:
        task = bar.add_task(f"reading {path.name}", total=None)
        ds = data.load_dataset(path, image_folder, encoder, cfg.skip_bad, lambda: bar.advance(task))
    if ds.skipped:
        console.print(f"[yellow]skipped {len(ds.skipped)} bad record(s) of {ds.total} (first: record "
                      f"{ds.skipped[0]['index']}: {ds.skipped[0]['reason']})[/yellow]")
    return ds


def _train(p: Plan, lm: LoadedModel, ds: data.Dataset, tr: Trainable, opt: MaskedAdamW, state: TrainState,
           sched: Schedule, fingerprint: str, console, method, dist: distributed.Dist | None = None,
           model: nn.Module | None = None) -> None:
    cfg = p.cfg
    lr_at = make_lr_lambda(sched, cfg)
    loss_head = LossHead(lm)
    lm.model.train()
    agreed = False  # under a launcher: all ranks decided to stop (so all of them join the checkpoint)
    try:
        # a launcher forwards the terminal's Ctrl-C to ranks that already got it: not a second Ctrl-C
        with _StopRequests(grace_s=2.0 if dist else 0.0) as stop, _progress(console) as bar:
            task = bar.add_task(f"finetune {p.source.spec}", total=sched.total_steps, completed=state.step, info="")
            while state.step < sched.total_steps:
                t = time.perf_counter()
                if dist is None:
                    loss, tokens, seen, finite = train_step(state.step, ds, sched, cfg, loss_head, opt, lr_at, lm,
                                                            p.device, p.dtype, method)
                    stop_now = stop.requested
                else:
                    loss, tokens, seen, stop_now, finite = distributed.train_step(
                        dist, model, state.step, ds, sched, cfg, opt, lr_at, p.device, p.dtype, stop.requested,
                        lm.processor, data.pad_id(lm.tokenizer))
                if not finite:
                    _diverged(p, state, loss, sched)
                else:
                    state.in_a_row = 0
                dt = time.perf_counter() - t
                state.train_s += dt
                state.tokens += tokens
                state.losses.append({"step": state.step + 1, "loss": round(loss, 6),
                                     "lr": float(f"{cfg.lr * lr_at(state.step):.6g}"), "tokens": tokens,
                                     "seconds": round(dt, 4), **({} if finite else {"skipped": True})})
                state.step += 1
                bar.update(task, advance=1, info=f"loss {loss:.4f}  {seen / dt:,.0f} tok/s")
                if stop_now and state.step < sched.total_steps:
                    agreed = True
                    raise KeyboardInterrupt
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < sched.total_steps:
                    save_checkpoint(p.out, tr, opt, state, cfg, fingerprint, method, dist)
    except KeyboardInterrupt:
        opt.zero_grad()  # a half-accumulated step is dropped; the checkpoint is at a step boundary
        if dist is not None and not agreed:  # one rank aborted mid-step: the others cannot join a save
            err = Interrupted("aborted; no checkpoint written")
            err.together = False  # nor a last barrier: the launcher ends the others
            raise err from None
        if state.step:
            save_checkpoint(p.out, tr, opt, state, cfg, fingerprint, method, dist)
            raise Interrupted(f"interrupted at step {state.step}/{sched.total_steps}; checkpoint in "
                              f"{p.out / 'checkpoint'}; rerun with --resume to continue") from None
        raise Interrupted("interrupted before the first step finished; nothing to resume") from None
    finally:
        lm.model.eval()
        opt.remove_hooks()


def _diverged(p: Plan, state: TrainState, value: float, sched: Schedule) -> None:
    """Step state.step + 1 had a non-finite loss or gradient norm and made no update: under
    --nan-policy stop (or past --nan-max-skips in a row) end the run in one line, keeping the last
    checkpoint as it is; under skip-step count it and go on."""
    cfg, n = p.cfg, state.step + 1
    state.in_a_row += 1
    if cfg.nan_policy == "skip-step" and state.in_a_row <= cfg.nan_max_skips:
        state.skipped.append(n)
        return
    ckpt = p.out / "checkpoint" / "state.yaml"
    kept = (f"the last good checkpoint (step {artifacts.read_yaml(ckpt)['step']}) is kept in {ckpt.parent}"
            if ckpt.is_file() else "no checkpoint was written")
    if p.out.is_dir() and not any(p.out.iterdir()):
        p.out.rmdir()  # nothing of this run to keep
    why = (f"{state.in_a_row} non-finite steps in a row (--nan-max-skips {cfg.nan_max_skips})"
           if cfg.nan_policy == "skip-step" else f"a non-finite loss or gradient norm ({value})")
    raise UserError(f"step {n}/{sched.total_steps}: {why}; stopped without an update or a delta; {kept} "
                    f"(lower --lr, or --nan-policy skip-step)")


class _StopRequests:
    """Ctrl-C / SIGTERM ask the loop to stop after the current optimiser step (an update cut in half
    would leave weights and optimiser state out of step, and the checkpoint unusable); a second Ctrl-C
    aborts at once, without a checkpoint."""

    def __init__(self, grace_s: float = 0.0):
        self.requested = False
        self.grace_s, self._first = grace_s, 0.0

    def _handler(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < self.grace_s:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        if os.environ.get("RANK", "0") in ("", "0"):  # under a launcher, rank 0 speaks for all
            print("\ndowser: stopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def write_delta(path: Path, tr: Trainable, fingerprint: str, base_digest: str, mask_sha: str | None,
                values: dict[str, torch.Tensor] | None = None) -> None:
    params = {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "masked": n in tr.masks}
              for n, p in tr.params.items()}
    meta = artifacts.base_metadata(DELTA_KIND, fingerprint, weights_digest=base_digest,
                                   mask_sha256=mask_sha or "", params=json.dumps(params, sort_keys=True))
    values = trainable_values(tr) if values is None else values
    bad = [n for n, v in values.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # an update that overflowed without a non-finite loss or norm (yet): never write it
        raise UserError(f"{bad[0]} (and {len(bad) - 1} more) holds NaN or inf after training; no delta written "
                        f"(lower --lr)")
    artifacts.write_safetensors(path, values, meta)


def _save(p: Plan, lm: LoadedModel, ds: data.Dataset, tr: Trainable, opt: MaskedAdamW, state: TrainState,
          sched: Schedule, fingerprint: str, base_digest: str, data_path: Path, timings: dict, t0: float,
          command: str, method, pre_train_rss: float | None, dist: distributed.Dist | None = None,
          model: nn.Module | None = None) -> dict[str, Any]:
    values = counts = ranks = None
    if dist is not None:  # the collectives first, on every rank; then rank 0 writes
        values = distributed.trainable_values(dist, tr)
        counts, ranks = distributed.counts(dist, tr), distributed.rank_report(dist, model, opt)
        if not dist.main:
            return {}
    mask_file = p.out / "mask.safetensors" if p.mask is not None else None
    mask_sha = artifacts.sha256_file(mask_file) if mask_file else None
    delta = p.out / "delta.safetensors"
    write_delta(delta, method.finish(tr, p.out), fingerprint, base_digest, mask_sha, values)
    full_bytes = sum(q.numel() * q.element_size() for q in lm.model.parameters())
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    sidecar = {
        **artifacts.sidecar_header("dowser.run", command),
        "config": dataclasses.asdict(p.cfg),
        "method": method.label(p.mask.meta if p.mask is not None else None),
        "method_details": method.describe(),
        "model": {"spec": p.source.spec, "random_init": p.source.random_init, "adapter": lm.adapter.name,
                  "dtype": str(p.dtype).removeprefix("torch."), "device": p.device, "fingerprint": fingerprint,
                  "weights_digest": base_digest, "layers_path": lm.parts.layers_path,
                  "num_layers": lm.parts.num_layers},
        "inputs": {"data": {"path": str(data_path), "sha256": artifacts.sha256_file(data_path)},
                   **({"mask": {"path": str(p.mask.path), "sha256": mask_sha}} if mask_file else {})},
        "outputs": {"delta": {"path": "delta.safetensors", "sha256": artifacts.sha256_file(delta),
                              "bytes": delta.stat().st_size},
                    **({"mask": {"path": "mask.safetensors", "sha256": mask_sha}} if mask_file else {}),
                    "full_checkpoint_bytes": full_bytes},
        "tuned_layers": p.layers,
        "trainable": counts or tr.counts(),
        # under FSDP the state is split over the ranks: the run's total; DDP: one rank's (each has it all)
        "optimizer": {"name": "masked-adamw", "state_bytes": sum(r["optimizer_state_bytes"] for r in ranks)
                      if dist and dist.strategy == "fsdp" else opt.state_bytes(),
                      "method_state_bytes": method.state_bytes()},
        "data": {"records": ds.total, "used": len(ds.examples), "skipped": len(ds.skipped),
                 "skipped_records": ds.skipped[:100]},
        "schedule": dataclasses.asdict(sched),
        "steps": state.step, "tokens": state.tokens,
        "nonfinite": {"policy": p.cfg.nan_policy, "skipped_steps": state.skipped, "count": len(state.skipped)},
        "mean_step_s": round(state.train_s / max(state.step, 1), 4),
        "loss_curve": state.losses,
        "timings": timings,
        # train_rss_mb: this process's peak RSS while training (the process-wide peak includes loading)
        "peak_memory": {**peak_memory(p.device), "train_rss_mb": host_peak_since_reset_mb(),
                        "pre_train_rss_mb": pre_train_rss},
    }
    if dist is not None:
        sidecar["distributed"] = {"world_size": dist.world, "strategy": dist.strategy, "backend": dist.backend,
                                  "per_rank_batch_size": p.cfg.batch_size,
                                  "global_step_examples": dist.world * p.cfg.batch_size * p.cfg.grad_accum,
                                  "ranks": ranks}
    artifacts.write_yaml(p.out / "run.yaml", sidecar)
    return sidecar


def _print_summary(console, sidecar: dict, out: Path) -> None:
    c = sidecar["trainable"]
    losses = sidecar["loss_curve"]
    first, last = (losses[0]["loss"], losses[-1]["loss"]) if losses else (float("nan"),) * 2
    console.print(f"{out}: {sidecar['method']}, {sidecar['steps']} steps, loss {first:.4f} -> {last:.4f}; "
                  f"{c['trainable_entries']:,} trainable entries in {c['params']} tensors; delta "
                  f"{sidecar['outputs']['delta']['bytes'] / 2**20:.1f} MiB (full checkpoint "
                  f"{sidecar['outputs']['full_checkpoint_bytes'] / 2**20:.1f} MiB); optimiser state "
                  f"{sidecar['optimizer']['state_bytes'] / 2**20:.1f} MiB")

