"""dowser mask / compare / combine / inspect on tiny models, against brute-force references."""
import json

import pytest
import torch

from dowser_cli import artifacts, mask, probe
from dowser_cli.artifacts.masks import open_mask
from dowser_cli.masking import MaskConfig
from dowser_cli.probing import ProbeConfig

from conftest import run_cli


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "scores.safetensors"
    probe.run("tiny-llama", out, ProbeConfig(samples=4, batch_size=2, probes=3, seq_len=12))
    return out


def _mask(tmp_path, scores, name="m", **kw):
    out = tmp_path / f"{name}.safetensors"
    side = mask.run(scores, out, MaskConfig(**kw))
    return out, side, open_mask(out)


def _brute_order(values: torch.Tensor) -> list[int]:
    flat = values.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda i: (flat[i], i))


def _brute_scores(strategy, weight, psi, act, act_sq=None):
    """Entry-by-entry reference of each strategy's score (no matmuls)."""
    w = weight.detach().float().abs()
    if strategy in ("dowser", "inverse"):
        out = torch.zeros_like(w)
        for p in range(psi.shape[0]):
            out += w * psi[p][:, None] * act[p][None, :]
        return out / psi.shape[0]
    if strategy == "magnitude":
        return w
    if strategy == "wanda":   # |W_ij| * ||X_j||_2 over every token: the batches' squared sums added up
        norm = torch.tensor([sum(float(act_sq[b, j]) for b in range(act_sq.shape[0])) ** 0.5
                             for j in range(act_sq.shape[1])])
        return w * norm[None, :]
    if strategy == "sensitivity":
        out = torch.zeros_like(w)
        for p in range(psi.shape[0]):
            out += psi[p][:, None].float() * act[p][None, :].float()
        return out / psi.shape[0]
    raise AssertionError(strategy)


@pytest.mark.parametrize("strategy", ["dowser", "magnitude", "wanda", "sensitivity", "inverse"])
def test_strategies_match_brute_force(tmp_path, scores, tiny_models, strategy):
    _, side, mf = _mask(tmp_path, scores, strategy=strategy, ratio=0.15)
    lm = tiny_models("tiny-llama")
    factors = artifacts.read_tensors(scores)
    assert len(mf.params) == 3 * 7  # all 3 layers (fewer than 20), attn + mlp
    for name in mf.params:
        module = name.removesuffix(".weight")
        w = lm.model.get_submodule(module).weight
        s = _brute_scores(strategy, w, factors[f"{module}.psi"], factors[f"{module}.act"], factors[f"{module}.act_sq"])
        n = s.numel()
        k = round(0.15 * n)
        order = _brute_order(s)
        expect = torch.zeros(n, dtype=torch.bool)
        if strategy == "inverse":
            expect[order[n - k:]] = True  # the k most important are trainable
        else:
            expect[order[:k]] = True
        got = mf.dense(name).reshape(-1)
        assert int(got.sum()) == k
        assert torch.equal(got, expect), name


def test_random_strategy_is_seeded_and_exact(tmp_path, scores):
    _, _, a = _mask(tmp_path, scores, name="a", strategy="random", seed=1)
    _, _, b = _mask(tmp_path, scores, name="b", strategy="random", seed=1)
    _, _, c = _mask(tmp_path, scores, name="c", strategy="random", seed=2)
    for name in a.params:
        assert int(a.dense(name).sum()) == round(0.1 * a.numel(name))
        assert torch.equal(a.dense(name), b.dense(name))
    assert any(not torch.equal(a.dense(n), c.dense(n)) for n in a.params)


@pytest.mark.parametrize("granularity", ["row", "layer", "global"])
def test_granularities_select_the_right_counts(tmp_path, scores, tiny_models, granularity):
    _, side, mf = _mask(tmp_path, scores, granularity=granularity, ratio=0.2)
    lm = tiny_models("tiny-llama")
    factors = artifacts.read_tensors(scores)

    def s(name):
        m = name.removesuffix(".weight")
        return _brute_scores("dowser", lm.model.get_submodule(m).weight, factors[f"{m}.psi"], factors[f"{m}.act"])

    names = list(mf.params)
    if granularity == "row":
        for name in names:
            sel = mf.dense(name)
            k = round(0.2 * sel.shape[1])
            assert (sel.sum(1) == k).all()
            for r in range(sel.shape[0]):
                expect = torch.zeros(sel.shape[1], dtype=torch.bool)
                expect[_brute_order(s(name)[r])[:k]] = True
                assert torch.equal(sel[r], expect)
        return
    units = ([[n for n in names if f".layers.{i}." in n] for i in range(3)] if granularity == "layer" else [names])
    for unit in units:
        flat = torch.cat([s(n).reshape(-1) for n in unit])
        k = round(0.2 * flat.numel())
        expect = torch.zeros(flat.numel(), dtype=torch.bool)
        expect[_brute_order(flat)[:k]] = True
        got = torch.cat([mf.dense(n).reshape(-1) for n in unit])
        assert int(got.sum()) == k and torch.equal(got, expect)
    # per matrix the fraction now varies: that is the point of pooling
    fractions = {round(p["fraction"], 3) for p in side["params"].values()}
    assert len(fractions) > 1


