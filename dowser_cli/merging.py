"""Pure tensor math of the post-hoc baselines `dowser merge` runs on a fine-tuned delta (no model, no I/O).

Notation: a linear layer's weight is [out, in]; its fine-tuned change is delta = W_ft - W_0 [out, in];
its calibration inputs are X [n, in] (one row per real token position). A "patch" is a bool mask
[out, in] of the delta entries that survive; every other entry goes back to the base value.

- DARE (Yu et al., 2024): drop each delta entry with probability p, rescale the survivors by 1/(1-p).
- Model Tailor (Zhu et al., ICML 2024): per block of 128 columns, keep the entries with the highest
  z-scored mix of |delta| and OBS sensitivity under the calibration Hessian, revert the rest, and
  spread the reverted change over the later columns with the SparseGPT column-by-column update.
- Grafting (Panigrahi et al., 2023): start from the largest |delta| entries of all tuned tensors
  together, move the region by SGD on a sigmoid relaxation of the mask, then round it.
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
    """The layer-input Hessian of the reconstruction loss, as SparseGPT and Model Tailor build it:
    H = 2 X^T X / n; a dead input (zero diagonal) gets H_jj = 1; then lambda I is added with
    lambda = damp * mean(diag H) (1 % by default). ``xtx`` is the accumulated sum X^T X [in, in] over
    ``n`` token positions. Returns float64 [in, in]. (The authors average over samples rather than
    positions: a constant factor, which neither the selection nor the compensation sees.)"""
    h = 2.0 * xtx.double() / max(n, 1)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    lam = damp * float(torch.diagonal(h).mean())
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def hinv_cholesky(h: torch.Tensor) -> torch.Tensor:
    """U [in, in] float64, the upper Cholesky factor of H^-1 (H^-1 = U^T U): what SparseGPT's update and
    Model Tailor's sensitivity read (its diagonal U_jj and rows U_j,j:)."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h.double()))
    return torch.linalg.cholesky(hinv, upper=True)


