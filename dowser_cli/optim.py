"""A masked AdamW: optimiser state only for the trainable entries, and frozen entries never written.

Groundwork for `dowser finetune` (DESIGN section 1, Fine-tune). A plain gradient mask is not enough:
AdamW's decoupled weight decay (and any momentum left from earlier steps) still moves entries whose
gradient is zero. Here a masked parameter is only ever read and written at its trainable indices, so
frozen entries stay bit-identical whatever the settings, and the moments have k entries, not numel."""
from __future__ import annotations

import torch


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

    ``masks``: {parameter: bool tensor}; parameters without a mask train densely (e.g. norms)."""

    def __init__(self, params, masks: dict[torch.nn.Parameter, torch.Tensor] | None = None, lr: float = 2e-5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.index: dict[torch.nn.Parameter, torch.Tensor] = {}
        for p, mask in (masks or {}).items():
            if tuple(mask.shape) != tuple(p.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(p.shape)}")
            self.index[p] = mask.reshape(-1).nonzero().squeeze(1).to(p.device)

    def state_numel(self) -> int:
        """Entries of optimiser state held (both moments)."""
        return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in self.state.values() if "exp_avg" in s)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx = self.index.get(p)
                if idx is not None and idx.numel() == 0:
                    continue  # nothing trainable in this matrix
                flat = p.view(-1) if idx is not None else None
                w = flat[idx].float() if idx is not None else p.float()
                g = p.grad.view(-1)[idx].float() if idx is not None else p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(w)
                    state["exp_avg_sq"] = torch.zeros_like(w)
                state["step"] += 1
                adamw_update_(w, g, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], beta1, beta2,
                              group["eps"], group["weight_decay"])
                if idx is not None:
                    flat.index_copy_(0, idx, w.to(p.dtype))
                elif w.data_ptr() != p.data_ptr():
                    p.copy_(w)
        return loss

    def trainable_fraction(self, p: torch.nn.Parameter) -> float:
        idx = self.index.get(p)
        return 1.0 if idx is None else idx.numel() / p.numel()
