"""LLaVA conversation records -> token ids with labels on the assistant's tokens only."""
import json

import pytest

from dowser_cli import data
from dowser_cli.errors import UserError


def _write(tmp_path, records, name="train.json", jsonl=False):
    path = tmp_path / name
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def _image(tmp_path, name="a.png"):
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    return name


def _conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


@pytest.fixture(scope="module")
def llava(tiny_models):
    lm = tiny_models("tiny-llava")
    return lm, data.Encoder(lm.tokenizer, lm.processor, 256)


def test_labels_cover_exactly_the_assistant_turns(tmp_path, llava):
    lm, enc = llava
    rec = {"image": _image(tmp_path), "conversations": _conv(("human", "<image>\nWhat colour?"), ("gpt", "Red."),
                                                             ("human", "Sure?"), ("gpt", "Yes."))}
    ds = data.load_dataset(_write(tmp_path, [rec]), None, enc, skip_bad=False)
    ex = ds.examples[0]
    tok = lm.tokenizer
    labelled = tok.decode([x for x in ex.labels if x != data.IGNORE])
    # the two answers with their end-of-turn text, nothing of the user's turns
    assert labelled == " Red.</s>\n Yes.</s>\n"
    assert tok.decode(ex.input_ids).count("<image>") == 4            # the processor expanded the placeholder
    assert all(l == data.IGNORE for i, l in zip(ex.input_ids, ex.labels) if i == lm.config.image_token_id)
    # labels are the input ids where they are set (the model shifts them itself)
    assert all(l in (data.IGNORE, i) for i, l in zip(ex.input_ids, ex.labels))


def test_jsonl_text_only_and_image_placeholder_added(tmp_path, llava):
    _, enc = llava
    recs = [{"conversations": _conv(("human", "Hi"), ("gpt", "Hello"))},
            {"image": _image(tmp_path), "conversations": _conv(("human", "Describe"), ("gpt", "A square"))}]
    ds = data.load_dataset(_write(tmp_path, recs, "t.jsonl", jsonl=True), None, enc, skip_bad=False)
    assert [e.image is not None for e in ds.examples] == [False, True]
    batch = data.collate(ds.examples, 0, enc.processor)
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


@pytest.mark.parametrize("record,reason", [
    ({"image": "missing.png", "conversations": _conv(("human", "<image>\nx"), ("gpt", "y"))}, "does not exist"),
    ({"conversations": _conv(("human", "only a question"))}, "no assistant"),
    ({"conversations": _conv(("human", "x" * 400), ("gpt", "y"))}, "over --max-len"),
    ({"conversations": _conv(("robot", "x"), ("gpt", "y"))}, "turn from 'robot'"),
    ({"text": "no conversations"}, "no 'conversations'"),
])
def test_bad_records_name_their_index_and_skip_bad_counts_them(tmp_path, llava, record, reason):
    _, enc = llava
    good = {"conversations": _conv(("human", "Hi"), ("gpt", "Hello"))}
    path = _write(tmp_path, [good, record])
    with pytest.raises(UserError, match=f"record 1: .*{reason}"):
        data.load_dataset(path, None, enc, skip_bad=False)
    ds = data.load_dataset(path, None, enc, skip_bad=True)
    assert len(ds.examples) == 1 and ds.skipped[0]["index"] == 1 and reason.split()[-1] in ds.skipped[0]["reason"]


def test_not_json_and_empty_dataset(tmp_path, llava):
    _, enc = llava
    bad = tmp_path / "bad.json"
    bad.write_text("this is { not json")
    with pytest.raises(UserError, match="not JSON or JSONL"):
        data.load_dataset(bad, None, enc, skip_bad=False)
    with pytest.raises(UserError, match="empty dataset"):
        data.load_dataset(_write(tmp_path, []), None, enc, skip_bad=False)


@pytest.mark.slow
def test_chat_template_of_the_real_model_is_used(tmp_path):
    """SmolLM2's own ChatML template: the assistant label is the answer plus <|im_end|>."""
    from transformers import AutoTokenizer

    from dowser_cli.models import embedded

    tok = AutoTokenizer.from_pretrained(embedded.smollm2_dir())  # converted once, then cached
    enc = data.Encoder(tok, None, 256)
    ds = data.load_dataset(_write(tmp_path, [{"conversations": _conv(("human", "Capital of France?"),
                                                                     ("gpt", "Paris"))}]), None, enc, False)
    ex = ds.examples[0]
    assert tok.decode([x for x in ex.labels if x != data.IGNORE]) == "Paris<|im_end|>\n"
    assert "<|im_start|>user\nCapital of France?<|im_end|>" in tok.decode(ex.input_ids)
