"""The method's math as small pure tensor functions (no model, no files).

Shapes: a scored linear layer has weight W [out, in], input h [..., in], output z = W h [..., out].
P probes give factor matrices Psi [P, out] (psi rows) and A [P, in] (act rows).
"""
from __future__ import annotations

import torch


def rademacher(shape: tuple[int, ...], generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Entries +-1 with probability 1/2 each, float32, drawn from ``generator`` (on CPU, so that
    results do not depend on the device)."""
    bits = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (bits.float() * 2 - 1).to(device)


def probe_objective(last_logits: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """s = sum_b xi_b . f_b / B for last-position logits f [B, V] and a Rademacher xi [B, V]."""
    return (last_logits.float() * xi).sum() / last_logits.shape[0]


def masked_abs_mean(x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of |x| over every leading dimension, counting only positions where ``mask`` is true.

    x [..., F]; mask bool with shape x.shape[:-1] or None (all positions real). Returns [F] fp32,
    written into ``out`` when given (callers that keep results preallocate them).
    """
    x = x.detach().reshape(-1, x.shape[-1]).float().abs()
    if mask is None:
        weights = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device)
    else:
        m = mask.reshape(-1).to(device=x.device, dtype=x.dtype)
        weights = m / m.sum().clamp_min(1)
    # one reduction: weighted sum over positions = mean over real positions
    return torch.mv(x.T, weights, out=out)


def mean_score(weight: torch.Tensor, psi: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """S = |W| * (Psi^T A) / P: the mean over probes of |W_ij| psi_i a_j. Returns [out, in] fp32."""
    return weight.detach().float().abs() * (psi.float().T @ act.float()) / psi.shape[0]


def score_moments(weight: torch.Tensor, psi: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance over probes of the per-probe score |W_ij| psi_i^(p) a_j^(p),
    both from the factors: E[S^2] = W^2 * ((Psi^2)^T A^2) / P. Returns two [out, in] fp32 tensors.

    Computed in float64: E[S^2] - E[S]^2 cancels badly in fp32 when probes agree closely."""
    w = weight.detach().double().abs()
    psi, act = psi.double(), act.double()
    p = psi.shape[0]
    mean = w * (psi.T @ act) / p
    second = w.square() * (psi.square().T @ act.square()) / p
    return mean.float(), (second - mean.square()).clamp_min(0).float()


def mean_score_scalar(weight: torch.Tensor, psi: torch.Tensor, act: torch.Tensor) -> float:
    """Mean over all entries of ``mean_score`` without building [out, in]:
    sum_p psi_p^T |W| a_p / (P * out * in)."""
    w = weight.detach().float().abs()
    total = ((psi.float() @ w) * act.float()).sum()
    return float(total / (psi.shape[0] * w.numel()))


class DenseRunningMoments:
    """Reference accumulation as the authors' script does it: a dense |W| * outer(psi, a) per probe
    folded into fp32 running mean and variance (Welford). O(out*in) memory per module; used by
    tests and benchmarks to check the factored path, never by the tool itself."""

    def __init__(self, weight: torch.Tensor):
        self.w = weight.detach().float().abs()
        self.n = 0
        self.mean = torch.zeros_like(self.w)
        self.m2 = torch.zeros_like(self.w)

    def update(self, psi: torch.Tensor, act: torch.Tensor) -> None:
        s = self.w * torch.outer(psi.float(), act.float())
        self.n += 1
        delta = s - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (s - self.mean)

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)
