"""Pure tensor math of the post-hoc baselines `dowser merge` runs on a fine-tuned delta (no model, no I/O).

Notation: a linear layer's weight is [out, in]; its fine-tuned change is delta = W_ft - W_0 [out, in];
its calibration inputs are X [n, in] (one row per real token position). A "patch" is a bool mask
[out, in] of the delta entries that survive; every other entry goes back to the base value.

- DARE (Yu et al., 2024): drop each delta entry with probability p, rescale the survivors by 1/(1-p).
- Model Tailor (Zhu et al., ICML 2024): keep the most salient delta entries (magnitude and OBS
  sensitivity under the calibration Hessian) and compensate them for the reverted ones with the
  SparseGPT / OBS column-by-column update.
- Grafting (Panigrahi et al., 2023): learn a sparse region of the delta through a sigmoid relaxation
  of the mask, then binarise it to the budget.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Patch(NamedTuple):
    """What a method keeps of one tensor's delta: ``keep`` bool [shape]; ``new_delta`` float32 [shape]
    (the kept entries' replacement change, e.g. rescaled or compensated) or None (keep the fine-tuned
    values themselves)."""

    keep: torch.Tensor
    new_delta: torch.Tensor | None


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE on one tensor of any shape. Each entry is kept independently with probability 1-p
    (Bernoulli draws from ``generator``, on the CPU so a seed gives the same mask on any device).
    Returns (keep bool [delta.shape], rescaled delta float32 [delta.shape]: delta / (1-p) where kept,
    0 where dropped)."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    keep = (torch.rand(delta.shape, generator=generator) >= p).to(delta.device)
    scaled = torch.where(keep, delta.float() / (1 - p), torch.zeros((), device=delta.device))
    return keep, scaled


def hessian(xtx: torch.Tensor, n: int, damp: float = 0.01) -> torch.Tensor:
    """The layer-input Hessian of the reconstruction loss, H = 2 X^T X / n + lambda I with
    lambda = damp * mean(diag(2 X^T X / n)) (1 % by default, as SparseGPT and Model Tailor).
    ``xtx`` is the accumulated sum X^T X [in, in] over ``n`` token positions. Returns float64 [in, in].
    A layer whose inputs are all zero gets lambda = damp (H stays invertible)."""
    h = 2.0 * xtx.double() / max(n, 1)
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * (mean_diag if mean_diag > 0 else 1.0)
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """x / max(x) within the tensor (0 stays 0; an all-zero tensor stays all zero)."""
    m = x.max()
    return x / m if m > 0 else torch.zeros_like(x)


def tailor_salience(delta: torch.Tensor, hinv_diag: torch.Tensor, weight: float = 0.8) -> torch.Tensor:
    """Model Tailor's salience of each delta entry, [out, in] float32:
    weight * |delta| / max|delta| + (1 - weight) * s / max(s), with the OBS sensitivity
    s_ij = delta_ij^2 / [H^-1]_jj^2 (the SparseGPT form of w^2 / [H^-1]_qq). Each term is normalised by
    its maximum within the tensor, so both lie in [0, 1] and the 0.8 / 0.2 mix weighs comparable
    quantities. ``hinv_diag`` is diag(H^-1) [in]."""
    d = delta.float()
    sens = d.pow(2) / hinv_diag.float().pow(2).unsqueeze(0)
    return weight * _normalise(d.abs()) + (1 - weight) * _normalise(sens)


def binarise_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [scores.shape] of exactly the k highest entries; ties go to the lower flat index
    (a stable sort), so the count is exact and the choice reproducible."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    order = torch.sort(scores.detach().reshape(-1).float(), descending=True, stable=True).indices[:k]
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep[order] = True
    return keep.reshape(scores.shape)


def hessian_inverse(h: torch.Tensor) -> torch.Tensor:
    """H^-1 [in, in] float64 of a (damped, positive definite) H through its Cholesky factor."""
    return torch.cholesky_inverse(torch.linalg.cholesky(h.double()))


def obs_compensate(delta: torch.Tensor, keep: torch.Tensor, hinv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Revert the entries of ``delta`` [out, in] outside ``keep`` [out, in] (bool, fixed) to zero and
    let the kept entries absorb the error, by the SparseGPT / OBS update for the Hessian H [in, in]
    given as its inverse ``hinv`` [in, in]: with U the upper Cholesky factor of H^-1, columns are processed left to right;
    at column j each row's reverted entry q = delta_rj (current value) is removed, and its error
    q / U_jj is propagated to the later columns as -q / U_jj * U_j,(j+1:) (the OBS-optimal change of
    the not-yet-processed weights given that the earlier ones are fixed). Only kept entries retain the
    update. Blocks of ``block`` columns apply the later-columns update lazily (same result).
    Returns float32 [out, in], zero outside ``keep``. Reduces ||(delta' - delta) X|| (H's quadratic
    form) below plain reverting, delta * keep; with keep all True it returns delta unchanged."""
    w = delta.double().clone()
    m = keep.to(w.device)
    n_in = w.shape[1]
    u = torch.linalg.cholesky(hinv.double().to(w.device), upper=True)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = w1[:, j]
            err = torch.where(m[:, i1 + j], torch.zeros((), dtype=w.dtype, device=w.device), col) / u1[j, j]
            # subtracting err * U_j,j: sets the reverted entries of column j to exactly 0 (err * U_jj = q)
            w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return torch.where(m, w, torch.zeros((), dtype=w.dtype, device=w.device)).float()


def reconstruction_error(new_delta: torch.Tensor, delta: torch.Tensor, xtx: torch.Tensor) -> float:
    """||(delta' - delta) X^T||_F for inputs X [n, in] given as X^T X [in, in] (no X needed):
    sqrt(trace(E X^T X E^T)) with E = delta' - delta [out, in]."""
    e = (new_delta.double() - delta.double())
    return float(((e @ xtx.double()) * e).sum().clamp_min(0).sqrt())


def graft_grad(grad_theta: torch.Tensor, delta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Chain rule of Grafting's relaxation theta = theta_0 + sigmoid(S) * delta (all [out, in]):
    dL/dS = dL/dtheta * delta * sigmoid'(S), with sigmoid'(S) = sigmoid(S) (1 - sigmoid(S)).
    Returns float32 [out, in]."""
    sig = torch.sigmoid(s.float())
    return grad_theta.float() * delta.float() * sig * (1 - sig)


def graft_init(delta: torch.Tensor, k: int, high: float = 3.0, low: float = -3.0) -> torch.Tensor:
    """Initial mask logits S [delta.shape] float32: ``high`` on the k largest |delta| entries (sigmoid
    ~0.95, the region starts as the biggest changes), ``low`` elsewhere (sigmoid ~0.05)."""
    top = binarise_top(delta.abs(), k)
    return torch.where(top, high, low).float()


def patch(base: torch.Tensor, tuned: torch.Tensor, keep: torch.Tensor,
          new_delta: torch.Tensor | None = None) -> torch.Tensor:
    """The merged parameter, in base's dtype and shape: base where not kept; where kept, the
    fine-tuned value itself (``new_delta`` None: bit-exact graft of the region) or base + new_delta."""
    if new_delta is None:
        return torch.where(keep, tuned.to(base.dtype), base)
    return torch.where(keep, (base.float() + new_delta.float()).to(base.dtype), base)
