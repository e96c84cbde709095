import torch

from dowser_cli import scoring


def test_masked_abs_mean_hand_computed():
    x = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[-5.0, 6.0], [50.0, 50.0], [60.0, 60.0]]])   # [B=2, T=3, F=2]
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # real positions: (1,-2), (3,4), (-5,6) -> mean |.| = (9/3, 12/3)
    assert torch.allclose(scoring.masked_abs_mean(x, mask), torch.tensor([3.0, 4.0]))
    assert torch.allclose(scoring.masked_abs_mean(x[:, :1]), torch.tensor([3.0, 4.0]))


def test_rademacher_is_pm_one_and_seeded():
    a = scoring.rademacher((4, 1000), torch.Generator().manual_seed(3))
    b = scoring.rademacher((4, 1000), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 0.05


def test_probe_objective():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    xi = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert scoring.probe_objective(f, xi).item() == ((1 - 2) + (-3 + 4)) / 2


def test_factored_mean_and_variance_match_dense_running_moments():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g)
    psi = torch.rand(13, 7, generator=g)
    act = torch.rand(13, 5, generator=g)
    dense = scoring.DenseRunningMoments(w)
    for p in range(13):
        dense.update(psi[p], act[p])
    mean, var = scoring.score_moments(w, psi, act)
    assert torch.allclose(mean, dense.mean, rtol=1e-5, atol=1e-7)
    assert torch.allclose(var, dense.variance, rtol=1e-4, atol=1e-6)
    assert torch.allclose(scoring.mean_score(w, psi, act), mean)
    # brute force, one entry: |W_ij| * mean_p psi_i a_j
    i, j = 3, 2
    assert torch.isclose(mean[i, j], w[i, j].abs() * (psi[:, i] * act[:, j]).mean())


def test_mean_score_scalar():
    g = torch.Generator().manual_seed(1)
    w, psi, act = torch.randn(6, 4, generator=g), torch.rand(3, 6, generator=g), torch.rand(3, 4, generator=g)
    assert abs(scoring.mean_score_scalar(w, psi, act) - scoring.mean_score(w, psi, act).mean().item()) < 1e-6


# ---- selection, packing, ranks ---------------------------------------------------------------------

import pytest


def _brute_lowest(x: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(x.numel()), key=lambda i: (float(x.reshape(-1)[i]), i))  # ties -> lower index
    sel = torch.zeros(x.numel(), dtype=torch.bool)
    sel[order[:k]] = True
    return sel.reshape(x.shape)


@pytest.mark.parametrize("k", [0, 1, 7, 50, 99, 100])
def test_select_lowest_exact_k_with_ties(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 5, (10, 10), generator=g).float() / 4  # heavy ties, zeros included
    sel = scoring.select_lowest(x, k)
    assert int(sel.sum()) == k
    assert torch.equal(sel, _brute_lowest(x, k))


def test_streaming_threshold_matches_brute_force_across_chunks():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.rand(7, 5, generator=g), torch.zeros(3, 4), torch.rand(11, generator=g).round(decimals=1)]
    flat = torch.cat([c.reshape(-1) for c in chunks])
    for k in (0, 5, 12, 20, flat.numel()):
        sel = scoring.LowestKSelector(scoring.lowest_k_threshold(lambda: iter(chunks), k))
        got = torch.cat([sel(c).reshape(-1) for c in chunks])
        assert int(got.sum()) == k and torch.equal(got, _brute_lowest(flat, k))


def test_select_lowest_rows():
    x = torch.tensor([[3.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    sel = scoring.select_lowest_rows(x, 2)
    assert sel.tolist() == [[False, True, False, True], [True, True, False, False]]


def test_exact_k_rounding():
    assert scoring.exact_k(0.1, 95) == 10 and scoring.exact_k(0.1, 94) == 9 and scoring.exact_k(1.0, 13) == 13


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 1001])
def test_pack_unpack_round_trip(n):
    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = scoring.pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(scoring.unpack_bits(packed, n), m)
    assert scoring.popcount(packed) == int(m.sum())


def test_pack_bit_order_is_lsb_first():
    m = torch.zeros(10, dtype=torch.bool)
    m[0] = m[3] = m[9] = True
    assert scoring.pack_bits(m).tolist() == [0b00001001, 0b00000010]


def test_average_ranks_and_spearman():
    assert scoring.average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [1.0, 2.5, 2.5, 0.0]
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert scoring.spearman(a, a ** 3) == pytest.approx(1.0)
    assert scoring.spearman(a, -a) == pytest.approx(-1.0)
    # hand-worked: ranks (0,1,2,3) vs (1,0,3,2): d^2 sum = 4 -> 1 - 6*4/(4*15) = 0.6
    assert scoring.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, 1, 4, 3])) == pytest.approx(0.6)


