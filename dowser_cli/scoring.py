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


def position_weights(mask: torch.Tensor | None, n: int, device=None) -> torch.Tensor:
    """[n] fp32 weights over flattened positions: 1/#real on real positions (``mask`` true), 0 on
    padding; uniform 1/n when ``mask`` is None."""
    if mask is None:
        return torch.full((n,), 1.0 / n, device=device)
    m = mask.reshape(-1).to(device=device, dtype=torch.float32)
    return m / m.sum().clamp_min(1)


def weighted_abs_mean(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_n weights_n |x_n| over the flattened leading dims of x [..., F]; [F] fp32, into ``out`` if
    given (callers that keep results preallocate them). No detach here: it also runs inside vmapped
    backward passes, where detach has no batching rule; callers pass tensors outside autograd."""
    x = x.reshape(-1, x.shape[-1]).abs()
    return torch.mv(x.T.to(weights.dtype), weights, out=out)


def square_sum(x: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_n keep_n x_n^2 over the flattened leading dims of x [..., F] (keep [N]: 1 on real positions,
    0 on padding); [F] fp32. Summed over a whole probe it is ||X_j||_2^2, Wanda's input norm squared."""
    x = x.reshape(-1, x.shape[-1]).to(keep.dtype)
    return torch.mv(x.square().T, keep, out=out)


def masked_abs_mean(x: torch.Tensor, mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of |x| over every leading dimension, counting only positions where ``mask`` is true.

    x [..., F]; mask bool with shape x.shape[:-1] or None (all positions real). Returns [F] fp32."""
    return weighted_abs_mean(x.detach(), position_weights(mask, x.shape[:-1].numel(), x.device), out)


def mean_score(weight: torch.Tensor, psi: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """S = |W| * (Psi^T A) / P: the mean over probes of |W_ij| psi_i a_j. Returns [out, in] fp32.

    Psi, A >= 0, so |W| * (Psi^T A) = |W * (Psi^T A)|: computed in place, one [out, in] buffer."""
    s = psi.float().T @ act.float()
    return s.mul_(weight.detach()).abs_().div_(psi.shape[0])


def mean_sensitivity(psi: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """(Psi^T A) / P: the mean over probes of psi_i a_j, the score without |W_ij|. [out, in] fp32."""
    return (psi.float().T @ act.float()).div_(psi.shape[0])


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
    total = ((psi.to(w.device).float() @ w) * act.to(w.device).float()).sum()  # factors live on the host
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


# ---- selection -----------------------------------------------------------------------------------------

def exact_k(rho: float, n: int) -> int:
    """k = round(rho * n) entries are trainable (Python's round: half to even)."""
    return int(round(rho * n))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as int32 bit patterns; their integer order is the value order
    (the sign bit is cleared, so -0.0 sorts as 0.0). One int32 copy."""
    x = x.detach().reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    if x.numel() and float(x.min()) < 0:
        raise ValueError("selection needs non-negative scores")
    return x.view(torch.int32) & 0x7FFFFFFF


def lowest_k_threshold(chunks, k: int) -> tuple[int, int]:
    """Exact-k selection over a stream of score tensors without holding them together (a radix select
    on float bit patterns: two histogram passes of 2^16 bins). ``chunks()`` yields the tensors in a
    fixed order every call. Returns (t, r): entries with bits < t are selected, and so are the first r
    entries equal to t, in stream order (the deterministic tie-break)."""
    if k <= 0:
        return 0, 0
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        hist += torch.bincount(_bits(x) >> 16, minlength=1 << 16)
    cum = hist.cumsum(0)
    if k > int(cum[-1]):
        raise ValueError(f"k={k} exceeds the {int(cum[-1])} entries")
    hi = int(torch.searchsorted(cum, torch.tensor(k)))  # first bin where cumulative count reaches k
    below = int(cum[hi - 1]) if hi > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        b = _bits(x)
        low += torch.bincount(b[(b >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    cum2 = low.cumsum(0) + below
    lo = int(torch.searchsorted(cum2, torch.tensor(k)))
    t = (hi << 16) | lo
    before = int(cum2[lo - 1]) if lo > 0 else below
    return t, k - before


class LowestKSelector:
    """Applies a (t, r) threshold from ``lowest_k_threshold`` to the same stream, chunk by chunk."""

    def __init__(self, threshold: tuple[int, int]):
        self.t, self.remaining = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = _bits(x)
        sel = b < self.t
        if self.remaining > 0:
            ties = (b == self.t).nonzero().squeeze(1)[: self.remaining]
            sel[ties] = True
            self.remaining -= len(ties)
        return sel.reshape(x.shape)


def select_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly k lowest entries of one tensor; ties go to the lower flat index."""
    th = lowest_k_threshold(lambda: [scores], k)
    return LowestKSelector(th)(scores)


def select_lowest_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row [out, in]: exactly k lowest entries of every row (stable sort: ties to lower index)."""
    order = torch.sort(scores.float(), dim=1, stable=True).indices[:, :k]
    sel = torch.zeros_like(scores, dtype=torch.bool)
    sel.scatter_(1, order, True)
    return sel


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 [ceil(numel/8)]: element i is bit i % 8 (LSB first) of byte i // 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [ceil(numel/8)] -> bool [numel]."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed uint8 tensor."""
    return int(_POPCOUNT[packed.long()].sum())


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, tied values sharing their average rank (float64)."""
    values, order = torch.sort(x.reshape(-1).double(), stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() + 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


# ---- SPIDER (training-time soft masking, a baseline) -------------------------------------------------

def spider_importance(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(zscore(|x|)) within the tensor: SPIDER's importance transform (the authors'
    ``calculate_rank``), applied to the pretrained weights theta_0 (pretrained importance) and to the
    accumulated gradients (fine-tuning importance). x any shape -> same shape, fp32 in [0, 1).
    The z-score uses the unbiased standard deviation (torch.std's default, as the authors). An all-zero
    tensor gives 0 everywhere (their special case); a constant nonzero one, where the authors' division
    by a zero deviation gives NaN, gives 0.5 everywhere (z = 0)."""
    a = x.float().abs()
    if not bool(a.any()):
        return torch.zeros_like(a)
    std = a.std(unbiased=True) if a.numel() > 1 else a.new_zeros(())
    return torch.sigmoid((a - a.mean()) / std.clamp_min(1e-12))


def spider_coefficients(theta0: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    """Blend coefficients c in [0, 1], same shape as theta0 (SPIDER's "challenge rank"): where the
    fine-tuning importance wins, I_pre < I_ft, c = I_ft / (I_pre + I_ft), elsewhere 0; then divided by
    the mean of the nonzero c and clipped to 1 (so a typical moving entry keeps its whole update)."""
    i_pre, i_ft = spider_importance(theta0), spider_importance(grad_sum)
    wins = i_pre < i_ft
    c = torch.where(wins, i_ft / torch.where(wins, i_pre + i_ft, torch.ones_like(i_ft)), torch.zeros_like(i_ft))
    nz = c != 0
    if nz.any():
        c = (c / c[nz].mean()).clamp_max(1)
    return c


def spider_blend_(theta: torch.Tensor, theta0: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    """theta <- theta_0 (1 - c) + theta c in place (after an optimiser step, the authors' form); entries
    whose pretrained importance dominates (c = 0) return exactly to theta_0, c = 1 keeps theta exactly.
    Returns c."""
    c = spider_coefficients(theta0, grad_sum).to(theta.dtype)
    t0 = theta0.to(theta.dtype)
    theta.copy_(t0 * (1 - c) + theta * c)
    return c
