"""Built-in fine-tuning methods: the paper's training-time comparators as peers of dowser's masks.

Each method is a ``MethodRun``: it picks what trains, may act around every optimiser step, may hold
checkpointed state of its own, and decides what the run's delta holds. The training loop, data,
optimiser (masked AdamW, dense for parameters without a mask), checkpoints and artifacts are shared,
so methods differ only where their papers differ.

- ``full-ft``: the selected layers train densely.
- ``masked``: inside a mask from `dowser mask` (dowser, magnitude, wanda, sensitivity, random, inverse) only.
- ``replay``: data-free rehearsal, the base's own generations mixed into every step, with or without a
  mask (the peer practitioners reach for: mixing general data into fine-tuning, made data-free).
- ``spider``: SPIDER's soft masking (training-time): after every step each entry is pulled back
  towards theta_0 by a coefficient from its pretrained vs fine-tuning importance (scoring.spider_*).
- ``lora``, ``osf``, ``supertuning``: PEFT's LoRA, OSF (orthogonal subspace fine-tuning) and
  Super-Tuning (magnitude top-k sparse entries) on the tuned layers' linears, built by PEFT itself and
  merged into the weights at the end (the delta holds the merged matrices; the adapter is kept in
  RUN/adapter/)."""
from __future__ import annotations

import abc
import math
from pathlib import Path

import torch
from torch import nn

from dowser_cli import artifacts, drift, scoring
from dowser_cli.data import pack_right, pad_id
from dowser_cli.training import FinetuneConfig, Trainable, select_trainable
from dowser_cli.methods.registry import FINETUNE_METHODS, FinetuneMethod
from dowser_cli.models import LoadedModel
from dowser_cli.runtime import step_seed
from dowser_cli.selection import TARGETS, layer_of, parse_targets


