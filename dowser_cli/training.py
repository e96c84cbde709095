"""The training core, shared by `finetune` (one process or, through `distributed`, several) and
`merge`: the config, what trains, the data order and schedule, the loss over assistant tokens, one
optimiser step, the values that make a delta, and checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from dowser_cli import artifacts, data
from dowser_cli.config import option
from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel
from dowser_cli.optim import MaskedAdamW
from dowser_cli.runtime import step_seed, world_size
from dowser_cli.selection import TARGETS, layer_of, parse_targets

STRATEGIES = ("ddp", "fsdp")   # the multi-process backends (dowser_cli.distributed)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
NAN_POLICIES = ("stop", "skip-step")
REPORT_TO = ("none", "tensorboard", "wandb")   # dowser_cli.trackers
REPLAY_LOSSES = ("lm", "kl")


@dataclass
class FinetuneConfig:
    method: str = option("", "masked | full-ft | replay | spider | lora | osf | supertuning "
                         "(dowser_cli.methods.finetuning).",
                         show="masked with --mask, else full-ft")
    lr: float = option(2e-5, "Peak learning rate.")
    projector_lr: float = option(0.0, "Peak lr of a trained projector (e.g. a fresh one).", show="0 = --lr")
    epochs: float = option(5.0, "Epochs.")
    max_steps: int = option(0, "Optimiser steps; overrides --epochs.", show="0 = from epochs")
    batch_size: int = option(4, "Examples per micro-batch (per rank under a launcher).")
    grad_accum: int = option(1, "Micro-batches per optimiser step.")
    weight_decay: float = option(0.0, "AdamW weight decay (never touches frozen entries).")
    warmup_ratio: float = option(0.03, "Warm-up fraction of the steps.")
    lr_scheduler: str = option("cosine", "cosine | linear | constant | constant_with_warmup.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip the trainable entries' gradient norm; 0 = off.")
    tune_layers: str = option("", "Decoder layers to tune: last:N | all | ranges.",
                              show="the mask's; else last:20, all if fewer")
    targets: str = option("attn,mlp", "Linears of the tuned layers that train: attn (q/k/v/o) | mlp (gate/up/down) | "
                          "attn,mlp; the others stay frozen.")
    ratio: float = option(0.1, "rho when --mask is a scores file, and --method supertuning's trainable fraction.")
    train_projector: bool = option(False, "Train the vision-language projector densely.", show="frozen",
                                   off="--freeze-projector")
    train_vision_tower: bool = option(False, "Train the vision tower densely.", show="frozen",
                                      off="--freeze-vision-tower")
    train_embeddings: bool = option(False, "Train the input embeddings densely.", show="frozen",
                                    off="--freeze-embeddings")
    train_lm_head: bool = option(False, "Train lm_head densely.", show="frozen", off="--freeze-lm-head")
    freeze_norms: bool = option(False, "Freeze the tuned layers' norms.", show="they train densely",
                                off="--train-norms")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward.")
    max_len: int = option(2048, "Longest record in tokens; longer ones are bad records.")
    workers: int = option(0, "DataLoader worker processes that read and process the next batches' images while "
                          "a step runs (the order and numbers do not change).", show="0 = the main process")
    skip_bad: bool = option(False, "Skip bad records (counted in run.yaml) instead of failing.")
    seed: int = option(0, "Seed of data order and dropout.")
    save_every: int = option(0, "Checkpoint every N optimiser steps.", show="0 = only on Ctrl-C")
    snapshot_every: int = option(0, "Keep the run's delta every N optimiser steps in OUT/snapshots/step-N "
                                 "(forgetting curves: eval-forgetting RUN@N or --snapshots).", show="0 = none")
    snapshot_steps: str = option("", "Also keep a snapshot at these steps, e.g. 64,128,256.", show="none")
    drift_every: int = option(0, "Measure the drift (KL to the base on fixed self-generated probe text, no data) "
                              "every N steps: run.yaml's drift_curve and the tracker.", show="0 = off")
    drift_samples: int = option(16, "Probe texts of the drift meter (the demo suite's drift settings).")
    drift_seq_len: int = option(48, "Tokens per probe text of the drift meter.")
    max_drift: float = option(0.0, "Stop once the drift exceeds this; the run's delta is then the last snapshot "
                              "under it (needs --drift-every; a snapshot is kept at every measurement).",
                              show="0 = off")
    nan_policy: str = option("stop", "A non-finite loss or gradient norm: stop (one line, the last checkpoint kept) | "
                             "skip-step (drop that update, counted in run.yaml).")
    nan_max_skips: int = option(5, "skip-step: stop after this many in a row.")
    report_to: str = option("none", "Log loss, lr, tokens/s, grad-norm and memory per step: none | tensorboard | wandb "
                            "(WANDB_MODE=offline needs no network).")
    logging_dir: str = option("", "The tracker's directory.", show="OUT/logs")
    lora_r: int = option(8, "--method lora: adapter rank.")
    lora_alpha: float = option(16.0, "--method lora: scaling alpha (update alpha/r * BA).")
    lora_dropout: float = option(0.0, "--method lora: dropout on the adapter input.")
    replay_ratio: float = option(0.25, "--method replay: texts of the base's own replayed per training example of a "
                                 "step (at least one per step).")
    replay_weight: float = option(1.0, "--method replay: weight of the replay loss beside the task's.")
    replay_loss: str = option("lm", "--method replay: lm (next-token loss on the base's texts) | kl (KL(base || "
                              "model) on them; keeps the base's distributions of the pool on the host).")
    replay_samples: int = option(64, "--method replay: texts in the pool, generated once by the base with the "
                                 "probe's sampling (cached in OUT/replay.safetensors).")
    replay_seq_len: int = option(48, "--method replay: tokens per replay text.")
    osf_effective_rank: float = option(0.5, "--method osf: frozen top singular directions, a fraction of the smaller "
                                       "dimension or a count.")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16.", show="auto: bf16 on GPU")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    strategy: str = option("", "ddp | fsdp under torchrun / accelerate launch (--batch-size is per rank).",
                           show="ddp there")

    def training_digest(self) -> str:
        """What must match for --resume to continue the same run (save_every may change; so may the
        strategy, whose checkpoints share one layout). Under a launcher the batch is the global one."""
        d = dataclasses.asdict(self)
        d.pop("save_every")
        for k in ("snapshot_every", "snapshot_steps", "drift_every", "drift_samples", "drift_seq_len", "max_drift"):
            d.pop(k)              # what is observed along the run, not what it computes
        d.pop("nan_policy")       # they decide what happens after a divergence, not the numbers before it
        d.pop("nan_max_skips")
        d.pop("report_to")        # where the curves go, not what they are
        d.pop("logging_dir")
        d.pop("device")
        d.pop("strategy")
        d.pop("workers")          # who prepares the batches, not what they hold
        if d["method"] != "replay":   # replay's settings shape replay runs only (and older checkpoints lack them)
            for k in [k for k in d if k.startswith("replay_")]:
                d.pop(k)
        d["batch_size"] *= world_size()
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
        (cfg.lr_scheduler in SCHEDULERS, f"--lr-scheduler {cfg.lr_scheduler!r}: expected one of {', '.join(SCHEDULERS)}"),
        (0 < cfg.ratio <= 1, f"--ratio {cfg.ratio}: must be in (0, 1]"),
        (cfg.max_len >= 8, f"--max-len {cfg.max_len}: must be >= 8"),
        (cfg.workers >= 0, f"--workers {cfg.workers}: must be >= 0 (0: the main process prepares the batches)"),
        (cfg.save_every >= 0, f"--save-every {cfg.save_every}: must be >= 0"),
        (cfg.snapshot_every >= 0, f"--snapshot-every {cfg.snapshot_every}: must be >= 0"),
        (cfg.drift_every >= 0, f"--drift-every {cfg.drift_every}: must be >= 0"),
        (cfg.drift_samples >= 1, f"--drift-samples {cfg.drift_samples}: must be >= 1"),
        (cfg.drift_seq_len >= 8, f"--drift-seq-len {cfg.drift_seq_len}: must be >= 8"),
        (cfg.max_drift >= 0, f"--max-drift {cfg.max_drift}: must be >= 0"),
        (not cfg.max_drift or cfg.drift_every, f"--max-drift {cfg.max_drift}: needs --drift-every N (how often the "
                                                f"drift is measured)"),
        (cfg.nan_policy in NAN_POLICIES, f"--nan-policy {cfg.nan_policy!r}: expected one of {', '.join(NAN_POLICIES)}"),
        (cfg.nan_max_skips >= 1, f"--nan-max-skips {cfg.nan_max_skips}: must be >= 1"),
        (cfg.lora_r >= 1, f"--lora-r {cfg.lora_r}: must be >= 1"),
        (cfg.lora_alpha > 0, f"--lora-alpha {cfg.lora_alpha}: must be > 0"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)"),
        (cfg.osf_effective_rank > 0 and (cfg.osf_effective_rank < 1 or float(cfg.osf_effective_rank).is_integer()),
         f"--osf-effective-rank {cfg.osf_effective_rank}: a fraction in (0, 1) or a whole number of directions"),
        (cfg.replay_ratio > 0, f"--replay-ratio {cfg.replay_ratio}: must be > 0"),
        (cfg.replay_weight >= 0, f"--replay-weight {cfg.replay_weight}: must be >= 0"),
        (cfg.replay_loss in REPLAY_LOSSES, f"--replay-loss {cfg.replay_loss!r}: expected one of {', '.join(REPLAY_LOSSES)}"),
        (cfg.replay_samples >= 1, f"--replay-samples {cfg.replay_samples}: must be >= 1"),
        (cfg.replay_seq_len >= 8, f"--replay-seq-len {cfg.replay_seq_len}: must be >= 8"),
        (cfg.report_to in REPORT_TO, f"--report-to {cfg.report_to!r}: expected one of {', '.join(REPORT_TO)}"),
        (cfg.strategy in ("",) + STRATEGIES,
         f"--strategy {cfg.strategy!r}: expected one of {', '.join(STRATEGIES)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    parse_targets(cfg.targets)
    parse_snapshot_steps(cfg)


def parse_snapshot_steps(cfg: FinetuneConfig) -> set[int]:
    """The explicit --snapshot-steps (--snapshot-every and --max-drift's measurements come on top)."""
    try:
        steps = {int(x) for x in cfg.snapshot_steps.replace(" ", "").split(",") if x}
    except ValueError:
        steps = {0}
    if any(n < 1 for n in steps):
        raise UserError(f"--snapshot-steps {cfg.snapshot_steps!r}: expected step numbers >= 1, comma-separated")
    return steps


def snapshot_due(cfg: FinetuneConfig, step: int) -> bool:
    """Whether a snapshot is kept after optimiser step ``step`` (1-based)."""
    return (bool(cfg.snapshot_every) and step % cfg.snapshot_every == 0) or step in parse_snapshot_steps(cfg)


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
        # a parameter a mask cannot cover (a mixture-of-experts block's 3-D expert weights, which the
        # probe does not score) would silently train densely beside a "10 %" mask
        tensors = [n for n, p in chosen.items() if p.dim() > 2 and n not in masks]
        if tensors:
            raise UserError(f"{tensors[0]}: a {chosen[tensors[0]].dim()}-D parameter (e.g. a mixture-of-experts "
                            f"block's expert weights) that the probe does not score and a mask cannot cover "
                            f"({len(tensors)} such in the tuned layers); tune --targets attn, or use Full-FT")
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
    order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(cfg.seed, epoch))).tolist()
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


