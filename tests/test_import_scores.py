"""dowser import-scores: the authors' per-module importance files (their layout, written here from a
real probe's scores) become a dense scores artifact whose masks are the probe's masks."""
import pytest
import torch

from dowser_cli import artifacts, mask, probe, scoring
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.scores import open_scores
from dowser_cli.masking import MaskConfig
from dowser_cli.probing import ProbeConfig

from conftest import run_cli

LAYERS = "model.language_model.layers."


def _official_name(module: str) -> str:
    if module.startswith(LAYERS):
        return "llm." + module.removeprefix(LAYERS)
    if module.startswith("model.multi_modal_projector.linear_"):
        return "proj." + {"1": "0", "2": "2"}[module[-1]]      # LLaVA's mm_projector Sequential indices
    return module                                                # lm_head


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_models):
    d = tmp_path_factory.mktemp("imp")
    probe.run("tiny-llava", d / "scores.safetensors", ProbeConfig(samples=4, batch_size=2, probes=2, seq_len=12,
                                                                  images="noise", include_projector=True))
    sf = open_scores(d / "scores.safetensors")
    model = tiny_models("tiny-llava").model
    (d / "official").mkdir()
    for m in sf.modules:
        w = model.get_submodule(m).weight
        mean, var = scoring.score_moments(w, *sf.factors(m).values())
        name = _official_name(m)
        # the official file: bf16 by default (--save-dtype), one per module, dots as underscores
        torch.save({"name": name, "importance_matrix_mean": mean.to(torch.bfloat16),
                    "importance_matrix_std": var.sqrt().to(torch.bfloat16), "W_shape": w.shape,
                    "W_fro": float(w.norm()), "num_samples": 4}, d / "official" / f"{name.replace('.', '_')}.pt")
    return d


def test_imported_scores_give_the_probes_masks(work, tmp_path):
    r = run_cli("import-scores", work / "official", "--model", "tiny-llava", "--out", tmp_path / "imp.safetensors")
    assert r.returncode == 0, r.stderr
    imp = open_scores(tmp_path / "imp.safetensors")
    assert imp.dense and imp.modules == open_scores(work / "scores.safetensors").modules
    side = artifacts.read_yaml(tmp_path / "imp.yaml")
    assert side["modules"]["model.multi_modal_projector.linear_1"]["official_name"] == "proj.0"
    # the same selection from the same importance (stored in bf16 by the official script, so compare
    # the masks of the bf16-rounded probe scores through the fp32 path: ties can differ, nothing else)
    for strategy in ("dowser", "magnitude"):
        a, b = tmp_path / f"a-{strategy}.safetensors", tmp_path / f"b-{strategy}.safetensors"
        mask.run(work / "scores.safetensors", a, MaskConfig(ratio=0.1, strategy=strategy))
        mask.run(tmp_path / "imp.safetensors", b, MaskConfig(ratio=0.1, strategy=strategy))
        ma, mb = open_mask(a), open_mask(b)
        assert set(ma.params) == set(mb.params)
        for n in ma.params:
            agree = (ma.dense(n) == mb.dense(n)).float().mean()
            assert agree > (0.999 if strategy == "dowser" else 0.99999), (strategy, n, float(agree))
    r = run_cli("mask", tmp_path / "imp.safetensors", "--strategy", "wanda", "--out", tmp_path / "w.safetensors")
    assert r.returncode == 2 and "needs the probe's factors" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_same_importance_in_fp32_selects_bit_identically(work, tmp_path):
    sf = open_scores(work / "scores.safetensors")
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source("tiny-llava")
    model = load_model(src, load_config(src), torch.float32, "cpu").model
    d = tmp_path / "fp32"
    d.mkdir()
    for m in sf.modules:
        s = scoring.mean_score(model.get_submodule(m).weight, *sf.factors(m).values())
        name = _official_name(m)
        torch.save({"name": name, "importance_matrix_mean": s, "importance_matrix_std": torch.zeros_like(s)},
                   d / f"{name.replace('.', '_')}.pt")
    assert run_cli("import-scores", d, "--model", "tiny-llava", "--out", tmp_path / "i.safetensors").returncode == 0
    mask.run(work / "scores.safetensors", tmp_path / "a.safetensors", MaskConfig(ratio=0.1))
    mask.run(tmp_path / "i.safetensors", tmp_path / "b.safetensors", MaskConfig(ratio=0.1))
    ma, mb = open_mask(tmp_path / "a.safetensors"), open_mask(tmp_path / "b.safetensors")
    assert all(torch.equal(ma.packed(n), mb.packed(n)) for n in ma.params)


@pytest.mark.parametrize("case", ["pickle", "unknown-module", "shape", "empty"])
def test_bad_official_files_are_one_line_exit_2(work, tmp_path, case):
    import argparse
    import shutil

    d = tmp_path / "o"
    shutil.copytree(work / "official", d)
    f = d / "llm_0_self_attn_q_proj.pt"
    if case == "pickle":   # arbitrary pickled objects never load: weights_only=True
        torch.save({"name": "llm.0.self_attn.q_proj", "x": argparse.Namespace(code="not a tensor")}, f)
        want = "weights_only=True"
    elif case == "unknown-module":
        d2 = torch.load(f, weights_only=True)
        torch.save({**d2, "name": "llm.9.self_attn.q_proj"}, d / "llm_9_self_attn_q_proj.pt")
        want = "llm.9.self_attn.q_proj: no such linear"
    elif case == "shape":
        d2 = torch.load(f, weights_only=True)
        torch.save({**d2, "importance_matrix_mean": d2["importance_matrix_mean"][:1]}, f)
        want = "importance_matrix_mean is (1,"
    else:
        shutil.rmtree(d)
        d.mkdir()
        want = "no .pt files"
    r = run_cli("import-scores", d, "--model", "tiny-llava", "--out", tmp_path / "s.safetensors")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and want in lines[0], r.stderr
    assert not (tmp_path / "s.safetensors").exists()
