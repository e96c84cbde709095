"""The masked AdamW: frozen entries bit-identical, trainable entries exactly AdamW, small state."""
import pytest
import torch

from dowser_cli.optim import MaskedAdamW


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def test_frozen_entries_stay_bit_identical_with_weight_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(37, 11))
    base = p.detach().clone()
    mask = torch.rand(37, 11) < 0.1
    opt = MaskedAdamW([p], masks={p: mask}, lr=1e-2, weight_decay=0.1)
    for g in _grads(p.shape, 5):
        p.grad = g
        opt.step()
    assert torch.equal(p.detach()[~mask], base[~mask])          # bit-identical, not merely close
    assert (p.detach()[mask] != base[mask]).all()


def test_trainable_entries_follow_torch_adamw_exactly():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(20, 9))
    mask = torch.rand(20, 9) < 0.3
    ref = torch.nn.Parameter(p.detach()[mask].clone())        # the trainable entries as their own tensor
    opt = MaskedAdamW([p], masks={p: mask}, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    ref_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    for g in _grads(p.shape, 6, seed=3):
        p.grad, ref.grad = g, g[mask].clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p.detach()[mask], ref.detach(), rtol=1e-6, atol=1e-7)


def test_unmasked_parameters_train_densely_like_adamw():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(8))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = MaskedAdamW([p], lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.01)
    for g in _grads(p.shape, 4):
        p.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_state_is_only_for_trainable_entries():
    p = torch.nn.Parameter(torch.randn(100, 50))
    mask = torch.zeros(100, 50, dtype=torch.bool)
    mask.view(-1)[:500] = True                                 # rho = 0.1
    opt = MaskedAdamW([p], masks={p: mask})
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state_numel() == 2 * 500                         # dense AdamW would hold 2 * 5000


def test_bf16_parameters_keep_frozen_bits():
    p = torch.nn.Parameter(torch.randn(16, 16).to(torch.bfloat16))
    base = p.detach().clone()
    mask = torch.eye(16, dtype=torch.bool)
    opt = MaskedAdamW([p], masks={p: mask}, lr=1e-1, weight_decay=0.5)
    p.grad = torch.randn(16, 16).to(torch.bfloat16)
    opt.step()
    assert torch.equal(p.detach()[~mask], base[~mask]) and not torch.equal(p.detach()[mask], base[mask])


def test_compact_gradients_equal_dense_gradients_and_free_the_dense_one():
    torch.manual_seed(3)
    lin_a, lin_b = torch.nn.Linear(12, 10), torch.nn.Linear(12, 10)
    lin_b.load_state_dict(lin_a.state_dict())
    mask = torch.rand(10, 12) < 0.2
    opt_a = MaskedAdamW([lin_a.weight], masks={lin_a.weight: mask}, lr=1e-2, weight_decay=0.1, compact_grads=True)
    opt_b = MaskedAdamW([lin_b.weight], masks={lin_b.weight: mask}, lr=1e-2, weight_decay=0.1)
    x = torch.randn(5, 12)
    for _ in range(3):
        for _ in range(2):                                   # accumulation into the compact buffer
            lin_a(x).pow(2).sum().backward()
            lin_b(x).pow(2).sum().backward()
        assert lin_a.weight.grad is None and opt_a.compact[lin_a.weight].shape == (int(mask.sum()),)
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    assert torch.equal(lin_a.weight, lin_b.weight)


def test_bf16_master_copy_keeps_updates_below_bf16_resolution():
    """lr 1e-5 on weights ~1: each step is below bf16's spacing (2^-7); the fp32 master accumulates them."""
    p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    ref = torch.nn.Parameter(torch.ones(64))
    opt = MaskedAdamW([p], lr=1e-5)
    ref_opt = torch.optim.AdamW([ref], lr=1e-5, weight_decay=0.0)
    for _ in range(2000):
        p.grad, ref.grad = torch.ones_like(p), torch.ones_like(ref)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(opt.state[p]["master"], ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(p.detach(), ref.detach().to(torch.bfloat16))     # the model holds the rounded master
    assert float(p.detach()[0]) < 1.0


def test_clipping_counts_only_trainable_entries():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    opt = MaskedAdamW([p], masks={p: mask})
    p.grad = torch.full((4, 4), 100.0)
    p.grad[0, 0] = 3.0
    assert opt.clip_grad_norm_(1.0) == pytest.approx(3.0)


def test_bf16_gradients_accumulate_in_fp32_masked_and_dense():
    """A bf16 model's micro-batch gradients add up in fp32: a dense bf16 parameter (a norm, a trained
    lm_head) as well as a masked one. In bf16, 1 + 64 x 2^-9 rounds back to 1 at every addition."""
    dense = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    masked = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))
    mask = torch.tensor([[True, False, True], [False, True, False]])
    opt = MaskedAdamW([dense, masked], {masked: mask}, lr=1e-3, compact_grads=True)
    for c in [1.0] + [2.0 ** -9] * 64:          # micro-batches: d loss / d p = c
        ((dense * c).sum() + (masked * c).sum()).backward()
    want = 1.0 + 64 * 2.0 ** -9                 # 1.125, exact in fp32
    g = opt.grad_of(dense)
    assert g.dtype == torch.float32 and torch.equal(g, torch.full((4,), want))
    assert torch.equal(opt.grad_of(masked), torch.full((3,), want))
    assert dense.grad is None and masked.grad is None       # no bf16 copy kept beside them
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    for c in [1.0] + [2.0 ** -9] * 64:
        (plain * c).sum().backward()
    assert float(plain.grad[0]) == 1.0          # what bf16 accumulation gave before
