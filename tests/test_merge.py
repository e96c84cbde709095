"""dowser merge: DARE / Model Tailor / Grafting math against brute force, and the stage end to end on a
tiny Full-FT run (one run shared by the module)."""
import json
import math

import pytest
import torch

from dowser_cli import artifacts, finetune, merge, merging
from dowser_cli.errors import UserError
from dowser_cli.artifacts.runs import open_run
from dowser_cli.inspection import describe_run
from dowser_cli.models.runs import load_run
from dowser_cli.finetune import FinetuneConfig
from dowser_cli.merge import MergeConfig

from conftest import run_cli

P = 0.9


# ---- pure math ---------------------------------------------------------------------------------------

def test_dare_keeps_about_one_minus_p_and_rescales_exactly():
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    keep, scaled = merging.dare(delta, P, torch.Generator().manual_seed(0))
    n = delta.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - P)) < 4 * math.sqrt(P * (1 - P) / n)           # binomial, 4 sigma
    assert torch.equal(scaled[keep], delta[keep] / (1 - P))
    assert torch.equal(scaled[~keep], torch.zeros(int((~keep).sum())))
    again, _ = merging.dare(delta, P, torch.Generator().manual_seed(0))
    other, _ = merging.dare(delta, P, torch.Generator().manual_seed(1))
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    assert merging.dare(delta, 0.0, torch.Generator())[0].all()
    # the merged parameter: dropped entries are the base bit for bit
    base = torch.randn(200, 300)
    merged = merging.patch(base, base + delta, keep, scaled)
    assert torch.equal(merged[~keep], base[~keep])
    torch.testing.assert_close(merged[keep] - base[keep], delta[keep] / (1 - P), rtol=1e-5, atol=1e-5)


def test_binarise_top_is_exact_with_ties():
    s = torch.tensor([[1.0, 5.0, 5.0], [5.0, 0.0, 2.0]])
    assert merging.binarise_top(s, 2).tolist() == [[False, True, True], [False, False, False]]
    assert int(merging.binarise_top(torch.zeros(7, 9), 20).sum()) == 20
    assert merging.binarise_top(torch.zeros(3, 3), 4).reshape(-1).tolist() == [True] * 4 + [False] * 5
    with pytest.raises(ValueError):
        merging.binarise_top(s, 7)


