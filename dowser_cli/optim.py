"""A masked AdamW: optimiser state only for the trainable entries, and frozen entries never written.

DESIGN section 1 (Fine-tune). A plain gradient mask is not enough: AdamW's decoupled weight decay (and
any momentum left from earlier steps) still moves entries whose gradient is zero. Here a masked
parameter is only ever read and written at its trainable indices, so frozen entries stay bit-identical
whatever the settings, and every piece of per-entry state has k entries, not numel:
- the moments (fp32),
- an fp32 master copy of the trainable values when the model is held in bf16/fp16 (updates of
  lr 2e-5 are below bf16's resolution; without a master copy most of them would round away),
- the trainable indices (int32 where they fit),
- with ``compact_grads``, the gradient itself: a hook gathers each masked matrix's gradient to its k
  entries the moment backward has produced it and frees the dense one, so at most one dense gradient
  of a masked matrix is alive at a time. Gradients gathered there are fp32, and so is the sum over
  micro-batches; a dense parameter held in bf16 / fp16 (norms, a trained lm_head) is gathered the
  same way, so that accumulation never rounds to the model's dtype."""
from __future__ import annotations

import math

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2 parameters and gradients; a view, so in-place writes land in the
    parameter), a plain tensor as is: the optimiser works on what this process holds, masks and state
    included."""
    return t.to_local() if hasattr(t, "to_local") else t


def adamw_update_(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step (Loshchilov & Hutter) in place on w, m, v; all the same shape, fp32 moments."""
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = (v / bias2).sqrt_().add_(eps)
    w.addcdiv_(m, denom, value=-lr / bias1)


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW where a parameter may carry a boolean mask (same shape, True = trainable).

    ``masks``: {parameter: bool tensor}; parameters without a mask train densely (e.g. norms).
    State per parameter: ``exp_avg``, ``exp_avg_sq`` [k] (or the parameter's shape when dense), and
    ``master`` [k] fp32 when the parameter is not fp32.
    For a sharded (DTensor) parameter, everything above is about the local shard: its mask has the
    shard's shape and k counts the shard's trainable entries."""

    def __init__(self, params, masks: dict[torch.nn.Parameter, torch.Tensor] | None = None, lr: float = 2e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 compact_grads: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.index: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.compact: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.compact_grads = compact_grads
        self._hooks = []
        for p, mask in (masks or {}).items():
            if tuple(mask.shape) != tuple(local(p).shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(local(p).shape)}")
            idx = mask.reshape(-1).nonzero().squeeze(1)
            self.index[p] = idx.to(torch.int32 if p.numel() < 2**31 else torch.int64).to(p.device)
        for p in self._params():
            if self._gathers(p):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._gather_grad))
        for group in self.param_groups:
            group.setdefault("peak_lr", group["lr"])
        for p in self._params():
            self._init_state(p)

    @classmethod
    def for_model(cls, model: torch.nn.Module, mask, lr: float = 2e-5, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, train=(),
                  compact_grads: bool = True, zero_frozen_grads: bool = False) -> "MaskedAdamW":
        """A masked AdamW for ``model``. ``mask``: ``dowser_cli.load_mask``'s result, or {parameter
        name: bool tensor of its shape}. Every parameter is frozen (``requires_grad`` False) except the
        mask's, which train at their True entries only, and the names in ``train``, which train densely
        (e.g. norms). With ``compact_grads`` hooks gather each masked gradient to its trainable entries
        as backward produces it, so clip with ``opt.clip_grad_norm_`` (torch's would not see them).
        Optimiser state exists for the trainable entries only; frozen entries stay bit-identical
        whatever the weight decay. ``zero_frozen_grads`` (with dense gradients): a hook zeroes the
        frozen entries of each masked gradient as backward writes it, so that a norm taken over ``.grad``
        by someone else (the HF Trainer's clipping) is the trainable entries' norm.
        ``opt.param_names`` maps each trained parameter to its name."""
        dense = getattr(mask, "dense", mask)
        named = dict(model.named_parameters())
        unknown = [n for n in [*dense, *train] if n not in named]
        if unknown:
            raise KeyError(f"{unknown[0]}: not a parameter of {type(model).__name__}")
        for p in model.parameters():
            p.requires_grad_(False)
        params = {n: named[n] for n in [*dense, *train]}
        for p in params.values():
            p.requires_grad_(True)
        opt = cls(list(params.values()), masks={named[n]: m.to(named[n].device) for n, m in dense.items()}, lr=lr,
                  betas=betas, eps=eps, weight_decay=weight_decay, compact_grads=compact_grads)
        opt.param_names = {p: n for n, p in params.items()}
        if zero_frozen_grads:
            for n, m in dense.items():
                keep = m.to(named[n].device)
                opt._hooks.append(named[n].register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
        return opt

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _init_state(self, p: torch.nn.Parameter) -> None:
        idx = self.index.get(p)
        n = idx.numel() if idx is not None else None
        mine = local(p.detach())
        shape = (n,) if n is not None else mine.shape
        state = self.state[p]
        state["step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=mine.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=mine.device)
        if p.dtype != torch.float32:
            flat = mine.reshape(-1)
            state["master"] = (flat[idx.long()] if idx is not None else flat).float().reshape(shape).clone()

    def _gathers(self, p: torch.nn.Parameter) -> bool:
        """Whether a hook gathers p's gradient into ``compact`` (fp32): masked ones, and dense ones held
        in another dtype, when ``compact_grads``."""
        return self.compact_grads and (p in self.index or p.dtype != torch.float32)

    @torch.no_grad()
    def _gather_grad(self, p: torch.nn.Parameter) -> None:
        idx = self.index.get(p)
        g = local(p.grad)
        g = g.reshape(-1)[idx.long()].float() if idx is not None else g.float()
        if p in self.compact:
            self.compact[p].add_(g)
        else:
            self.compact[p] = g
        p.grad = None

    def grad_of(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The gradient of the trainable entries, fp32: [k] for masked, p's shape for dense."""
        idx = self.index.get(p)
        if p in self.compact:
            return self.compact[p]
        if p.grad is None:
            return None
        g = local(p.grad)
        return g.reshape(-1)[idx.long()].float() if idx is not None else g.float()

    def grad_or_zeros(self, p: torch.nn.Parameter) -> torch.Tensor:
        """``grad_of(p)``, or fp32 zeros put where p's gradient would be when backward produced none
        (a rank whose batch left p out of the graph still takes part in the reduction)."""
        g = self.grad_of(p)
        if g is None:
            idx = self.index.get(p)
            g = torch.zeros(idx.numel() if idx is not None else local(p).shape, dtype=torch.float32,
                            device=local(p).device)
            if self._gathers(p):
                self.compact[p] = g
            else:
                p.grad = g
        return g

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=True)
        self.compact.clear()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, reduce=None) -> float:
        """Scale the trainable entries' gradients so their global L2 norm is at most ``max_norm``
        (frozen entries' gradients are not part of the update and do not count). Returns the norm.
        ``reduce``: sums this process's squared norm over processes when gradients are sharded (every
        process must call it, even one without gradients)."""
        grads = [g for p in self._params() if (g := self.grad_of(p)) is not None]
        sq = sum(float(g.double().pow(2).sum()) for g in grads)
        if reduce is not None:
            sq = reduce(sq)
        elif not grads:
            return 0.0
        norm = math.sqrt(sq)
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in self._params():
                if p in self.compact:
                    self.compact[p].mul_(scale)
                elif p.grad is not None:
                    local(p.grad).mul_(scale)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                g = self.grad_of(p)
                if g is None:
                    continue
                idx = self.index.get(p)
                if idx is not None and idx.numel() == 0:
                    continue  # nothing trainable in this matrix
                state = self.state[p]
                mine = local(p.data)
                if "master" in state:
                    w = state["master"]
                elif idx is not None:
                    w = mine.view(-1)[idx.long()]
                else:
                    w = mine
                state["step"] += 1
                adamw_update_(w, g, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], beta1, beta2,
                              group["eps"], group["weight_decay"])
                if idx is not None:
                    mine.view(-1).index_copy_(0, idx.long(), w.to(p.dtype))
                elif w.data_ptr() != mine.data_ptr():
                    mine.copy_(w)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every floating state tensor to its parameter's dtype: a bf16 model's
        moments and master copy would come back bf16, losing their precision and failing the next
        step. They are kept as saved (fp32), on the parameter's device."""
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, p in zip(saved, self._params()):
            for k, t in state_dict["state"].get(i, {}).items():
                if isinstance(t, torch.Tensor) and t.is_floating_point() and k != "step":
                    self.state[p][k] = t.to(device=local(p).device, copy=True)

    def state_bytes(self) -> int:
        """Bytes of per-entry optimiser state: moments, master copies, trainable indices."""
        total = sum(t.numel() * t.element_size() for s in self.state.values() for k, t in s.items()
                    if isinstance(t, torch.Tensor))
        return total + sum(i.numel() * i.element_size() for i in self.index.values())

    def state_numel(self) -> int:
        """Entries of optimiser state held (both moments)."""
        return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in self.state.values() if "exp_avg" in s)

    def trainable_fraction(self, p: torch.nn.Parameter) -> float:
        idx = self.index.get(p)
        return 1.0 if idx is None else idx.numel() / local(p).numel()

    def named_state(self, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
        """State as flat tensors keyed ``<what>/<param name>`` (for a safetensors checkpoint)."""
        out = {}
        for p, name in names.items():
            for k, t in self.state[p].items():
                if isinstance(t, torch.Tensor):
                    out[f"{k}/{name}"] = t
        return out

    def load_named_state(self, names: dict[torch.nn.Parameter, str], tensors: dict[str, torch.Tensor],
                         step: int) -> None:
        for p, name in names.items():
            state = self.state[p]
            for k in [k for k, t in state.items() if isinstance(t, torch.Tensor)]:
                state[k].copy_(tensors[f"{k}/{name}"])
            state["step"] = step

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