def _spider_reference(theta0, grads, theta):
    """SPIDER's blend written out entry by entry in Python floats, from the published description and
    the authors' SPIDER.py: I = sigmoid((|x| - mean) / std) with the unbiased std (all-zero -> 0);
    c = I_ft / (I_pre + I_ft) where I_pre < I_ft else 0; c / mean(nonzero c), clipped to 1;
    theta_0 (1 - c) + theta c."""
    import math

    def importance(x):
        a = [abs(v) for v in x]
        if not any(a):
            return [0.0] * len(a)
        m = sum(a) / len(a)
        sd = math.sqrt(sum((v - m) ** 2 for v in a) / (len(a) - 1)) if len(a) > 1 else 0.0
        if sd == 0:  # a constant nonzero tensor (a norm's weight at 1): z = 0 (the authors' gives NaN)
            return [0.5] * len(a)
        return [1 / (1 + math.exp(-(v - m) / sd)) for v in a]

    t0, g, t = theta0.flatten().tolist(), grads.flatten().tolist(), theta.flatten().tolist()
    pre, ft = importance(t0), importance(g)
    c = [f / (p + f) if p < f else 0.0 for p, f in zip(pre, ft)]
    nz = [v for v in c if v != 0]
    if nz:
        m = sum(nz) / len(nz)
        c = [min(v / m, 1.0) for v in c]
    out = [a * (1 - k) + b * k for a, b, k in zip(t0, t, c)]
    return torch.tensor(c, dtype=torch.float64).reshape(theta0.shape), torch.tensor(out, dtype=torch.float64).reshape(theta0.shape)


def test_spider_importance_is_sigmoid_of_the_unbiased_z_scored_magnitude():
    import math

    x = torch.tensor([[1.0, -2.0], [3.0, -6.0]])
    a = [1.0, 2.0, 3.0, 6.0]
    mean = sum(a) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in a) / 3)   # unbiased, as torch.std and the authors
    want = torch.tensor([1 / (1 + math.exp(-(v - mean) / std)) for v in a]).reshape(2, 2)
    torch.testing.assert_close(scoring.spider_importance(x), want)
    biased = math.sqrt(sum((v - mean) ** 2 for v in a) / 4)
    assert abs(1 / (1 + math.exp(-(6 - mean) / biased)) - float(want[1, 1])) > 1e-3  # the old std differed
    assert torch.equal(scoring.spider_importance(torch.zeros(3)), torch.zeros(3))        # all-zero -> 0
    assert torch.equal(scoring.spider_importance(torch.full((3,), 7.0)), torch.full((3,), 0.5))


def test_spider_blend_matches_the_official_formula_on_a_hand_built_case():
    # 2 x 3 values chosen so the official c = I_ft / (I_pre + I_ft) and the old relu(I_ft - I_pre)
    # disagree on which entries reach c = 1 after the mean normalisation
    theta0 = torch.tensor([[0.1, -2.0, 0.5], [3.0, -0.2, 1.0]])
    grads = torch.tensor([[0.9, 0.1, -0.4], [0.05, -0.7, 0.3]])
    theta = theta0 + torch.tensor([[0.01, -0.02, 0.03], [-0.04, 0.05, -0.06]])
    want_c, want = _spider_reference(theta0, grads, theta)
    moved = theta.clone()
    c = scoring.spider_blend_(moved, theta0, grads)
    torch.testing.assert_close(c.double(), want_c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moved.double(), want, rtol=1e-6, atol=1e-7)
    dominated = want_c == 0
    assert dominated.any() and torch.equal(moved[dominated], theta0[dominated])   # exactly back at theta_0
    full = want_c == 1
    assert full.any() and torch.equal(moved[full], theta[full])                   # whole update kept
    # the old formula (relu(I_ft - I_pre), biased std) gives different coefficients here
    def old_imp(x):
        a = x.abs()
        return torch.sigmoid((a - a.mean()) / a.std(unbiased=False))
    raw = (old_imp(grads) - old_imp(theta0)).clamp_min(0)
    old_c = (raw / raw[raw > 0].mean()).clamp_max(1)
    assert (old_c - want_c.float()).abs().max() > 0.05


def test_spider_blend_matches_the_reference_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(16, 8, generator=g)
    grads = torch.randn(16, 8, generator=g)
    theta = theta0 + 0.01 * torch.randn(16, 8, generator=g)
    want_c, want = _spider_reference(theta0, grads, theta)
    moved = theta.clone()
    c = scoring.spider_blend_(moved, theta0, grads)
    torch.testing.assert_close(c.double(), want_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moved.double(), want, rtol=1e-5, atol=1e-6)
    assert 0.2 < float((c == 0).float().mean()) < 0.8 and (c == 1).any() and ((c > 0) & (c < 1)).any()
    # an all-zero accumulated gradient (nothing reached the tensor): I_ft = 0 < I_pre nowhere -> c = 0
    back = theta.clone()
    assert torch.equal(scoring.spider_blend_(back, theta0, torch.zeros_like(grads)), torch.zeros_like(c))
    assert torch.equal(back, theta0)
