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