class MethodRun:
    """Hooks of one run. The defaults train what ``select_trainable`` picks and nothing more."""

    def __init__(self, name: str, lm: LoadedModel, cfg: FinetuneConfig):
        self.name, self.lm, self.cfg = name, lm, cfg

    def label(self, mask_meta: dict[str, str] | None) -> str:
        """The run's ``method`` in run.yaml (and in the forgetting report)."""
        return self.name

    def trainable(self, layers: list[int], masks: dict[str, torch.Tensor]) -> Trainable:
        return select_trainable(self.lm, self.cfg, layers, masks)

    def extra_backward(self, step: int, device: str, dtype: torch.dtype) -> None:
        """After the step's task backward passes, before clipping: a loss term of the method's own
        (its gradients add to the task's)."""

    def step_metrics(self) -> dict[str, float]:
        """What the method reports for the step just taken (run.yaml's loss curve, the tracker)."""
        return {}

    def before_step(self, opt) -> None:
        """After backward and clipping, before the optimiser step."""

    def after_step(self, opt) -> None:
        """After the optimiser step."""

    def state(self) -> dict[str, torch.Tensor]:
        """Method state to checkpoint (keys are unique names; restored by ``load_state``)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def state_bytes(self) -> int:
        """Bytes the method holds beyond the model and the optimiser."""
        return 0

    def finish(self, tr: Trainable, out: Path) -> Trainable:
        """What the delta stores once training is over (default: the trained parameters)."""
        return tr

    def describe(self) -> dict:
        return {}


class Masked(MethodRun):
    def label(self, mask_meta):
        return f"{(mask_meta or {}).get('strategy', 'dowser')}-mask"


class Replay(MethodRun):
    """Data-free rehearsal: texts the base model writes itself (the probe's generator, so no data),
    mixed into every step: ceil(--replay-ratio x the step's examples) of them, drawn from a fixed pool
    by (seed, step). Loss = task loss (mean over assistant tokens) + --replay-weight x replay loss:
    ``lm``, the mean next-token cross-entropy over the replay texts' tokens; ``kl``, the mean over their
    positions of KL(p_base || p_model), the base's distributions computed once when the pool is made.
    With --mask, only the mask's entries move (``dowser mask`` + replay); without, the layers train
    densely."""

    SEED_OFFSET = 1_000_003   # the pool's texts never coincide with the drift meter's (seed 0)

    def label(self, mask_meta):
        return f"{mask_meta.get('strategy', 'dowser')}-mask+replay" if mask_meta else "replay"

    def trainable(self, layers, masks):
        tr = super().trainable(layers, masks)
        self.pool, self.base_lp = self._pool()
        self.last: dict[str, float] = {}
        return tr

    def _pool(self):
        cfg, lm = self.cfg, self.lm
        device = str(lm.model.device)
        seqs = drift.probe_texts(lm, cfg.replay_samples, cfg.replay_seq_len, self.SEED_OFFSET + cfg.seed, device)
        ids, mask = pack_right(seqs, pad_id(lm.tokenizer))
        mask = mask.long()
        # before any update (and before --resume writes the checkpoint's values)
        base_lp = drift.base_log_probs(lm, ids, mask, 8, device) if cfg.replay_loss == "kl" else None
        return (ids, mask), base_lp

    def extra_backward(self, step, device, dtype):
        cfg = self.cfg
        ids, mask = self.pool
        n = max(1, math.ceil(cfg.replay_ratio * cfg.batch_size * cfg.grad_accum))
        g = torch.Generator().manual_seed(step_seed(cfg.seed + self.SEED_OFFSET, step))
        pick = torch.randint(len(ids), (n,), generator=g)
        loss = replay_loss(self.lm, ids[pick].to(device), mask[pick].to(device),
                           None if self.base_lp is None else self.base_lp[pick].to(device))
        (cfg.replay_weight * loss).backward()
        self.last = {"replay_loss": float(loss.detach())}

    def step_metrics(self):
        return self.last

    def finish(self, tr, out):
        ids, mask = self.pool
        artifacts.write_safetensors(out / "replay.safetensors",
                                    {"input_ids": ids, "attention_mask": mask.to(torch.uint8)},
                                    {"replay_loss": self.cfg.replay_loss, "seed": str(self.SEED_OFFSET + self.cfg.seed)})
        return tr

    def state_bytes(self):
        return sum(t.numel() * t.element_size() for t in (*self.pool, *([self.base_lp] if self.base_lp is not None
                                                                         else [])))

    def describe(self):
        cfg = self.cfg
        return {"pool": {"texts": cfg.replay_samples, "tokens_each": cfg.replay_seq_len,
                         "seed": self.SEED_OFFSET + cfg.seed, "generator": "the probe's sampling (text only)",
                         "file": "replay.safetensors"},
                "per_step": max(1, math.ceil(cfg.replay_ratio * cfg.batch_size * cfg.grad_accum)),
                "loss": cfg.replay_loss, "weight": cfg.replay_weight,
                "objective": "task mean NLL + weight x (lm: mean NLL of the replay tokens | kl: mean KL(base || "
                             "model) over their positions)"}


def replay_loss(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, base_lp: torch.Tensor | None) -> torch.Tensor:
    """Replay's loss on texts ids [n, T] (mask [n, T], 1 = real): without ``base_lp`` the mean next-token
    cross-entropy over the real next tokens; with it ([n, T, V] the base's log-probabilities), the mean
    over real positions of KL(p_base || p_model)."""
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    if base_lp is None:
        keep = mask[:, 1:].bool()
        return nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
    return (drift.kl_terms(base_lp, torch.log_softmax(logits, -1)) * mask).sum() / mask.sum()


class Spider(MethodRun):
    """Extra state, full size per trained parameter: theta_0 (model dtype) and the accumulated
    gradient (fp32). Every trained tensor is blended, a trained projector or lm_head included, as the
    authors' trainer does for every parameter that requires a gradient. The gradient accumulated is
    the clipped one (before_step runs after clipping, as their read after clip_grad_norm_)."""

    def trainable(self, layers, masks):
        tr = super().trainable(layers, masks)
        self.params = dict(tr.params)
        # taken before --resume writes the checkpoint's values: theta_0 is the base model
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.grad_sum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        return tr

    @torch.no_grad()
    def before_step(self, opt):
        for n, p in self.params.items():
            g = opt.grad_of(p)
            if g is not None:
                self.grad_sum[n].add_(g.reshape(p.shape))

    @torch.no_grad()
    def after_step(self, opt):
        for n, p in self.params.items():
            master = opt.state[p].get("master")
            if master is None:
                scoring.spider_blend_(p.data, self.theta0[n], self.grad_sum[n])
            else:  # blend the fp32 master the optimiser keeps, then round once into the model
                scoring.spider_blend_(master.view(p.shape), self.theta0[n], self.grad_sum[n])
                p.copy_(master.view(p.shape))

    def state(self):
        return {f"spider_grad_sum/{n}": g for n, g in self.grad_sum.items()}

    def load_state(self, tensors):
        for n, g in self.grad_sum.items():
            g.copy_(tensors[f"spider_grad_sum/{n}"])

    def state_bytes(self):
        return sum(t.numel() * t.element_size() for d in (self.theta0, self.grad_sum) for t in d.values())

    def describe(self):
        return {"importance": "sigmoid(zscore(|x|)) of theta_0 and of the accumulated clipped gradient "
                              "(unbiased std; all-zero -> 0)",
                "coefficient": "I_ft / (I_pre + I_ft) where I_pre < I_ft else 0; / mean(nonzero), clipped to 1",
                "blend": "theta_0 (1 - c) + theta c after every optimiser step (fp32 master when bf16)",
                "blended_tensors": len(self.params)}


class Peft(MethodRun, abc.ABC):
    """A PEFT tuner on the tuned layers' targeted linears (``--targets``), built by PEFT itself and
    merged into the weights at the end (the delta holds the merged matrices; the adapter is kept in
    RUN/adapter/). The layers' norms stay frozen (the usual adapter setting); projector / vision
    tower / embeddings / lm_head train densely when asked, as for every method.
    Subclasses give ``peft_config(targets)`` and ``describe``."""

    @abc.abstractmethod
    def peft_config(self, targets: list[str]):
        """The PEFT config of this tuner over the given module names."""

    def trainable(self, layers, masks):
        from peft import get_peft_model

        cfg, lm = self.cfg, self.lm
        self.extras = select_trainable(lm, cfg, [], {}).params
        prefix = lm.parts.layers_path
        self.targets = [n for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)
                        and layer_of(n, prefix) in layers
                        and any(TARGETS[t].search(n) for t in parse_targets(cfg.targets))]
        torch.manual_seed(cfg.seed)  # any random init (lora_A); --resume rebuilds the same, then loads values
        self.peft = get_peft_model(lm.model, self.peft_config(self.targets))
        for p in self.extras.values():  # get_peft_model froze everything but the adapters
            p.requires_grad_(True)
        params = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
        self.adapter_numel = sum(p.numel() for n, p in params.items() if n not in self.extras)
        return Trainable(params, {}, layers)

    def finish(self, tr, out):
        self.peft.save_pretrained(out / "adapter")
        self.peft.merge_and_unload()  # W + the tuner's delta, modules back to plain linears and names
        params = {f"{t}.weight": self.lm.model.get_parameter(f"{t}.weight") for t in self.targets}
        params.update(self.extras)
        return Trainable(params, {}, tr.layers)

    def describe(self):
        return {"peft_tuner": type(self.peft.peft_config["default"]).__name__, "target_linears": len(self.targets),
                "adapter_params": self.adapter_numel, "adapter_dir": "adapter", **self.settings()}

    def settings(self) -> dict:
        return {}


class Lora(Peft):
    """LoRA: W + (alpha / r) B A, rank --lora-r, alpha --lora-alpha."""

    def peft_config(self, targets):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=targets, bias="none")

    def settings(self):
        return {"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha, "dropout": self.cfg.lora_dropout}


class Osf(Peft):
    """PEFT's OSF (orthogonal subspace fine-tuning, for continual learning): each matrix's top singular
    directions (--osf-effective-rank of the smaller dimension) are frozen and the rest of its SVD
    trains, with gradients projected orthogonally to the frozen subspace."""

    def peft_config(self, targets):
        from peft import OSFConfig

        rank = self.cfg.osf_effective_rank
        return OSFConfig(target_modules=targets, effective_rank=int(rank) if rank >= 1 else rank)

    def settings(self):
        return {"effective_rank": self.cfg.osf_effective_rank}


class Supertuning(Peft):
    """PEFT's Super-Tuning: a sparse support of each matrix's largest-magnitude entries trains (the
    paper's default magnitude top-k); its size is --ratio of the entries, the budget of the masks."""

    def peft_config(self, targets):
        from peft import SupertuningConfig

        return SupertuningConfig(target_modules=targets, sparsity=1.0 - self.cfg.ratio, select_top=True)

    def settings(self):
        return {"trainable_fraction": self.cfg.ratio, "select_top": True}


for method in (
    FinetuneMethod("full-ft", lambda lm, cfg: MethodRun("full-ft", lm, cfg), "forbidden", True,
                   "the selected layers train densely (the default without --mask)"),
    FinetuneMethod("masked", lambda lm, cfg: Masked("masked", lm, cfg), "required", True,
                   "only the --mask's trainable entries move (the default with --mask)"),
    FinetuneMethod("replay", lambda lm, cfg: Replay("replay", lm, cfg), "optional", False,
                   "data-free rehearsal: the base's own texts mixed into every step (with or without --mask)"),
    FinetuneMethod("spider", lambda lm, cfg: Spider("spider", lm, cfg), "forbidden", False,
                   "SPIDER soft masking: pull entries back to theta_0 by importance after each step"),
    FinetuneMethod("lora", lambda lm, cfg: Lora("lora", lm, cfg), "forbidden", False,
                   "PEFT LoRA adapters on the tuned linears, merged at the end", snapshots=False),
    FinetuneMethod("osf", lambda lm, cfg: Osf("osf", lm, cfg), "forbidden", False,
                   "PEFT OSF: train each tuned linear's low singular subspace, the top one frozen", snapshots=False),
    FinetuneMethod("supertuning", lambda lm, cfg: Supertuning("supertuning", lm, cfg), "forbidden", False,
                   "PEFT Super-Tuning: the --ratio largest-magnitude entries of each tuned linear train",
                   snapshots=False),
):
    FINETUNE_METHODS.register(method.name, method)
