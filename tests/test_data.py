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
    # the two answers each to its turn end (EOS), nothing of the user's turns nor the template's "\n"
    assert labelled == " Red.</s> Yes.</s>"
    # read: the image is one token, counted (not processed); batched: the processor's run replaces it,
    # and the ids are what the processor makes of the whole rendered conversation
    assert tok.decode(ex.input_ids).count("<image>") == 1 and ex.image_tokens == 4
    batch = data.collate([ex], 0, lm.processor)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tok.decode(ids).count("<image>") == 4 == ex.length - len(ex.input_ids) + 1
    whole = lm.processor(text=[enc._render(data.parse_record(rec, 0, tmp_path).messages, False)],
                         images=[data.load_image(ex.image)])["input_ids"][0]
    assert ids == list(whole)
    assert all(l == data.IGNORE for i, l in zip(ids, labels) if i == lm.config.image_token_id)
    # labels are the input ids where they are set (the model shifts them itself)
    assert all(l in (data.IGNORE, i) for i, l in zip(ids, labels))


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


def test_a_damaged_image_is_a_bad_record_found_when_the_data_is_read(tmp_path, llava):
    """Reading checks that each image decodes (a truncated file is a bad record, named before training
    starts) without running the processor on it."""
    _, enc = llava
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "whole.jpg", quality=95)
    data_ = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data_[: len(data_) // 2])
    recs = [{"image": "whole.jpg", "conversations": _conv(("human", "<image>\nColour?"), ("gpt", "Green."))},
            {"image": "cut.jpg", "conversations": _conv(("human", "<image>\nColour?"), ("gpt", "Green."))}]
    path = _write(tmp_path, recs)
    calls = []
    original = enc.processor.__class__.__call__
    enc.processor.__class__.__call__ = lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw)
    try:
        with pytest.raises(UserError, match=r"record 1: image .*cut.jpg cannot be decoded \(Truncated File Read\)"):
            data.load_dataset(path, None, enc, skip_bad=False)
        ds = data.load_dataset(path, None, enc, skip_bad=True)
    finally:
        enc.processor.__class__.__call__ = original
    assert [e.index for e in ds.examples] == [0] and ds.skipped[0]["index"] == 1
    assert len(calls) <= data.CHECKED_SIZES          # the processor ran on the first image sizes at most


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
    """SmolLM2's own ChatML template: the assistant label is the answer plus <|im_end|> (not the "\n"
    the template writes after it)."""
    from transformers import AutoTokenizer

    from dowser_cli.models import embedded

    tok = AutoTokenizer.from_pretrained(embedded.smollm2_dir())  # converted once, then cached
    enc = data.Encoder(tok, None, 256)
    ds = data.load_dataset(_write(tmp_path, [{"conversations": _conv(("human", "Capital of France?"),
                                                                     ("gpt", "Paris"))}]), None, enc, False)
    ex = ds.examples[0]
    assert tok.decode([x for x in ex.labels if x != data.IGNORE]) == "Paris<|im_end|>"
    assert "<|im_start|>user\nCapital of France?<|im_end|>" in tok.decode(ex.input_ids)


def _as_formats(tmp_path):
    """The same three records (system prompt, image, two turns) in each layout."""
    img = _image(tmp_path)
    llava = [{"image": img, "conversations": _conv(("human", "<image>\nWhat colour?"), ("gpt", "Red."),
                                                   ("human", "Sure?"), ("gpt", "Yes."))},
             {"conversations": _conv(("human", "Hi"), ("gpt", "Hello"))},
             {"image": img, "conversations": _conv(("human", "Describe"), ("gpt", "A square"))}]
    sharegpt = [{"images": [img], "conversations": llava[0]["conversations"]},
                {"conversations": llava[1]["conversations"], "images": []},
                {"images": [img], "conversations": llava[2]["conversations"]}]
    messages = [{"images": [img], "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                    {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]},
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                {"images": [img], "messages": [{"role": "user", "content": "Describe"},
                                               {"role": "assistant", "content": "A square"}]}]
    return llava, sharegpt, messages


def test_messages_and_sharegpt_layouts_train_to_the_llava_tokens_and_labels(tmp_path, llava):
    _, enc = llava
    want = None
    for name, recs in zip(("llava", "sharegpt", "messages"), _as_formats(tmp_path)):
        assert data.record_format(recs) == name
        ds = data.load_dataset(_write(tmp_path, recs, f"{name}.json"), None, enc, skip_bad=False)
        assert ds.format == name
        got = [(e.input_ids, e.labels, e.image) for e in ds.examples]
        if want is None:
            want = got
        assert got == want, name


def test_a_system_prompt_and_bad_messages_records(tmp_path, llava):
    _, enc = llava
    with_system = [{"system": "Be brief.", "conversations": _conv(("human", "Hi"), ("gpt", "Hello"))}]
    as_messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]}]
    a = data.load_dataset(_write(tmp_path, with_system, "s.json"), None, enc, skip_bad=False).examples[0]
    b = data.load_dataset(_write(tmp_path, as_messages, "m.json"), None, enc, skip_bad=False).examples[0]
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert "Be brief." in enc.tokenizer.decode(a.input_ids)
    bad = [{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(UserError, match="record 0: a message with role 'robot'"):
        data.load_dataset(_write(tmp_path, bad, "bad.json"), None, enc, skip_bad=False)
    bad = [{"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(UserError, match="content part of type 'video'"):
        data.load_dataset(_write(tmp_path, bad, "bad2.json"), None, enc, skip_bad=False)