def row_zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - row mean) / row std (unbiased, torch.std's default) of a [rows, cols] block. A row with no
    spread gives 0 (the authors' division gives NaN there)."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True) if x.shape[1] > 1 else torch.zeros_like(mean)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, (x - mean) / safe, torch.zeros_like(x))


def tailor_scores(change: torch.Tensor, w: torch.Tensor, u_diag: torch.Tensor,
                  magnitude_weight: float = 0.8) -> torch.Tensor:
    """Model Tailor's selection score of one block of columns [out, b]:
    magnitude_weight * z_row(|delta|) + (1 - magnitude_weight) * z_row(W^2 / U_jj^2), each z-scored per
    row within the block. ``change`` = |W_ft - W_0| of the block (before any compensation), ``w`` the
    block's current weights (fine-tuned, plus the compensation of earlier blocks), ``u_diag`` [b] the
    block's diagonal of U (hinv_cholesky). Low scores revert to the base."""
    sens = w.pow(2) / u_diag.pow(2).unsqueeze(0)
    return magnitude_weight * row_zscore(change) + (1 - magnitude_weight) * row_zscore(sens)


# the compensation's sign: the official code's `W1[:, i:] += ...`, or SparseGPT's textbook `-=`
COMPENSATION_SIGNS = {"official": 1.0, "sparsegpt": -1.0}


def tailor(w_ft: torch.Tensor, w0: torch.Tensor, u: torch.Tensor, keep: float = 0.1,
           magnitude_weight: float = 0.8, block: int = 128, sign: float = 1.0,
           revert: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model Tailor on one linear weight (the authors' SparseGPT.fasterprune against a pretrained layer).

    w_ft, w0: fine-tuned and base weights [out, in]; u: hinv_cholesky(H) [in, in]. Columns go left to
    right in blocks of ``block``. At each block's start its selection scores are taken (tailor_scores)
    and every entry scoring at or below the block's floor(n (1 - keep))-th smallest score (0-based: the
    authors' ``sort(...)[int(n * sparsity)]`` with ``<=``, so floor(n (1 - keep)) + 1 entries barring
    ties) goes back to its base value. Column by column, each row's removed change e = (w - q) / U_jj
    is spread over the later columns, W[:, j:] += sign * e U_j,j: (across blocks lazily, same result).
    ``sign`` +1 is the official code's ``+=``; -1 SparseGPT's textbook ``-=``, the OBS-optimal update of
    the later columns given the earlier ones. ``revert`` (bool [out, in]) fixes the reverted entries
    instead of scoring them (SparseGPT's fixed-mask path). Returns (the tailored weights, float64
    [out, in]: exactly w0 where reverted, the kept entries carrying the compensation; bool [out, in] of
    the entries that keep a change)."""
    w = w_ft.double().clone()
    base = w0.double().to(w.device)
    change = (w - base).abs()
    u = u.double().to(w.device)
    reverted = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        if revert is None:
            score = tailor_scores(change[:, i1:i2], w1, torch.diagonal(u1), magnitude_weight)
            flat = score.reshape(-1)
            idx = min(int(flat.numel() * (1 - keep)), flat.numel() - 1)
            r1 = score <= torch.kthvalue(flat.cpu(), idx + 1).values.to(w.device)
        else:
            r1 = revert[:, i1:i2].to(w.device)
        reverted[:, i1:i2] = r1
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            q = torch.where(r1[:, j], base[:, i1 + j], col)
            e = (col - q) / u1[j, j]
            w1[:, j:] += sign * e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err1[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] += sign * (err1 @ u[i1:i2, i2:])
    return w, ~reverted


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


def reconstruction_error(new_delta: torch.Tensor, delta: torch.Tensor, xtx: torch.Tensor) -> float:
    """||(delta' - delta) X^T||_F for inputs X [n, in] given as X^T X [in, in] (no X needed):
    sqrt(trace(E X^T X E^T)) with E = delta' - delta [out, in]."""
    e = (new_delta.double() - delta.double())
    return float(((e @ xtx.double()) * e).sum().clamp_min(0).sqrt())


def kth_largest(tensors: list[torch.Tensor], k: int) -> float:
    """The k-th largest value (1-based) over all entries of non-negative float tensors at once, without
    concatenating them (for a 7B model's tuned layers the concatenation alone would be 16 GB): a
    bisection on the float32 bit patterns, which order like the values for x >= 0, counting entries
    >= a candidate tensor by tensor (31 passes)."""
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf as int32 bit patterns

    def at_least(bits: int) -> int:
        v = torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()
        return sum(int((t.float() >= v).sum()) for t in tensors)

    while lo < hi:  # the largest bit pattern b with count(x >= b) >= k
        mid = (lo + hi + 1) // 2
        if at_least(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    return torch.tensor(lo, dtype=torch.int32).view(torch.float32).item()


def graft_budget(total: int, sparsity: float) -> int:
    """Grafting's budget k = int(sparsity * N) entries of all N tuned entries together (at least one)."""
    return max(1, int(sparsity * total))


def graft_base_region(deltas: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Grafting's base region ("highest_movement"): the entries whose |delta| is among the top
    k = graft_budget(N, sparsity) of all N entries of every tuned tensor taken together, selected as
    the authors do, |delta| > the k-th largest |delta| (strict, so k - 1 entries barring ties). Returns a
    bool [shape] per tensor."""
    k = graft_budget(sum(d.numel() for d in deltas.values()), sparsity)
    t = kth_largest([d.abs() for d in deltas.values()], k)
    return {n: d.abs().float() > t for n, d in deltas.items()}


def graft_frac(s: torch.Tensor, base: torch.Tensor, bias: float = 10.0) -> torch.Tensor:
    """The relaxed mask of Grafting, float32 [shape]: frac = base + (1 - 2 base) sigmoid(S - bias), so the
    region is the base region while S << bias, and S pushes an entry across (in or out)."""
    b = base.float()
    return b + (1 - 2 * b) * torch.sigmoid(s.float() - bias)


def graft_grad(grad_theta: torch.Tensor, delta: torch.Tensor, s: torch.Tensor, base: torch.Tensor,
               bias: float = 10.0) -> torch.Tensor:
    """dL/dS for theta = theta_0 + frac(S) * delta (all [shape]): dL/dtheta * delta * (1 - 2 base) *
    sigmoid'(S - bias), with sigmoid'(x) = sigmoid(x) (1 - sigmoid(x)). Returns float32 [shape]."""
    sig = torch.sigmoid(s.float() - bias)
    return grad_theta.float() * delta.float() * (1 - 2 * base.float()) * sig * (1 - sig)


def graft_binarise(fracs: dict[str, torch.Tensor], mode: str = "round", k: int | None = None) -> dict[str, torch.Tensor]:
    """The final region from the relaxed masks: ``round`` (the authors': torch.round(frac), halves to
    even, so the count is whatever it comes to) or ``topk`` (exactly the k highest frac over all
    tensors together, ties to the earlier tensor in name order and the lower flat index)."""
    if mode == "round":
        return {n: torch.round(f) == 1 for n, f in fracs.items()}
    if mode != "topk" or k is None:
        raise ValueError(f"mode {mode!r}: expected round, or topk with k")
    t = kth_largest(list(fracs.values()), k)
    out, left = {}, k - sum(int((f > t).sum()) for f in fracs.values())
    for n in sorted(fracs):
        f = fracs[n]
        region = f > t
        ties = (f == t).reshape(-1).nonzero().squeeze(1)[:max(left, 0)]
        region.reshape(-1)[ties] = True
        left -= len(ties)
        out[n] = region
    return out


def patch(base: torch.Tensor, tuned: torch.Tensor, keep: torch.Tensor,
          new_delta: torch.Tensor | None = None) -> torch.Tensor:
    """The merged parameter, in base's dtype and shape: base where not kept; where kept, the
    fine-tuned value itself (``new_delta`` None: bit-exact graft of the region) or base + new_delta."""
    if new_delta is None:
        return torch.where(keep, tuned.to(base.dtype), base)
    return torch.where(keep, (base.float() + new_delta.float()).to(base.dtype), base)
