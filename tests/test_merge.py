"""dowser merge: DARE / Model Tailor / Grafting math against brute force, and the stage end to end on a
tiny Full-FT run (one run shared by the module)."""
import json
import math

import pytest
import torch

from dowser_cli import artifacts, finetune, merge, merging
from dowser_cli.errors import UserError
from dowser_cli.export import describe_run, load_run, open_run
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


def test_hessian_damping_and_salience_normalisation():
    x = torch.tensor([[1.0, 0.0], [1.0, 2.0]])                           # n = 2 positions, in = 2
    h = merging.hessian(x.T @ x, 2, damp=0.01)
    raw = 2 * (x.T @ x) / 2                                               # [[2, 2], [2, 4]]
    torch.testing.assert_close(h, raw.double() + 0.01 * 3.0 * torch.eye(2, dtype=torch.float64))
    delta = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    hinv_diag = torch.tensor([1.0, 0.5])
    sal = merging.tailor_salience(delta, hinv_diag)
    # |delta| / 2 and (delta^2 / hinv_diag^2) / max, sensitivities [[4, 4], [0.25, 0]] / 4
    want = 0.8 * torch.tensor([[1.0, 0.5], [0.25, 0.0]]) + 0.2 * torch.tensor([[1.0, 1.0], [0.0625, 0.0]])
    torch.testing.assert_close(sal, want)