def test_mask_artifact_describes_itself(tmp_path, scores):
    out, side, mf = _mask(tmp_path, scores, layers="last:2", targets="mlp")
    assert sorted(mf.params) == sorted(f"model.layers.{i}.mlp.{m}_proj.weight" for i in (1, 2)
                                       for m in ("gate", "up", "down"))
    meta = mf.meta
    assert meta["strategy"] == "dowser" and meta["granularity"] == "matrix" and float(meta["ratio"]) == 0.1
    assert meta["scores_sha256"] == artifacts.sha256_file(scores) == side["inputs"]["scores"]["sha256"]
    assert meta["model_fingerprint"] == artifacts.read_header(scores)["model_fingerprint"]
    p = side["params"]["model.layers.2.mlp.down_proj.weight"]
    assert p["shape"] == [64, 96] and p["trainable"] == round(0.1 * 64 * 96)
    # about one bit per masked parameter
    numel = sum(v["numel"] for v in side["params"].values())
    assert out.stat().st_size < numel / 8 + 4096


def test_combine_set_operations(tmp_path, scores):
    a_path, _, a = _mask(tmp_path, scores, name="a", ratio=0.3)
    b_path, _, b = _mask(tmp_path, scores, name="b", ratio=0.3, strategy="random")
    for op, fn in (("union", torch.logical_or), ("intersection", torch.logical_and),
                   ("difference", lambda x, y: x & ~y)):
        out = tmp_path / f"{op}.safetensors"
        r = run_cli("combine", a_path, b_path, "--op", op, "--out", out)
        assert r.returncode == 0, r.stderr
        c = open_mask(out)
        for name in a.params:
            assert torch.equal(c.dense(name), fn(a.dense(name), b.dense(name)))


def test_compare_masks_hamming(tmp_path, scores):
    a_path, _, a = _mask(tmp_path, scores, name="a", ratio=0.3)
    b_path, _, b = _mask(tmp_path, scores, name="b", ratio=0.3, strategy="magnitude")
    r = run_cli("compare", a_path, b_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    diff = sum(int((a.dense(n) ^ b.dense(n)).sum()) for n in a.params)
    total = sum(a.numel(n) for n in a.params)
    assert res["overall"]["hamming"] == pytest.approx(diff / total)


def test_compare_scores_spearman(tmp_path, scores):
    other = tmp_path / "other.safetensors"
    probe.run("tiny-llama", other, ProbeConfig(samples=4, batch_size=2, probes=3, seq_len=12, seed=9))
    res = mask.compare(scores, scores)
    assert res["overall"]["spearman"] == pytest.approx(1.0) and res["overall"]["hamming"] == 0
    res = mask.compare(scores, other)
    assert 0.5 < res["overall"]["spearman"] < 1.0 and 0 < res["overall"]["hamming"] < 0.2


def test_inspect_json(tmp_path, scores):
    out, _, _ = _mask(tmp_path, scores, ratio=0.25)
    r = run_cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "dowser.mask" and info["layers"]["2"]["q_proj"] == pytest.approx(0.25)
    r = run_cli("inspect", scores, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "dowser.scores" and info["probes"] == 6 and "lm_head" in info["layers"]["-"]


# ---- refusals ------------------------------------------------------------------------------------------

def _refused(tmp_path, *args, message):
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir(exist_ok=True)
    r = run_cli(*args, "--out", out)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_ratio_out_of_range(tmp_path, scores, ratio):
    _refused(tmp_path, "mask", scores, "--ratio", ratio, message=f"--ratio {float(ratio)}: must be in (0, 1]")


def test_truncated_and_foreign_files(tmp_path, scores):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])
    (tmp_path / "cut.yaml").write_text(scores.with_suffix(".yaml").read_text())
    _refused(tmp_path, "mask", cut, message=f"{cut}:")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("definitely not safetensors")
    _refused(tmp_path, "mask", junk, message="not a safetensors file")


def test_mask_given_where_scores_expected(tmp_path, scores):
    m, _, _ = _mask(tmp_path, scores)
    _refused(tmp_path, "mask", m, message="is a dowser.mask artifact, expected dowser.scores")


def test_layers_not_in_scores(tmp_path):
    s = tmp_path / "s.safetensors"
    probe.run("tiny-llama", s, ProbeConfig(samples=2, batch_size=2, probes=2, seq_len=10, layers="last:1"))
    _refused(tmp_path, "mask", s, "--layers", "all", message="--layers all: layer(s) 0-1 are not in")


def test_unknown_strategy_lists_available(tmp_path, scores):
    _refused(tmp_path, "mask", scores, "--strategy", "best", message="available: dowser, magnitude, wanda, sensitivity, random, inverse")


def test_scores_of_model_a_with_model_b_are_refused(tmp_path, scores, tiny_models):
    _refused(tmp_path, "mask", scores, "--model", "tiny-llava", message="was made from a different model than tiny-llava")
    # same architecture, other weights: caught by the weights digest
    lm = tiny_models("tiny-llama")
    other = tmp_path / "other-llama"
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    try:
        with torch.no_grad():
            lm.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
            lm.model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
        lm.model.save_pretrained(other)
        lm.tokenizer.save_pretrained(other)
    finally:
        lm.model.load_state_dict(state)
    _refused(tmp_path, "mask", scores, "--model", other, message="was made from different weights")


def test_combine_refuses_masks_of_different_models(tmp_path, scores):
    a, _, _ = _mask(tmp_path, scores)
    s2 = tmp_path / "s2.safetensors"
    probe.run("tiny-idefics3", s2, ProbeConfig(samples=2, batch_size=2, probes=2, seq_len=10))
    b = tmp_path / "b.safetensors"
    mask.run(s2, b, MaskConfig())
    _refused(tmp_path, "combine", a, b, "--op", "union", message="is from a different model")
