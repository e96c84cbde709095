"""Model loading (dowser_cli/models): the empty module tree that FSDP ranks > 0 build instead of
reading the weights."""
import pytest
import torch

from dowser_cli import artifacts
from dowser_cli.models import load_config, load_model, resolve_source


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-llama"])
def test_empty_load_has_the_real_tree_without_storage_and_the_same_tokenizer(name):
    src = resolve_source(name)
    cfg = load_config(src)
    real = load_model(src, cfg, torch.float32, "cpu")
    empty = load_model(src, cfg, torch.float32, "cpu", empty=True)
    assert artifacts.model_fingerprint(empty.model) == artifacts.model_fingerprint(real.model)
    assert all(p.is_meta for p in empty.model.parameters())
    assert [n for n, _ in empty.model.named_buffers()] == [n for n, _ in real.model.named_buffers()]
    assert empty.parts == real.parts and empty.adapter.name == real.adapter.name
    assert empty.tokenizer.get_vocab() == real.tokenizer.get_vocab()
    assert type(empty.processor) is type(real.processor)


# Every shipped config.json against the checkpoint's published parameter counts (built on the meta device,
# no weights): a wrong width, depth, vocabulary or head count in a config moves these by far more than
# the tolerance. Figures: the llava-hf model cards (7.06B, 13.4B); Qwen3-VL-4B-Instruct's card (4.44B)
# and its text model, Qwen3-4B's card (3.6B non-embedding); Gemma 3 technical report, table 1 (4B:
# vision encoder 417M, non-embedding 3,209M; the gemma-3-4b-it card's 4.3B); Mistral-Small-3.1-24B's card (24B).
# Each figure is (published count, tolerance): half a unit of its last stated digit.
PUBLISHED = {
    "llava-1.5-7b": {"adapter": "llava", "layers": 32, "total": (7.06e9, 0.005e9)},
    "llava-1.5-13b": {"adapter": "llava", "layers": 40, "total": (13.4e9, 0.05e9)},
    "qwen3-vl-4b": {"adapter": "qwen3-vl", "layers": 36, "total": (4.44e9, 0.005e9),
                    "decoder_layers": (3.6e9, 0.05e9)},
    "gemma-3-4b": {"adapter": "gemma3", "layers": 34, "total": (4.3e9, 0.05e9),
                   "decoder_layers": (3209e6, 0.5e6), "vision_tower": (417e6, 0.5e6)},
    "mistral-small-3.1-24b": {"adapter": "mistral3", "layers": 40, "total": (24e9, 0.5e9)},
}


def test_every_shipped_config_has_its_checkpoints_published_size():
    from dowser_cli.inspection import describe_model
    from dowser_cli.models import aliases

    shipped = sorted(k for k, v in aliases().items() if v.get("config"))
    assert shipped == sorted(PUBLISHED)
    for alias, want in PUBLISHED.items():
        info = describe_model(alias, random_init=True)
        assert info["adapter"] == want["adapter"] and info["decoder_layers"]["count"] == want["layers"], alias
        for part in ("total", "decoder_layers", "vision_tower"):
            if part in want:
                figure, tol = want[part]
                assert abs(info["params"][part] - figure) <= tol, (alias, part, info["params"][part])