def _layer(out=8, inn=12, n=64, seed=0):
    """A random linear layer's delta [out, in] and correlated calibration inputs X [n, in]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inn, generator=g) @ torch.randn(inn, inn, generator=g)
    return torch.randn(out, inn, generator=g), x


def test_obs_compensate_keep_all_changes_nothing():
    delta, x = _layer()
    hinv = merging.hessian_inverse(merging.hessian(x.T @ x, len(x)))
    out = merging.obs_compensate(delta, torch.ones_like(delta, dtype=torch.bool), hinv)
    torch.testing.assert_close(out, delta, rtol=0, atol=1e-6)


def test_obs_compensate_with_the_first_column_reverted_is_the_least_squares_solution():
    """Column 0 reverted, everything else free: OBS's closed form must equal the brute-force least
    squares min over the other columns of e^T H e per row (e = delta' - delta, H damped), solved as an
    overdetermined system with lstsq on H's square root."""
    delta, x = _layer()
    h = merging.hessian(x.T @ x, len(x))
    keep = torch.ones_like(delta, dtype=torch.bool)
    keep[:, 0] = False
    got = merging.obs_compensate(delta, keep, merging.hessian_inverse(h), block=5)
    # e^T H e = ||L^T e||^2 with H = L L^T; e_0 = -delta_0 fixed, e_rest free: min ||L^T[:,1:] e_r + L^T[:,0] e_0||
    lt = torch.linalg.cholesky(h).T
    ref = delta.double().clone()
    ref[:, 0] = 0
    for r in range(delta.shape[0]):
        e0 = -delta[r, 0].double()
        e_rest = torch.linalg.lstsq(lt[:, 1:], -(lt[:, 0] * e0).unsqueeze(1)).solution.squeeze(1)
        ref[r, 1:] = delta[r, 1:].double() + e_rest
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_frac", [0.1, 0.3, 0.6])
def test_tailor_patch_is_exact_and_compensation_beats_plain_reverting(keep_frac):
    delta, x = _layer(out=16, inn=24, n=200, seed=3)
    xtx = x.T @ x
    hinv = merging.hessian_inverse(merging.hessian(xtx, len(x)))
    sal = merging.tailor_salience(delta, torch.diagonal(hinv))
    k = round(keep_frac * delta.numel())
    keep = merging.binarise_top(sal, k)
    new = merging.obs_compensate(delta, keep, hinv)
    assert int(keep.sum()) == k and int((new != 0).sum()) == k and torch.equal(new[~keep], torch.zeros(delta.numel() - k))
    err = ((new - delta) @ x.T).norm().item()
    revert = ((delta * keep - delta) @ x.T).norm().item()
    assert err < 0.98 * revert
    assert merging.reconstruction_error(new, delta, xtx) == pytest.approx(err, rel=1e-4)
    # lazy blocks are only an evaluation order: same result for any block size
    torch.testing.assert_close(merging.obs_compensate(delta, keep, hinv, block=7), new, rtol=1e-5, atol=1e-6)


def test_graft_grad_is_the_chain_rule_of_autograd():
    g = torch.Generator().manual_seed(0)
    theta0, delta, s, target = (torch.randn(4, 5, generator=g) for _ in range(4))
    s.requires_grad_(True)
    loss = ((theta0 + torch.sigmoid(s) * delta - target) ** 2).sum()
    loss.backward()
    grad_theta = 2 * (theta0 + torch.sigmoid(s.detach()) * delta - target)
    torch.testing.assert_close(merging.graft_grad(grad_theta, delta, s.detach()), s.grad)
    init = merging.graft_init(delta, 6)
    assert int((init > 0).sum()) == 6 and set(init.unique().tolist()) == {-3.0, 3.0}
    assert torch.equal(init > 0, merging.binarise_top(delta.abs(), 6))


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


def _check_readable(run_dir):
    """The output is a run directory like finetune's: open_run / load_run / eval-forgetting's checks."""
    from dowser_cli import evaluate

    run = open_run(run_dir)
    assert run.mask is None and not any(v["masked"] for v in run.params.values())
    assert set(run.params) == set(open_run(run_dir.parent / "ft").params)
    lm = load_run(run)
    merged = artifacts.read_tensors(run_dir / "delta.safetensors")
    for n, v in merged.items():
        assert torch.equal(lm.model.get_parameter(n).detach(), v), n
    evaluate._check_runs_cheaply("tiny-llava", False, [run_dir], torch.float32)
    info = describe_run(run_dir)                                        # what `dowser inspect` shows
    assert info["method"] == run.sidecar["method"] and all(r["changed"] > 0 for r in info["rows"])
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


def test_tailor_end_to_end_budget_and_reconstruction_on_the_calibration_inputs(work):
    out = work / "tailor"
    r = run_cli("merge", work / "ft", "--method", "tailor", "--data", work / "train.json", "--image-folder",
                work / "img", "--keep", "0.2", "--calib-samples", "8", "--out", out)
    assert r.returncode == 0, r.stderr
    base, tuned, merged, targets = _values(out)
    for n in targets:
        assert int((merged[n] != base[n]).sum()) == round(0.2 * base[n].numel()), n
    _others_unchanged(base, tuned, merged, targets)
    side = _check_readable(out)
    assert side["merge"]["kept"]["merged_kept"] == sum(round(0.2 * base[n].numel()) for n in targets)
    assert side["inputs"]["data"]["sha256"] == artifacts.sha256_file(work / "train.json")
    # independent of the stage's own figures: the written patch against plain reverting of the same
    # entries, on the fine-tuned model's inputs for the same 8 calibration examples
    cfg = MergeConfig(method="tailor", calib_samples=8)
    ctx = merge.setup(work / "ft", cfg, merge.MERGE_METHODS.get("tailor", "--method"), work / "train.json", work / "img")
    grams = ctx.input_grams()
    comp = rev = 0.0
    for n in targets:
        delta, new = tuned[n] - base[n], merged[n] - base[n]
        keep = merged[n] != base[n]
        comp += merging.reconstruction_error(new, delta, grams[n][0]) ** 2
        rev += merging.reconstruction_error(delta * keep, delta, grams[n][0]) ** 2
    assert comp < rev
    rms = side["merge"]["reconstruction_rms"]
    assert rms["compensated"] < rms["reverted"]
    positions = side["merge"]["calibration_positions"]
    assert rms["compensated"] == pytest.approx(math.sqrt(comp / positions), rel=1e-3)


def test_graft_region_is_exactly_the_budget_and_grafts_the_fine_tuned_values(work):
    out = work / "graft"
    cfg = MergeConfig(method="graft", budget=0.05, steps=4, lr=2.0)
    side = merge.run(work / "ft", out, cfg, data_path=work / "train.json", image_folder=work / "img")
    base, tuned, merged, targets = _values(out)
    for n in targets:
        region = merged[n] != base[n]
        assert int(region.sum()) == round(0.05 * base[n].numel()), n
        # base + mask * delta, bit for bit: the fine-tuned values inside, the base outside
        assert torch.equal(merged[n], torch.where(region, tuned[n], base[n])), n
    _others_unchanged(base, tuned, merged, targets)
    _check_readable(out)
    assert [c["step"] for c in side["merge"]["loss_curve"]] == [1, 2, 3, 4]
    assert side["merge"]["entries_moved_from_initial_region"] > 0              # lr 2: the region did move
    r = run_cli("export", out, "--out", work / "graft-export")
    assert r.returncode == 0, r.stderr
    assert (work / "graft-export" / "config.json").is_file()


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

    facts = ROOT / "configs" / "tasks" / "data" / "facts.jsonl"
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