def logits_transform(config) -> str | None:
    """The config setting with which a family's forward changes the logits after lm_head (Gemma 2's
    soft-capping, Cohere's logit scale, Granite's logit scaling), or None: then lm_head's output is
    the model's logits, and the loss may run lm_head on the labelled positions alone."""
    for c in {id(x): x for x in (config, config.get_text_config())}.values():
        for attr, neutral in _LOGIT_TRANSFORMS.items():
            if getattr(c, attr, neutral) not in (neutral, None):
                return attr
    return None


# config attributes whose non-neutral value a family's forward applies to the logits
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


class LossHead:
    """Summed next-token cross-entropy over labelled positions. Runs the backbone for hidden states and
    lm_head only at the labelled positions (the full [B, T, V] logits are the largest activation of a
    fine-tuning step, and most positions carry no loss)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        model = lm.model
        self.backbone = getattr(model, "model", None)
        self.head = model.get_output_embeddings()
        if not isinstance(self.head, nn.Module) or not isinstance(self.backbone, nn.Module) or \
                logits_transform(lm.config):
            self.backbone = self.head = None    # the model's own forward: its logits as it computes them

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
    drifts: list[dict[str, float]] = dataclasses.field(default_factory=list)   # the live meter: {step, drift}
    over_budget: int = 0    # the step whose drift passed --max-drift (0: none)
    kept_step: int = 0      # then: the step whose values the run keeps


def to_device(batch: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


class StepResult(NamedTuple):
    loss: float       # the step's mean loss over its assistant tokens (or the non-finite value)
    tokens: int       # assistant tokens in the (global) step
    seen: int         # all tokens in the (global) step
    finite: bool      # False: the loss or the gradient norm was not finite and no update was made
    stop: bool        # a stop was requested (under a launcher: on any rank, agreed by all)
    grad_norm: float = float("nan")   # the trainable entries' gradient norm before clipping


class LocalBackend:
    """The operations of a training run that depend on how it was launched, for one process. The
    training loop (``train_step``, finetune's checkpoints and report) calls only these;
    ``distributed.Dist`` provides the same operations for DDP and FSDP (wrap the model, take this
    rank's share of a micro-batch, agree on the loss and stop flag, reduce the gradient norm, gather the
    values and checkpoint tensors, load a checkpoint, count)."""

    main = True
    empty = False           # no weights on this rank (FSDP ranks > 0 before sharding)
    compact_grads = True    # the optimiser may gather masked gradients in its hooks (no reduction needs .grad)
    stop_grace_s = 0.0      # a second Ctrl-C within this counts as the first (a launcher forwards it)

    def __init__(self, device: str):
        self.device, self.world, self.strategy = device, 1, ""
        self.start_rss_mb = self.load_peak_rss_mb = None   # host RSS when training began / peak before it

    def load_device(self, device: str) -> str:
        """Where the weights are loaded."""
        return device

    def global_cfg(self, cfg: FinetuneConfig) -> FinetuneConfig:
        """The settings the data order is drawn with (one process: the run's own)."""
        return cfg

    def wrap(self, lm: LoadedModel, tr: Trainable, cfg: FinetuneConfig, mask_path: Path | None):
        """The loss as a callable: batch -> summed loss over its assistant tokens (scalar)."""
        return LossHead(lm)

    def share(self, mb: list[int], batch_size: int) -> tuple[list[int], float]:
        """This process's examples of a micro-batch and the factor on its loss (0: a stand-in example)."""
        return mb, 1.0

    def accumulating(self, model, last: bool):
        """Context for one micro-batch's forward and backward (DDP: no gradient sync before the last)."""
        return contextlib.nullcontext()

    def agree(self, loss: float, stop: bool) -> tuple[float, bool]:
        """The step's loss and stop flag as every process sees them."""
        return loss, stop

    def after_backward(self, model, opt: MaskedAdamW) -> None:
        """Called when the step's gradients, parameters and optimiser state are all alive (its peak)."""

    def norm_reduce(self):
        """How clipping combines the squared gradient norm over processes (None: nothing to combine)."""
        return None

    def trainable_values(self, tr: Trainable) -> dict[str, torch.Tensor] | None:
        """The delta's tensors (None on processes that do not write)."""
        return trainable_values(tr)

    def checkpoint_tensors(self, tr: Trainable, opt: MaskedAdamW) -> dict[str, torch.Tensor] | None:
        """Values and optimiser state in the checkpoint layout (None on processes that do not write)."""
        names = {p: n for n, p in tr.params.items()}
        return {**{f"value/{n}": v for n, v in trainable_values(tr).items()},
                **{k: v.cpu() for k, v in opt.named_state(names).items()}}

    def load_checkpoint(self, path: Path, tr: Trainable, opt: MaskedAdamW, step: int, method=None) -> None:
        tensors = artifacts.read_tensors(path)
        apply_values(tr.params, tr.masks, {n: tensors[f"value/{n}"] for n in tr.params})
        opt.load_named_state({p: n for n, p in tr.params.items()}, tensors, step)
        if method is not None:
            method.load_state({k.removeprefix("method/"): v for k, v in tensors.items() if k.startswith("method/")})

    def counts(self, tr: Trainable) -> dict[str, int]:
        return tr.counts()

    def rank_report(self, model, opt: MaskedAdamW) -> list[dict] | None:
        """Per-process memory for run.yaml (None: one process, nothing beyond the run's own peak)."""
        return None

    def optimizer_state_bytes(self, opt: MaskedAdamW, ranks: list[dict] | None) -> int:
        return opt.state_bytes()

    def describe(self, cfg: FinetuneConfig, ranks: list[dict] | None) -> dict | None:
        """run.yaml's ``distributed`` section (None for one process)."""
        return None


class StepBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: this process's examples of each micro-batch of every step from
    ``start`` on, in ``step_examples``' order (so a resumed run reads what an uninterrupted one does)."""

    def __init__(self, n: int, sched: Schedule, cfg: FinetuneConfig, backend: LocalBackend, start: int):
        self.n, self.sched, self.cfg, self.backend, self.start = n, sched, cfg, backend, start

    def __iter__(self):
        for step in range(self.start, self.sched.total_steps):
            for mb in step_examples(step, self.n, self.sched, self.backend.global_cfg(self.cfg)):
                yield self.backend.share(mb, self.cfg.batch_size)[0]


def forward_keys(model) -> set[str] | None:
    """The arguments the model's forward names (which image kwargs of the processor it takes), read
    through a PEFT wrapper to the model it wraps; None where the forward names none of them but takes
    ``**kwargs`` (then ``data.IMAGE_KEYS`` go through)."""
    while hasattr(model, "get_base_model"):      # PeftModel's forward names only input_ids & co.
        model = model.get_base_model()
    params = inspect.signature(model.forward).parameters
    names = set(params)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return None if takes_any and not names & data.IMAGE_KEYS else names


def batch_loader(ds: data.Dataset, sched: Schedule, cfg: FinetuneConfig, backend: LocalBackend, start: int,
                 pad: int, processor, keys: set[str] | None) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of every step from ``start`` on, collated (images read and processed) by
    ``cfg.workers`` DataLoader workers ahead of the step, or by this process between steps (0);
    pinned for a CUDA device."""
    loader = torch.utils.data.DataLoader(
        data.Examples(ds.examples), batch_sampler=StepBatches(len(ds.examples), sched, cfg, backend, start),
        collate_fn=data.Collator(pad, processor, keys), num_workers=cfg.workers,
        pin_memory=backend.device.startswith("cuda"), persistent_workers=False)
    return iter(loader)


def train_step(step: int, ds: data.Dataset, sched: Schedule, cfg: FinetuneConfig, model, opt: MaskedAdamW, lr_at,
               backend: LocalBackend, dtype: torch.dtype, pad: int, processor=None, stop: Callable[[], bool] = bool,
               method=None, batches: Iterator[dict[str, torch.Tensor]] | None = None) -> StepResult:
    """One optimiser step over the step's ``batch_size * grad_accum`` examples (times the world size under
    a launcher, each process taking its share); the loss is the mean over all their assistant tokens, so
    accumulation and processes equal one big batch. ``model``: ``backend.wrap``'s loss callable. When the
    loss or the gradient norm is not finite no update is made (``finite`` False; the non-finite norm is
    returned in the loss's place when the loss itself is finite). ``batches``: ``batch_loader``'s
    micro-batches (else each is collated here)."""
    micro = step_examples(step, len(ds.examples), sched, backend.global_cfg(cfg))
    n_tokens = sum(ds.examples[i].n_labels for mb in micro for i in mb)
    n_input = sum(ds.examples[i].length for mb in micro for i in mb)
    torch.manual_seed(step_seed(cfg.seed, step))  # dropout (if any) depends only on the step
    total = 0.0
    for j, mb in enumerate(micro):
        mine, factor = backend.share(mb, cfg.batch_size)
        batch = next(batches) if batches is not None else data.collate([ds.examples[i] for i in mine], pad, processor)
        with backend.accumulating(model, last=j == len(micro) - 1):
            loss = model(to_device(batch, backend.device, dtype)) / n_tokens
            # DDP and FSDP average the gradients over ranks: the factor (world) makes it their sum
            (loss if factor == 1.0 else loss * factor).backward()
        if factor:
            total += float(loss.detach())
    if method is not None:
        method.extra_backward(step, backend.device, dtype)   # e.g. replay's loss on the base's own text
    total, stop_now = backend.agree(total, stop())
    backend.after_backward(model, opt)
    # the norm is taken even without clipping: a non-finite one means this update must not happen
    norm = opt.clip_grad_norm_(cfg.max_grad_norm, reduce=backend.norm_reduce())
    if not (math.isfinite(total) and math.isfinite(norm)):
        opt.zero_grad()
        return StepResult(total if not math.isfinite(total) else norm, n_tokens, n_input, False, stop_now, norm)
    for group in opt.param_groups:
        group["lr"] = group["peak_lr"] * lr_at(step)
    if method is not None:
        method.before_step(opt)
    opt.step()
    if method is not None:
        method.after_step(opt)
    opt.zero_grad()
    return StepResult(total, n_tokens, n_input, True, stop_now, norm)


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


def write_delta(path: Path, tr: Trainable, fingerprint: str, base_digest: str, mask_sha: str | None,
                values: dict[str, torch.Tensor] | None = None) -> None:
    params = {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "masked": n in tr.masks}
              for n, p in tr.params.items()}
    meta = artifacts.base_metadata(artifacts.DELTA_KIND, fingerprint, weights_digest=base_digest,
                                   mask_sha256=mask_sha or "", params=json.dumps(params, sort_keys=True))
    values = trainable_values(tr) if values is None else values
    bad = [n for n, v in values.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # an update that overflowed without a non-finite loss or norm (yet): never write it
        raise UserError(f"{bad[0]} (and {len(bad) - 1} more) holds NaN or inf after training; no delta written "
                        f"(lower --lr)")
    artifacts.write_safetensors(path, values, meta)