def test_hessian_damping_and_dead_inputs():
    x = torch.tensor([[1.0, 0.0], [1.0, 2.0]])                           # n = 2 positions, in = 2
    h = merging.hessian(x.T @ x, 2, damp=0.01)
    raw = 2 * (x.T @ x) / 2                                               # [[2, 2], [2, 4]]
    torch.testing.assert_close(h, raw.double() + 0.01 * 3.0 * torch.eye(2, dtype=torch.float64))
    # an input that is always zero: H_jj = 1 before the damping is taken, as SparseGPT
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    h = merging.hessian(x.T @ x, 2, damp=0.01)
    torch.testing.assert_close(h, torch.tensor([[10.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
                               + 0.01 * 5.5 * torch.eye(2, dtype=torch.float64))


def _layer(out=8, inn=12, n=64, seed=0):
    """A random linear layer's delta [out, in] and correlated calibration inputs X [n, in]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inn, generator=g) @ torch.randn(inn, inn, generator=g)
    return torch.randn(out, inn, generator=g), x


def _tailor_reference(w_ft, w0, u, keep, mw, block, sign):
    """Model Tailor written out in Python floats from the description and the authors' sparsegpt.py:
    per block of columns, score = mw z_row(|W_ft - W_0|) + (1 - mw) z_row(W^2 / U_jj^2) (z per row
    within the block, unbiased std; W the current, compensated weights), revert every entry scoring
    <= the block's int(n (1 - keep))-th smallest score, then column by column q = W_0 where reverted,
    e = (w - q) / U_jj, W[r, j'] += sign e_r U_j,j' for all later columns j' (the whole rest)."""
    import math

    rows, cols = len(w_ft), len(w_ft[0])
    W = [list(r) for r in w_ft]
    change = [[abs(w_ft[r][c] - w0[r][c]) for c in range(cols)] for r in range(rows)]
    kept = [[True] * cols for _ in range(rows)]

    def z(vals):
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        return [(v - m) / sd if sd > 0 else 0.0 for v in vals]

    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        score = []
        for r in range(rows):
            zc = z([change[r][c] for c in range(i1, i2)])
            zs = z([W[r][c] ** 2 / u[c][c] ** 2 for c in range(i1, i2)])
            score.append([mw * a + (1 - mw) * b for a, b in zip(zc, zs)])
        flat = sorted(v for row in score for v in row)
        thresh = flat[min(int(len(flat) * (1 - keep)), len(flat) - 1)]
        for j in range(i1, i2):
            for r in range(rows):
                revert = score[r][j - i1] <= thresh
                q = w0[r][j] if revert else W[r][j]
                e = (W[r][j] - q) / u[j][j]
                for jj in range(j + 1, cols):
                    W[r][jj] += sign * e * u[j][jj]
                W[r][j] = q
                kept[r][j] = not revert
    return torch.tensor(W, dtype=torch.float64), torch.tensor(kept)


HAND_W0 = [[0.50, -1.00, 0.25, 2.00, -0.40, 0.80], [1.50, 0.75, -0.50, 0.10, 0.30, -1.20],
           [-0.30, 0.20, 1.10, -0.90, 0.60, 0.05]]
HAND_DELTA = [[0.40, -0.05, 0.30, 0.02, -0.15, 0.22], [-0.01, 0.60, 0.05, -0.35, 0.12, 0.07],
              [0.20, -0.25, 0.01, 0.45, -0.09, 0.33]]
HAND_X = [[1.0, 0.5, -0.2, 0.3, 0.1, -0.4], [0.2, 1.0, 0.4, -0.6, 0.5, 0.2], [-0.7, 0.1, 1.0, 0.2, -0.3, 0.6],
          [0.3, -0.4, 0.6, 1.0, 0.2, -0.1], [1.2, 0.8, -0.5, 0.1, 1.0, 0.3], [0.1, -0.2, 0.3, -0.5, 0.4, 1.0],
          [0.6, 0.3, 0.2, 0.7, -0.8, 0.5]]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tailor_matches_the_reference_on_a_hand_built_layer(sign):
    # 3 x 6 weights, blocks of 3 columns, keep 0.5: per block int(9 * 0.5) + 1 = 5 entries revert
    w0 = torch.tensor(HAND_W0, dtype=torch.float64)
    w_ft = w0 + torch.tensor(HAND_DELTA, dtype=torch.float64)
    x = torch.tensor(HAND_X)
    u = merging.hinv_cholesky(merging.hessian(x.T @ x, len(x)))
    got, keep = merging.tailor(w_ft, w0, u, keep=0.5, block=3, sign=sign)
    want, want_keep = _tailor_reference(w_ft.tolist(), w0.tolist(), u.tolist(), 0.5, 0.8, 3, sign)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert [int((~keep[:, b:b + 3]).sum()) for b in (0, 3)] == [5, 5]
    assert torch.equal(got[~keep], w0[~keep])                       # reverted: exactly the base
    # the old selection (max-normalised |delta| and delta^2 / [H^-1]_jj^2 over the whole matrix, exactly
    # round(keep * numel) kept) picks a different patch on this layer
    d = w_ft - w0
    sens = d.pow(2) / torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(merging.hessian(x.T @ x, len(x))))).pow(2)
    old = 0.8 * d.abs() / d.abs().max() + 0.2 * sens / sens.max()
    assert not torch.equal(merging.binarise_top(old, 8), keep)


def test_tailor_matches_the_reference_on_random_layers():
    delta, x = _layer(out=6, inn=10, n=40, seed=5)
    w0 = torch.randn(6, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    u = merging.hinv_cholesky(merging.hessian(x.T @ x, len(x)))
    got, keep = merging.tailor(w0 + delta, w0, u, keep=0.2, magnitude_weight=0.7, block=4, sign=1.0)
    want, want_keep = _tailor_reference((w0 + delta).tolist(), w0.tolist(), u.tolist(), 0.2, 0.7, 4, 1.0)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_textbook_sign_is_the_least_squares_compensation_and_the_official_sign_is_not():
    """Column 0 reverted (fixed), everything else free: with SparseGPT's textbook sign the update is the
    brute-force least squares min over the other columns of e^T H e per row (e = delta' - delta, H
    damped), solved as an overdetermined system with lstsq on H's square root. The official `+=`
    moves the other columns the opposite way: further from the fine-tuned outputs than plain reverting."""
    delta, x = _layer()
    w0 = torch.zeros_like(delta, dtype=torch.float64)
    h = merging.hessian(x.T @ x, len(x))
    u = merging.hinv_cholesky(h)
    revert = torch.zeros_like(delta, dtype=torch.bool)
    revert[:, 0] = True
    got, keep = merging.tailor(delta, w0, u, block=5, sign=-1.0, revert=revert)
    assert torch.equal(keep, ~revert)
    lt = torch.linalg.cholesky(h).T                                   # e^T H e = ||L^T e||^2, H = L L^T
    ref = delta.double().clone()
    ref[:, 0] = 0
    for r in range(delta.shape[0]):
        e0 = -delta[r, 0].double()
        e_rest = torch.linalg.lstsq(lt[:, 1:], -(lt[:, 0] * e0).unsqueeze(1)).solution.squeeze(1)
        ref[r, 1:] = delta[r, 1:].double() + e_rest
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    official, _ = merging.tailor(delta, w0, u, block=5, sign=1.0, revert=revert)
    xtx = x.T @ x
    err = {name: merging.reconstruction_error(w.float(), delta, xtx)
           for name, w in (("sparsegpt", got), ("official", official), ("revert", delta * keep))}
    assert err["sparsegpt"] < err["revert"] < err["official"]


def test_tailor_keeps_everything_with_keep_one_and_blocks_are_only_an_evaluation_order_for_fixed_masks():
    delta, x = _layer(out=5, inn=9, n=50, seed=2)
    w0 = torch.zeros_like(delta, dtype=torch.float64)
    u = merging.hinv_cholesky(merging.hessian(x.T @ x, len(x)))
    revert = torch.rand(delta.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    a, _ = merging.tailor(delta, w0, u, block=9, sign=-1.0, revert=revert)
    b, _ = merging.tailor(delta, w0, u, block=2, sign=-1.0, revert=revert)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    none, keep = merging.tailor(delta, w0, u, sign=1.0, revert=torch.zeros_like(revert))
    assert keep.all() and torch.equal(none, delta.double())


def test_kth_largest_and_the_graft_base_region_against_a_sort():
    g = torch.Generator().manual_seed(0)
    deltas = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(13, generator=g), "c": torch.randn(3, 4, generator=g)}
    flat = torch.cat([d.abs().reshape(-1) for d in deltas.values()]).sort(descending=True).values
    for k in (1, 5, 17, len(flat)):
        assert merging.kth_largest([d.abs() for d in deltas.values()], k) == float(flat[k - 1])
    region = merging.graft_base_region(deltas, 0.2)
    k = int(0.2 * len(flat))                                           # over all tensors at once
    want = {n: d.abs() > flat[k - 1] for n, d in deltas.items()}      # the authors' strict threshold
    assert all(torch.equal(region[n], want[n]) for n in deltas)
    assert sum(int(r.sum()) for r in region.values()) == k - 1
    # per tensor the share differs: one budget over all of them, not one per matrix
    assert len({round(float(r.float().mean()), 3) for r in region.values()}) > 1


def test_graft_base_region_on_a_hand_built_case_is_one_budget_over_all_tensors():
    # 7 entries over two tensors, budget 0.3: k = int(2.1) = 2, the 2nd largest |delta| is 0.8 and the
    # authors' strict threshold keeps only 0.9; the old per-matrix exact budget kept 0.9 AND 0.8
    deltas = {"a": torch.tensor([0.9, -0.1, 0.2]), "b": torch.tensor([0.05, -0.8, 0.3, 0.01])}
    region = merging.graft_base_region(deltas, 0.3)
    assert region["a"].tolist() == [True, False, False] and region["b"].tolist() == [False] * 4
    old = {n: merging.binarise_top(d.abs(), round(0.3 * d.numel())) for n, d in deltas.items()}
    assert old["b"].tolist() == [False, True, False, False]
    # one relaxed SGD step by hand: frac = s + (1 - 2s) sigmoid(S - 10), S -= lr * g * delta * (1 - 2s) sigmoid'
    s_a = torch.tensor([0.2, 0.5, 0.9])
    g_a = torch.tensor([-1.0, 2.0, -3.0])
    step = merging.graft_grad(g_a, deltas["a"], s_a, region["a"])
    import math
    want = []
    for sv, gv, dv, bv in zip(s_a.tolist(), g_a.tolist(), deltas["a"].tolist(), [1.0, 0.0, 0.0]):
        sig = 1 / (1 + math.exp(-(sv - 10)))
        want.append(gv * dv * (1 - 2 * bv) * sig * (1 - sig))
    torch.testing.assert_close(step, torch.tensor(want), rtol=1e-6, atol=1e-12)


def test_graft_relaxation_gradient_and_binarisation():
    g = torch.Generator().manual_seed(0)
    theta0, delta, target = (torch.randn(4, 5, generator=g) for _ in range(3))
    base = torch.rand(4, 5, generator=g) < 0.3
    s = (torch.rand(4, 5, generator=g) * 20).requires_grad_(True)
    frac = base.float() + (1 - 2 * base.float()) * torch.sigmoid(s - 10.0)
    torch.testing.assert_close(merging.graft_frac(s.detach(), base), frac.detach())
    loss = ((theta0 + frac * delta - target) ** 2).sum()
    loss.backward()
    grad_theta = 2 * (theta0 + frac.detach() * delta - target)
    torch.testing.assert_close(merging.graft_grad(grad_theta, delta, s.detach(), base), s.grad)
    # S far below the bias: the relaxed mask rounds to the base region
    start = merging.graft_frac(torch.rand(4, 5, generator=g), base)
    assert torch.equal(merging.graft_binarise({"x": start})["x"], base)
    fracs = {"x": frac.detach(), "y": torch.tensor([0.5, 0.9, 0.1])}
    rounded = merging.graft_binarise(fracs, "round")
    assert torch.equal(rounded["x"], frac.detach() > 0.5) and rounded["y"].tolist() == [False, True, False]
    top = merging.graft_binarise(fracs, "topk", 7)
    allf = torch.cat([fracs["x"].reshape(-1), fracs["y"]])
    assert sum(int(t.sum()) for t in top.values()) == 7
    assert torch.cat([top["x"].reshape(-1), top["y"]]).equal(allf >= allf.sort(descending=True).values[6])


# ---- the stage on a tiny Full-FT run --------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Image data and a 3-step Full-FT of tiny-llava with the projector trained, shared by the tests."""
    from PIL import Image

    d = tmp_path_factory.mktemp("merge")
    (d / "img").mkdir()
    recs, g = [], torch.Generator().manual_seed(0)
    for i in range(12):
        Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()).save(d / "img" / f"{i}.png")
        recs.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat digit is shown?"},
                                                            {"from": "gpt", "value": str(i % 10)}]})
    (d / "train.json").write_text(json.dumps(recs))
    cfg = FinetuneConfig(lr=1e-3, max_steps=3, batch_size=4, warmup_ratio=0.0, train_projector=True)
    finetune.run("tiny-llava", d / "train.json", d / "ft", cfg, image_folder=d / "img")
    return d


