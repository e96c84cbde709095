"""dowser probe on tiny models: factors against brute-force references, boundary rules, determinism,
noise images, interruption and resume."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from dowser_cli import artifacts, probe, scoring
from dowser_cli import probing
from dowser_cli.probing import ProbeConfig

from conftest import ROOT, run_cli


def _probe(tmp_path, model, name="s", **kw):
    out = tmp_path / f"{name}.safetensors"
    cfg = ProbeConfig(**{"samples": 4, "batch_size": 2, "probes": 3, "seq_len": 12, **kw})
    sidecar = probe.run(model, out, cfg)
    return out, sidecar, artifacts.read_tensors(out)


def _modules(sidecar):
    return list(sidecar["modules"])


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-llava"])
def test_mean_score_from_factors_equals_dense_accumulation(tmp_path, tiny_models, model):
    out, sidecar, t = _probe(tmp_path, model)
    lm = tiny_models(model)
    assert sidecar["probes"] == 2 * 3
    for name in _modules(sidecar):
        w = lm.model.get_submodule(name).weight
        psi, act = t[f"{name}.psi"], t[f"{name}.act"]
        assert psi.shape == (6, w.shape[0]) and act.shape == (6, w.shape[1])
        dense = scoring.DenseRunningMoments(w)
        for p in range(psi.shape[0]):
            dense.update(psi[p], act[p])
        mean, var = scoring.score_moments(w, psi, act)
        torch.testing.assert_close(mean, dense.mean, rtol=1e-5, atol=1e-12)
        # the fp32 running (Welford) reference is itself only good to ~1e-6 of the score's scale
        torch.testing.assert_close(var, dense.variance, rtol=1e-4, atol=1e-6 * float(mean.max()) ** 2)
        assert mean.abs().sum() > 0


def _texts(tmp_path):
    # different lengths -> right padding inside each batch
    f = tmp_path / "texts.txt"
    f.write_text("hello world, a fairly long line of text\nhi\nshort one\nanother rather longer sentence here\n")
    return f


def test_psi_and_act_match_autograd_reference(tmp_path, tiny_models):
    texts = _texts(tmp_path)
    out, sidecar, t = _probe(tmp_path, "tiny-llama", texts=str(texts), seq_len=40)
    lm = tiny_models("tiny-llama")
    cfg = ProbeConfig(samples=4, batch_size=2, probes=3, seq_len=40, texts=str(texts))
    ids = probing.token_ids(lm)
    input_ids, mask, _ = probe.BatchSource(lm, cfg, ids, probing.read_texts(texts, 4), "cpu").batch(0)
    assert not mask.all(), "the batch must contain padding for this test to mean anything"
    name = "model.layers.1.mlp.up_proj"
    mod = lm.model.get_submodule(name)
    seen = {}
    h1 = mod.register_forward_hook(lambda m, a, z: seen.update(h=a[0], z=z))
    try:
        with torch.enable_grad():
            lm.model.requires_grad_(True)
            logits = lm.model(input_ids=input_ids, attention_mask=mask.long()).logits
            last = mask.sum(1) - 1
            f = logits[torch.arange(2), last]
            xi_gen = probe.xi_generator(cfg.seed, 0)
            for p in range(3):
                xi = scoring.rademacher(tuple(f.shape), xi_gen)
                s = (xi * f).sum() / 2
                (g,) = torch.autograd.grad(s, seen["z"], retain_graph=True)
                # brute force: average |ds/dz| over real positions only
                rows = [g[b, i].abs() for b in range(2) for i in range(mask.shape[1]) if mask[b, i]]
                torch.testing.assert_close(t[f"{name}.psi"][p], torch.stack(rows).mean(0), rtol=1e-5, atol=1e-9)
    finally:
        h1.remove()
        lm.model.requires_grad_(False)
    rows = [seen["h"][b, i].abs() for b in range(2) for i in range(mask.shape[1]) if mask[b, i]]
    for p in range(3):  # a is per batch: the same for its M probes
        torch.testing.assert_close(t[f"{name}.act"][p], torch.stack(rows).mean(0), rtol=1e-5, atol=1e-9)
    # Wanda's input norm: the batch's sum of h^2 over real positions, one row per batch
    assert t[f"{name}.act_sq"].shape == (2, mod.in_features)
    torch.testing.assert_close(t[f"{name}.act_sq"][0], torch.stack(rows).square().sum(0), rtol=1e-5, atol=1e-9)


def test_batched_and_looped_probes_agree(tmp_path):
    _, side, a = _probe(tmp_path, "tiny-llava", name="a", batched_probes="on", images="noise", include_projector=True)
    _, _, b = _probe(tmp_path, "tiny-llava", name="b", batched_probes="off", images="noise", include_projector=True)
    for k in a:  # same equations, float32 sums in another order: agree to a few ulps of accumulation
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9)


def test_boundary_rules(tmp_path):
    out, sidecar, t = _probe(tmp_path, "tiny-llava", include_projector=True, images="noise")
    assert torch.equal(t["lm_head.psi"], torch.ones_like(t["lm_head.psi"]))
    assert t["lm_head.act"].min() > 0
    p1 = "model.multi_modal_projector.linear_1"
    p2 = "model.multi_modal_projector.linear_2"
    # a = 1 on every projector linear, as the authors' script (its rule matches the "proj." prefix)
    assert torch.equal(t[f"{p1}.act"], torch.ones_like(t[f"{p1}.act"]))
    assert torch.equal(t[f"{p2}.act"], torch.ones_like(t[f"{p2}.act"]))
    # gradients reached the projector through the image tokens
    assert t[f"{p1}.psi"].min() > 0 and t[f"{p2}.psi"].min() > 0


def test_layers_and_targets_select_modules(tmp_path):
    _, sidecar, t = _probe(tmp_path, "tiny-llama", layers="last:1", targets="mlp", include_lm_head=False)
    assert sorted(_modules(sidecar)) == [f"model.layers.2.mlp.{m}_proj" for m in ("down", "gate", "up")]


def test_same_seed_gives_byte_identical_scores(tmp_path):
    a, _, _ = _probe(tmp_path, "tiny-llama", name="a", seed=7)
    b, _, _ = _probe(tmp_path, "tiny-llama", name="b", seed=7)
    c, _, _ = _probe(tmp_path, "tiny-llama", name="c", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("model,image_key", [("tiny-llava", "image_token_id"), ("tiny-qwen2-vl", "image_token_id")])
def test_noise_images_go_through_the_vision_tower(tmp_path, tiny_models, model, image_key):
    lm = tiny_models(model)
    cfg = ProbeConfig(samples=2, batch_size=2, probes=2, seq_len=10, images="noise", include_projector=True)
    ids = probing.token_ids(lm)
    input_ids, mask, kwargs = probe.BatchSource(lm, cfg, ids, None, "cpu").batch(0)
    n_img = (input_ids == getattr(lm.config, image_key)).sum(1)
    assert (n_img > 0).all() and "pixel_values" in kwargs
    px = kwargs["pixel_values"]
    # normalised N(0.5, 0.25^2) noise: per-channel spread ~0.25 / std_c, so clearly not constant
    assert px.std() > 0.5
    calls = []
    vt = lm.model.get_submodule(lm.parts.vision_tower)
    h = vt.register_forward_hook(lambda m, a, o: calls.append(1))
    scored = probe.scored_modules(lm, cfg, [0, 1, 2])
    mods = scored.modules
    lm.model.requires_grad_(False)
    try:
        with scored.hooks(probes=2) as hooks:
            psi = probe.probe_batch(lm, hooks, input_ids, mask, kwargs, torch.Generator().manual_seed(0), 2, "cpu")
            proj = [n for n in mods if n.startswith(lm.parts.projector)]
            assert proj and all(hooks.batch_factors(n, psi, 2)[0].abs().min() > 0 for n in proj)
    finally:
        h.remove()
    assert calls, "the vision tower never ran"


@pytest.mark.parametrize("suppress", ["multimodal", "special"])
def test_generation_never_samples_the_suppressed_ids(tiny_models, suppress):
    # a sampled image placeholder made the next forward ask for image features it was not given
    # ("Image features and image tokens do not match"): push the model towards the suppressed ids
    lm = tiny_models("tiny-llava")
    ids = probing.token_ids(lm)
    banned = ids.suppressed(suppress)
    assert lm.config.image_token_id in banned
    # multimodal (the default) bans only the placeholders; special also every special/added id
    assert (ids.pad in banned) == (suppress == "special")
    assert set(ids.eos).isdisjoint(banned)
    cfg = ProbeConfig(samples=2, batch_size=2, probes=2, seq_len=12, images="noise", suppress=suppress)
    heads = [probing.image_segment(lm, torch.Generator().manual_seed(i)) for i in range(2)]
    prompts = [[ids.bos] + img + [5, 6, 7] for img, _ in heads]
    kwargs = probing.collate_images([probing.Sample([], k) for _, k in heads])

    def favour_banned(mod, args, out):
        out = out.clone()
        out[..., banned] += 100.0
        return out
    h = lm.model.lm_head.register_forward_hook(favour_banned)
    try:
        seqs = probing.generate_batch(lm, prompts, [4, 4], cfg, ids, kwargs, seed=3, device="cpu")
    finally:
        h.remove()
    for p, s in zip(prompts, seqs):
        assert s[:len(p)] == p and len(s) > len(p)
        assert not set(s[len(p):]) & set(banned), s[len(p):]


def test_idefics3_text_probe(tmp_path):
    _, sidecar, t = _probe(tmp_path, "tiny-idefics3", layers="last:2")
    assert any(n.startswith("model.text_model.layers.1.") for n in _modules(sidecar))


def test_sidecar_describes_the_artifact(tmp_path, tiny_models):
    out, sidecar, _ = _probe(tmp_path, "tiny-llama")
    side = artifacts.read_yaml(out.with_suffix(".yaml"))
    meta = artifacts.read_header(out, artifacts.SCORES_KIND)
    fp = artifacts.model_fingerprint(tiny_models("tiny-llama").model)
    assert side["model"]["fingerprint"] == meta["model_fingerprint"] == fp
    assert side["config"]["samples"] == 4 and side["probes"] == 6
    assert set(side["timings"]) >= {"generate_s", "probe_s", "total_s"}
    assert not artifacts.partial_path(out).exists()


# ---- CLI: bad input, one line, exit 2, nothing written ----------------------------------------------

BAD = [
    (["nosuch-model"], "unknown model 'nosuch-model'"),
    (["./no/such/dir"], "does not exist"),
    (["someorg/somemodel"], "cannot reach the hub"),
    (["tiny-llama", "--samples", "0"], "--samples 0"),
    (["tiny-llama", "--samples", "4", "--batch-size", "8"], "--batch-size 8: larger than --samples 4"),
    (["tiny-llama", "--layers", "last:99"], "--layers last:99: the model has 3 decoder layers"),
    (["tiny-llama", "--targets", "conv"], "unknown target(s) conv"),
    (["tiny-llama", "--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["tiny-llama", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["tiny-llama", "--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["tiny-llama", "--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    (["tiny-llama", "--suppress", "all"], "--suppress 'all': expected one of multimodal, special"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "scores.safetensors"
    r = run_cli("probe", *args, "--out", out, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("probe", "tiny-llama", "--out", blocker / "scores.safetensors")
    assert r.returncode == 2 and "--out" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("probe", "tiny-llama", "--out", tmp_path)
    assert r.returncode == 2 and "is a directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_config_file_and_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("probe:\n  samples: 4\n  batch_size: 2\n  probes: 2\n  seq_len: 10\n")
    out = tmp_path / "s.safetensors"
    r = run_cli("probe", "tiny-llama", "--config", cfg, "--probes", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    side = artifacts.read_yaml(out.with_suffix(".yaml"))
    assert side["config"]["samples"] == 4 and side["config"]["probes"] == 3 and side["probes"] == 6
    cfg.write_text("probe:\n  sampels: 4\n")
    r = run_cli("probe", "tiny-llama", "--config", cfg, "--out", tmp_path / "t.safetensors")
    assert r.returncode == 2 and "unknown key(s) sampels" in r.stderr


INTERRUPT_CFG = ("probe:\n  samples: 240\n  batch_size: 2\n  gen_batch_size: 2\n  probes: 2\n  seq_len: 24\n"
                 "  checkpoint_every: 1\n")  # one generate() call per batch: slow enough to interrupt


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    (d / "c.yaml").write_text(INTERRUPT_CFG)
    assert run_cli("probe", "tiny-llama", "--config", d / "c.yaml", "--out", d / "ref.safetensors").returncode == 0
    return d / "ref.safetensors"


def _default_sigint():
    # A shell starts background jobs with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt; restore the default so this test behaves as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Ctrl-C takes the same path as SIGTERM (StopRequests), the signal a cluster scheduler sends: its 23 s
# run is kept for make test-slow
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, id="ctrl-c", marks=pytest.mark.slow),
                                 pytest.param(signal.SIGTERM, id="kill")])
def test_interrupt_leaves_resumable_partial_and_resume_matches(tmp_path, uninterrupted, sig):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(INTERRUPT_CFG)
    out = tmp_path / "run" / "s.safetensors"
    out.parent.mkdir()
    partial = artifacts.partial_path(out)
    proc = subprocess.Popen([sys.executable, "-m", "dowser_cli", "probe", "tiny-llama", "--config", str(cfg),
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partial.exists(), "no partial checkpoint appeared"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".yaml").exists()
    # the partial is never mistaken for scores, nor resumed with other settings
    r = run_cli("mask", partial, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 2 and "dowser.scores.partial artifact, expected dowser.scores" in r.stderr
    r = run_cli("probe", "tiny-llama", "--config", cfg, "--out", out, "--resume", "--seed", "5")
    assert r.returncode == 2 and "different probe settings" in r.stderr
    r = run_cli("probe", "tiny-llama", "--config", cfg, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert not partial.exists()


def test_random_init_from_a_config_directory(tmp_path, tiny_models):
    # a save_pretrained-style directory with only config.json: no weights, no tokenizer
    cfg_dir = tmp_path / "cfg"
    tiny_models("tiny-llava").config.save_pretrained(cfg_dir)
    out = tmp_path / "s.safetensors"
    r = run_cli("probe", cfg_dir, "--random-init", "--samples", "2", "--batch-size", "2", "--probes", "2",
                "--seq-len", "10", "--images", "noise", "--out", out)
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(out.with_suffix(".yaml"))
    assert side["model"]["random_init"] is True and side["model"]["adapter"] == "llava"


def test_shipped_llava_7b_config_resolves_without_weights():
    from dowser_cli.models import load_config, num_decoder_layers, resolve_source
    from dowser_cli.models.registry import adapter_for_config

    src = resolve_source("llava-1.5-7b", random_init=True)
    cfg = load_config(src)
    assert num_decoder_layers(cfg) == 32 and adapter_for_config(cfg).name == "llava"
    assert cfg.text_config.hidden_size == 4096 and cfg.vision_config.image_size == 336
    r = run_cli("probe", "llava-1.5-7b", "--random-init", "--layers", "last:40", "--out", "/tmp/x.safetensors")
    assert r.returncode == 2 and "--layers last:40: the model has 32 decoder layers" in r.stderr


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    r = run_cli("probe", tmp_path / "vit", "--random-init", "--out", tmp_path / "s.safetensors")
    assert r.returncode == 2 and "unsupported architecture 'vit'" in r.stderr and "qwen2-vl" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sampling_options_from_the_cli_reach_generate_and_scores_yaml(tmp_path):
    out = tmp_path / "s.safetensors"
    r = run_cli("probe", "tiny-llava", "--samples", "2", "--batch-size", "2", "--probes", "2", "--seq-len", "10",
                "--temperature", "0.7", "--top-p", "0.8", "--top-k", "5", "--repetition-penalty", "1.2",
                "--suppress", "special", "--out", out)
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(out.with_suffix(".yaml"))
    samp = side["sampling"]
    assert (samp["temperature"], samp["top_p"], samp["top_k"], samp["repetition_penalty"], samp["suppress"]) == \
        (0.7, 0.8, 5, 1.2, "special")
    default = tmp_path / "d.safetensors"
    r = run_cli("probe", "tiny-llava", "--samples", "2", "--batch-size", "2", "--probes", "2", "--seq-len", "10",
                "--out", default)
    assert r.returncode == 0, r.stderr
    d = artifacts.read_yaml(default.with_suffix(".yaml"))["sampling"]
    assert (d["top_k"], d["suppress"]) == (50, "multimodal")
    # the default bans only the multimodal placeholders, the option every special id (a superset)
    assert set(d["suppressed_ids"]) < set(samp["suppressed_ids"])
    assert artifacts.read_yaml(default.with_suffix(".yaml"))["config"]["top_k"] == 50


def test_top_k_limits_sampling_to_the_k_likeliest_tokens(tiny_models):
    """With --top-k 1 sampling is greedy whatever the temperature: two seeds give the same text."""
    lm = tiny_models("tiny-llama")
    ids = probing.token_ids(lm)
    cfg = ProbeConfig(samples=2, batch_size=2, probes=2, seq_len=12, top_k=1, repetition_penalty=1.0)
    prompts = [[ids.bos, 5, 6, 7], [ids.bos, 9, 10]]
    a = probing.generate_batch(lm, prompts, [4, 3], cfg, ids, {}, seed=1, device="cpu")
    b = probing.generate_batch(lm, prompts, [4, 3], cfg, ids, {}, seed=2, device="cpu")
    assert a == b
    wide = ProbeConfig(samples=2, batch_size=2, probes=2, seq_len=12, top_k=0, repetition_penalty=1.0)
    c = probing.generate_batch(lm, prompts, [4, 3], wide, ids, {}, seed=1, device="cpu")
    d = probing.generate_batch(lm, prompts, [4, 3], wide, ids, {}, seed=2, device="cpu")
    assert c != d
