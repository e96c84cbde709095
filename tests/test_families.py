"""Every registered model family end to end on its tiny seeded build: inspect-model resolves its parts,
probe (text, and noise images where the family supports them) -> mask -> finetune -> export ->
eval-forgetting, frozen entries unmoved, the export reloading with from_pretrained to the same logits."""
import json

import pytest
import torch

from dowser_cli.artifacts.masks import open_mask
from dowser_cli.artifacts.runs import open_run
from dowser_cli.models.runs import load_run

from conftest import run_cli

# (tiny build, transformers class its export loads with, noise-image probes, image-record fine-tuning)
FAMILIES = [
    ("tiny-llama", "AutoModelForCausalLM", False, False),
    ("tiny-llava", "AutoModelForImageTextToText", True, True),
    ("tiny-qwen2-vl", "AutoModelForImageTextToText", True, True),
    ("tiny-idefics3", "AutoModelForImageTextToText", False, True),
    ("tiny-qwen3-vl", "AutoModelForImageTextToText", True, True),
    ("tiny-gemma3", "AutoModelForImageTextToText", True, True),
    ("tiny-internvl", "AutoModelForImageTextToText", True, True),
    ("tiny-llava-onevision", "AutoModelForImageTextToText", True, True),
    ("tiny-mistral3", "AutoModelForImageTextToText", True, False),
]
# Image fine-tuning needs the family's processor; Mistral 3's (Pixtral's) needs torchvision, whose PyPI
# build does not import beside the CPU torch this suite runs on.
SUITE = """tasks:
  - {name: sums, role: downstream, kind: vqa, metric: exact_match, data: sums.jsonl, prompt: "{question}", max_new_tokens: 3}
  - {name: facts, role: upstream, kind: likelihood, metric: choice_likelihood, data: facts.jsonl, prompt: "{question}", answer_template: "The answer is {answer}."}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    recs = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": str(2 * i)}]}
            for i in range(8)]
    (d / "train.json").write_text(json.dumps(recs))
    from PIL import Image

    (d / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (28 + 6 * i, 28), (40 * i, 200 - 30 * i, 90)).save(d / "img" / f"{i}.png")
    (d / "train-images.json").write_text(json.dumps(
        [{"image": f"img/{i % 4}.png", "conversations": [{"from": "human", "value": f"<image>\nWhat colour is {i}?"},
                                                         {"from": "gpt", "value": ["red", "green", "blue", "grey"][i % 4]}]}
         for i in range(8)]))
    (d / "sums.jsonl").write_text("\n".join(json.dumps({"question_id": f"s{i}", "text": f"What is {i} plus {i}?",
                                                        "answer": str(2 * i)}) for i in range(4)))
    (d / "facts.jsonl").write_text("\n".join(json.dumps({"question_id": f"f{i}", "text": f"Pick {c}.", "answer": c,
                                                         "options": ["red", "green", "blue"]})
                                             for i, c in enumerate(["red", "green", "blue"])))
    (d / "suite.yaml").write_text(SUITE)
    return d


@pytest.mark.parametrize("name,auto_class,noise,images", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_family_end_to_end(work, tmp_path, name, auto_class, noise, images):
    """In process (one subprocess start costs more than a tiny stage): the stages as the CLI runs them."""
    import transformers

    from dowser_cli import evaluate, export, finetune, inspection, mask, probe
    from dowser_cli.errors import UserError
    from dowser_cli.evaluate import EvalConfig
    from dowser_cli.masking import MaskConfig
    from dowser_cli.models import load_config, load_model, resolve_source
    from dowser_cli.probing import ProbeConfig
    from dowser_cli.training import FinetuneConfig

    info = inspection.describe_model(name)
    assert info["decoder_layers"]["count"] == 3 and len(info["scored_per_layer"]) == 7
    assert info["noise_images"] == noise
    small = dict(samples=2, batch_size=2, probes=2, seq_len=10)
    if noise:   # noise images through the vision tower and projector
        side = probe.run(name, tmp_path / "img.safetensors", ProbeConfig(**small, images="noise", include_projector=True))
        proj = [m for m in side["modules"] if m.startswith(info["projector"] + ".")]
        # Gemma 3's projector is a bare matrix, no nn.Linear: nothing of it to score
        assert (proj or name == "tiny-gemma3") and all(side["modules"][m]["psi_mean"] > 0 for m in proj)
    else:
        with pytest.raises(UserError, match="--images noise is not supported"):
            probe.run(name, tmp_path / "img.safetensors", ProbeConfig(**small, images="noise"))
    probe.run(name, tmp_path / "scores.safetensors", ProbeConfig(**small))
    mask.run(tmp_path / "scores.safetensors", tmp_path / "mask.safetensors", MaskConfig(ratio=0.2))
    data = work / ("train-images.json" if images else "train.json")
    finetune.run(name, data, tmp_path / "run", FinetuneConfig(max_steps=2, batch_size=4, lr=1e-2,
                                                           weight_decay=0.1),
                 mask_path=tmp_path / "mask.safetensors", image_folder=work)
    run = open_run(tmp_path / "run")
    assert run.sidecar["data"]["images"] == (8 if images else 0), run.sidecar["data"]
    tuned = load_run(run).model.eval()
    src = resolve_source(name)
    base = dict(load_model(src, load_config(src), torch.float32, "cpu", tokenizer=False).model.named_parameters())
    mf = open_mask(tmp_path / "mask.safetensors")
    moved = 0
    for n, p in tuned.named_parameters():
        if n in mf.params:
            frozen = ~mf.dense(n)
            assert torch.equal(p[frozen], base[n][frozen]), n           # frozen entries did not move
            moved += int((p != base[n]).sum())
        elif n not in run.params:
            assert torch.equal(p, base[n]), n
    assert moved > 0
    export.export(tmp_path / "run", tmp_path / "hf")
    back = getattr(transformers, auto_class).from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[256, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=0, atol=0)
    report = evaluate.run(name, [tmp_path / "run"], work / "suite.yaml", tmp_path / "report", EvalConfig())
    assert len(report["rows"]) == 2


def test_inspect_model_from_the_cli(tmp_path):
    r = run_cli("inspect-model", "tiny-gemma3", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["adapter"] == "gemma3" and info["projector"] == "model.multi_modal_projector"
    r = run_cli("inspect-model", "tiny-gemma3")
    assert r.returncode == 0 and "model.language_model.layers (x3)" in r.stdout
    r = run_cli("inspect-model", "nvila-lite-2b")
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _loss_pair(lm, work):
    """(LossHead's summed loss, the model's own loss x its labelled tokens) on one padded batch."""
    from dowser_cli import api, training
    from dowser_cli.integrations import hf

    examples = hf.read_examples(work / "train.json", lm.tokenizer, lm.processor)
    batch = api.collate([examples[i] for i in range(3)], lm.tokenizer, lm.processor)
    labels = batch["labels"]
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        ours = training.LossHead(lm)(dict(batch))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if lm.adapter.sequence_kwargs is not None:
            inputs.update(lm.adapter.sequence_kwargs(lm.config, inputs["input_ids"]))
        theirs = lm.model(**inputs, labels=labels, use_cache=False).loss * n
    return float(ours), float(theirs)


@pytest.mark.parametrize("name", [f[0] for f in FAMILIES] + [pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_the_training_loss_is_the_models_own_loss(work, name):
    """LossHead runs lm_head on the labelled positions only; whatever a family's head does to the logits
    (soft-capping, a logit scale) must be in it: the summed loss equals the model's own loss."""
    from dowser_cli.models import load_config, load_model, resolve_source

    src = resolve_source(name)
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    ours, theirs = _loss_pair(lm, work)
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_a_head_that_changes_the_logits_trains_on_the_models_loss(work, family):
    """Gemma 2's final-logit soft-capping and Cohere's logit scale, on tiny builds of those causal LMs
    (any *ForCausalLM loads as causal-lm) with tiny-llama's tokenizer."""
    import transformers

    from dowser_cli.models import LoadedModel, load_config, load_model, resolve_source
    from dowser_cli.models.registry import adapter_for_config, resolve_parts

    src = resolve_source("tiny-llama")
    tok = load_model(src, load_config(src), torch.float32, "cpu").tokenizer
    size = dict(vocab_size=len(tok) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id)
    cfg = transformers.Gemma2Config(**size, final_logit_softcapping=0.5) if family == "gemma2" else \
        transformers.CohereConfig(**size, logit_scale=0.25)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    adapter = adapter_for_config(model.config)
    lm = LoadedModel(src, model, model.config, adapter, resolve_parts(adapter, model), tok, None)
    ours, theirs = _loss_pair(lm, work)
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("name", [f[0] for f in FAMILIES if f[3]])
def test_images_are_counted_when_read_and_processed_per_batch_as_the_processor_would(work, tiny_models, name):
    """Reading the data opens each image only to check and count it; the batch then holds what the
    processor makes of the whole conversation (the same ids, up to how the template's own text around the
    image tokenises), its image run as long as counted, and every image input the model's forward takes
    (Idefics3's pixel_attention_mask too; per-token inputs such as Gemma 3's token types come from the
    ids, as the family's adapter makes them)."""
    from dowser_cli import data
    from dowser_cli.training import forward_keys

    lm = tiny_models(name)
    enc = data.Encoder(lm.tokenizer, lm.processor, 4096, lm.stop_ids())
    ds = data.load_dataset(work / "train-images.json", None, enc, skip_bad=False)
    examples = ds.examples[:4]                                          # four image sizes
    keys = forward_keys(lm.model)
    batch = data.collate(examples, data.pad_id(lm.tokenizer), lm.processor, keys=keys)
    token = data.image_token_id(lm.processor)
    runs, _ = data.image_runs(lm.processor, [data.load_image(e.image) for e in examples])
    for b, e in enumerate(examples):
        n = int(batch["attention_mask"][b].sum())
        assert n == e.length, (b, n, e.length)                         # counted at read = processed per batch
        assert len(runs[b]) == e.image_tokens
        ids = batch["input_ids"][b, :n].tolist()
        rendered = enc._render(data.parse_record(json.loads((work / "train-images.json").read_text())[b], b,
                                                 work).messages, False)
        whole = lm.processor(text=[rendered], images=[[data.load_image(e.image)]])["input_ids"][0]
        whole = list(whole)
        if len(whole) > 1 and whole[0] == whole[1] == lm.tokenizer.bos_token_id:
            whole = whole[1:]
        assert ids.count(token) == whole.count(token) and abs(len(ids) - len(whole)) <= 2
        labels = batch["labels"][b, :n].tolist()
        assert all(l == data.IGNORE for i, l in zip(ids, labels) if i == token)
    wanted = {k for k in lm.processor(text=[lm.processor.image_token], images=[[data.load_image(examples[0].image)]],
                                      return_tensors="pt") if k in keys and k not in data.TOKEN_KEYS}
    assert wanted <= set(batch), (wanted, set(batch))
    if name == "tiny-idefics3":
        assert "pixel_attention_mask" in batch