def _values(run_dir):
    """(base, fine-tuned source, merged) values of every tensor the source trained, and the targets."""
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    base = dict(load_model(src, load_config(src), torch.float32, "cpu", tokenizer=False).model.named_parameters())
    source = open_run(run_dir.parent / "ft")
    tuned = dict(load_run(source).model.named_parameters())
    merged = artifacts.read_tensors(run_dir / "delta.safetensors")
    targets = [n for n in merged if ".layers." in n and "language_model" in n and n.endswith("proj.weight")]
    return ({n: base[n].detach() for n in merged}, {n: tuned[n].detach() for n in merged}, merged, targets)


def _check_readable(run_dir, every_type_changed=True):
    """The output is a run directory like finetune's: open_run / load_run / eval-forgetting's checks."""
    from dowser_cli import evaluate

    run = open_run(run_dir)
    assert run.mask is None and not any(v["masked"] for v in run.params.values())
    assert set(run.params) == set(open_run(run_dir.parent / "ft").params)
    lm = load_run(run)
    merged = artifacts.read_tensors(run_dir / "delta.safetensors")
    for n, v in merged.items():
        assert torch.equal(lm.model.get_parameter(n).detach(), v), n
    evaluate._check_runs_cheaply("tiny-llava", False, evaluate.expand_specs([run_dir], False), torch.float32)
    info = describe_run(run_dir)                                        # what `dowser inspect` shows
    assert info["method"] == run.sidecar["method"]
    # (one budget over all tensors, as Grafting's, may leave a whole tensor type at the base)
    assert (all if every_type_changed else any)(r["changed"] > 0 for r in info["rows"])
    return artifacts.read_yaml(run_dir / "run.yaml")


