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