def _others_unchanged(base, tuned, merged, targets):
    others = [n for n in merged if n not in targets]
    assert any("projector" in n for n in others) and any("layernorm" in n for n in others)
    for n in others:
        assert torch.equal(merged[n], tuned[n]), n


def test_dare_end_to_end_from_the_cli(work):
    out = work / "dare"
    r = run_cli("merge", work / "ft", "--method", "dare", "--p", str(P), "--seed", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    base, tuned, merged, targets = _values(out)
    assert len(targets) == 21                                            # 3 layers x 7 linears
    kept = numel = 0
    for n in targets:
        moved = merged[n] != base[n]
        kept += int(moved.sum())
        numel += moved.numel()
        delta = tuned[n] - base[n]
        torch.testing.assert_close(merged[n][moved] - base[n][moved], delta[moved] / (1 - P), rtol=1e-4, atol=1e-6)
    assert abs(kept / numel - (1 - P)) < 4 * math.sqrt(P * (1 - P) / numel)
    _others_unchanged(base, tuned, merged, targets)
    side = _check_readable(out)
    assert side["method"] == "dare" and side["merge"]["options"] == {"p": P} and side["merge"]["seed"] == 3
    assert side["merge"]["kept"]["merged_kept"] == kept and side["merge"]["kept"]["merged_tensors"] == 21
    assert side["merge"]["source_delta_sha256"] == artifacts.sha256_file(work / "ft" / "delta.safetensors")
    assert side["model"]["fingerprint"] == open_run(work / "ft").sidecar["model"]["fingerprint"]
    assert side["config"]["p"] == P and side["timings"]["total_s"] > 0 and side["peak_memory"]["host_rss_mb"] > 0


def _layer_grams(work, overrides, layer):
    """X^T X and position counts of the targets of decoder layer ``layer``, over the same calibration
    examples the stage takes, with a plain full forward of the fine-tuned model whose weights
    ``overrides`` replaces (independent of the stage's layer-by-layer flow)."""
    from dowser_cli.training import LossHead

    cfg = MergeConfig(method="tailor", calib_samples=8)
    ctx = merge.setup(work / "ft", cfg, merge.MERGE_METHODS.get("tailor", "--method"), work / "train.json", work / "img")
    model = ctx.lm.model
    with torch.no_grad():
        for n, v in overrides.items():
            model.get_parameter(n).copy_(v)
    names = [n for n in ctx.targets if f".layers.{layer}." in n]
    grams, state = {}, {}

    def hook_for(name):
        def hook(module, args):
            rows = args[0][state["mask"]].float()
            g = grams.setdefault(name, [0, 0])
            g[0] = g[0] + rows.T @ rows
            g[1] += rows.shape[0]
        return hook
    handles = [model.get_submodule(n.rsplit(".", 1)[0]).register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for batch in ctx._batches(ctx.calibration_indices()):
            state["mask"] = batch["attention_mask"].bool()
            LossHead(ctx.lm)(batch)
    for h in handles:
        h.remove()
    return grams


def test_tailor_end_to_end_per_block_budget_and_calibration_through_the_tailored_layers(work):
    out = work / "tailor"
    r = run_cli("merge", work / "ft", "--method", "tailor", "--data", work / "train.json", "--image-folder",
                work / "img", "--keep", "0.2", "--calib-samples", "8", "--out", out)
    assert r.returncode == 0, r.stderr
    base, tuned, merged, targets = _values(out)
    for n in targets:
        kept = merged[n] != base[n]
        rows, cols = kept.shape
        for i1 in range(0, cols, 128):                                  # per block: n - (int(0.8 n) + 1) keep
            blk = kept[:, i1:i1 + 128]
            assert int(blk.sum()) == blk.numel() - (int(blk.numel() * 0.8) + 1), n
    _others_unchanged(base, tuned, merged, targets)
    side = _check_readable(out)
    assert side["merge"]["compensation"] == "official" and side["merge"]["options"]["block"] == 128
    assert side["inputs"]["data"]["sha256"] == artifacts.sha256_file(work / "train.json")
    # layer 0 is calibrated on the fine-tuned model's own inputs; layer 1 on what the TAILORED layer 0
    # passes on: each layer's patch is merging.tailor on those inputs, recomputed here with full forwards
    layer0 = [n for n in targets if ".layers.0." in n]
    for layer, overrides in ((0, {}), (1, {n: merged[n] for n in layer0})):
        grams = _layer_grams(work, overrides, layer)
        for n, (xtx, count) in grams.items():
            u = merging.hinv_cholesky(merging.hessian(xtx, count))
            w, keep = merging.tailor(tuned[n], base[n], u, keep=0.2, sign=1.0)
            assert torch.equal(keep, merged[n] != base[n]), n
            torch.testing.assert_close(merged[n], w.float(), rtol=1e-5, atol=1e-6)
    # with the textbook sign the compensation lands closer to the fine-tuned outputs than plain reverting
    text = work / "tailor-sparsegpt"
    r = run_cli("merge", work / "ft", "--method", "tailor", "--data", work / "train.json", "--image-folder",
                work / "img", "--keep", "0.2", "--calib-samples", "8", "--compensation", "sparsegpt", "--out", text)
    assert r.returncode == 0, r.stderr
    rms = artifacts.read_yaml(text / "run.yaml")["merge"]["reconstruction_rms"]
    assert rms["compensated"] < rms["reverted"]
    official = side["merge"]["reconstruction_rms"]
    assert official["compensated"] > official["reverted"]              # the official sign's finding


def test_graft_starts_from_the_global_top_delta_and_grafts_the_fine_tuned_values(work):
    out = work / "graft0"
    r = run_cli("merge", work / "ft", "--method", "graft", "--data", work / "train.json", "--image-folder",
                work / "img", "--budget", "0.05", "--steps", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(out / "run.yaml")
    base, tuned, merged, _ = _values(out)
    layer = [n for n in merged if ".layers." in n and "language_model" in n]
    assert any("layernorm" in n for n in layer)                         # norms are grafted too
    # no steps: the region is the base region, |delta| > the k-th largest over all layer tensors together
    flat = torch.cat([(tuned[n] - base[n]).abs().reshape(-1) for n in layer]).sort(descending=True).values
    k = int(0.05 * len(flat))
    count = 0
    for n in layer:
        region = (tuned[n] - base[n]).abs() > flat[k - 1]
        assert torch.equal(merged[n], torch.where(region, tuned[n], base[n])), n
        count += int(region.sum())
    g = side["merge"]
    # strictly above the k-th largest: k - 1 entries, fewer where values tie with it
    assert g["budget_entries"] == k and g["base_region_entries"] == g["region_entries"] == count
    assert 0.99 * k < count <= k - 1
    assert g["region_minus_budget"] == count - k and g["entries_moved_in"] == g["entries_moved_out"] == 0
    others = [n for n in merged if n not in layer]
    assert others and all(torch.equal(merged[n], tuned[n]) for n in others)   # the projector keeps its delta
    _check_readable(out, every_type_changed=False)


def test_graft_sgd_moves_the_region_and_topk_cuts_it_to_the_budget(work):
    out = work / "graft"
    side = merge.run(work / "ft", out, MergeConfig(method="graft", budget=0.05, steps=4, lr=1e9, grad_accum=2),
                     data_path=work / "train.json", image_folder=work / "img")
    base, tuned, merged, _ = _values(out)
    g = side["merge"]
    assert [c["step"] for c in g["loss_curve"]] == [1, 2, 3, 4]
    assert g["entries_moved_in"] + g["entries_moved_out"] > 0                  # a large lr: the region moved
    assert g["region_entries"] == g["base_region_entries"] + g["entries_moved_in"] - g["entries_moved_out"]
    for n in merged:                                                             # bit for bit a graft
        assert torch.equal(merged[n], torch.where(merged[n] != base[n], tuned[n], base[n])), n
    assert sum(int((merged[n] != base[n]).sum()) for n in merged if ".layers." in n) == g["region_entries"]
    _check_readable(out, every_type_changed=False)
    r = run_cli("export", out, "--out", work / "graft-export")
    assert r.returncode == 0, r.stderr
    assert (work / "graft-export" / "config.json").is_file()
    top = merge.run(work / "ft", work / "graft-topk", MergeConfig(method="graft", budget=0.05, steps=4, lr=1e9,
                                                                  grad_accum=2, binarise="topk"),
                    data_path=work / "train.json", image_folder=work / "img")
    assert top["merge"]["region_entries"] == top["merge"]["budget_entries"] == g["budget_entries"]


def test_errors_are_one_line(work, tmp_path):
    r = run_cli("merge", work / "ft", "--method", "ties", "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "dowser: error: --method 'ties': unknown merge method; available: dare, tailor, graft"]
    r = run_cli("merge", work / "ft", "--p", "1.5", "--out", tmp_path / "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--p 1.5" in r.stderr
    for method in ("tailor", "graft"):
        with pytest.raises(UserError, match=f"--data: required by --method {method}"):
            merge.run(work / "ft", tmp_path / "x", MergeConfig(method=method))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="--out .*already exists"):
        merge.run(work / "ft", tmp_path / "full", MergeConfig())
    with pytest.raises(UserError, match="not a run directory"):
        merge.run(tmp_path / "nope", tmp_path / "y", MergeConfig())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no temp dir left behind


def test_eval_forgetting_takes_merged_runs_beside_the_source(work, tmp_path):
    from dowser_cli import evaluate
    from conftest import ROOT

    facts = ROOT / "dowser_cli" / "configs" / "tasks" / "data" / "facts.jsonl"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""tasks:
  - {{name: facts-choice, role: downstream, kind: likelihood, metric: choice_likelihood, data: "{facts}", limit: 3,
     answer_template: "The answer is {{answer}}."}}
  - {{name: facts, role: upstream, kind: exact, metric: contains, data: "{facts}", limit: 3, max_new_tokens: 2}}
""")
    merge.run(work / "ft", tmp_path / "dare", MergeConfig(p=0.5))
    rep = evaluate.run("tiny-llava", [work / "ft", tmp_path / "dare"], suite, tmp_path / "report",
                       evaluate.EvalConfig(batch_size=4))
    assert [(r["model"], r["method"]) for r in rep["rows"]][1:] == [("ft", "full-ft"), ("dare", "dare")]


def test_config_section_and_cli_override(work, tmp_path):
    from dowser_cli import config as cfgmod

    conf = tmp_path / "c.yaml"
    conf.write_text("merge:\n  method: dare\n  p: 0.5\n  seed: 7\n")
    cfg = cfgmod.resolve(MergeConfig(), conf, "merge", {"p": 0.8, "seed": None})
    assert (cfg.method, cfg.p, cfg.seed) == ("dare", 0.8, 7)
    side = merge.run(work / "ft", tmp_path / "out", cfg)
    assert side["config"]["p"] == 0.8 and side["config"]["seed"] == 7


def test_grafting_stops_on_a_non_finite_loss_and_writes_nothing(work, tmp_path, monkeypatch):
    from dowser_cli.training import LossHead

    original = LossHead.__call__
    monkeypatch.setattr(LossHead, "__call__", lambda self, batch: original(self, batch) * float("inf"))
    with pytest.raises(UserError, match=r"graft step 1/3: a non-finite loss or gradient"):
        merge.run(work / "ft", tmp_path / "g", MergeConfig(method="graft", steps=3),
                  data_path=work / "train.json", image_folder=work / "img")
    assert not (tmp_path / "g").exists() and not [p for p in tmp_path.iterdir()]
