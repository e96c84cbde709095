"""Training and evaluation text through real tokenizers, from the files that ship in PyPI packages
(`make install` puts mistral-common's and llama-models' files under .venv/tokenizer-files, off the
import path): Llama-2's SentencePiece kind (LLaVA-1.5's), Mistral's v3 SentencePiece with its control
tokens, Mistral 3's tekken, Llama 3's tiktoken, each with its family's chat template, and Gemma's turn
markers. For each: the ids trained on are the whole conversation tokenised at once, the prompt is what
evaluation feeds ``generate``, labels run from the answer's first token to its turn end and no further,
and generation stops at the turn end."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dowser_cli import data, evaluate, tasks

FILES = Path(os.environ.get("DOWSER_TOKENIZER_FILES", Path(sys.prefix) / "tokenizer-files"))

# LLaVA-1.5's template on the hub (llava-hf/llava-1.5-7b-hf): typed parts, and no EOS after the answer
LLAVA15 = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
           "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
           "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
           "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
           "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
           "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Mistral-7B-Instruct-v0.3's
MISTRAL = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
           "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
           "{{- ' ' + message['content']|trim + eos_token }}{%- endif %}{%- endfor %}")
# Mistral 3 / Pixtral's (tekken: no space around [INST])
TEKKEN = ("{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
          "{{- '[INST]' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
          "{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}")
# Llama 3 Instruct's
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
# Gemma's turn markers (the turn end is not the tokenizer's EOS; "\n" after it is template text)
GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

LLAMA3_SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                  128007: "<|end_header_id|>", 128009: "<|eot_id|>"}
# name: (file in the packages, file name the converter wants, tokenizer config, template, turn end)
FAMILIES = {
    "llava-1.5": ("mistral_common/data/tokenizer.model.v1", "tokenizer.model",
                  {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, LLAVA15, "</s>"),
    "mistral": ("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model",
                {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, MISTRAL, "</s>"),
    "tekken": ("mistral_common/data/tekken_240911.json", "tekken.json", {}, TEKKEN, "</s>"),
    "llama-3": ("llama_models/llama3/tokenizer.model", "tokenizer.model",
                {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                 "eos_token": "<|end_of_text|>",
                 "added_tokens_decoder": {str(k): {"content": v, "special": True} for k, v in LLAMA3_SPECIAL.items()}},
                LLAMA3, "<|eot_id|>"),
    "gemma-turns": ("mistral_common/data/tokenizer.model.v1", "tokenizer.model",
                    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}, GEMMA, "<end_of_turn>"),
}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A tokenizer directory per family (converted once from the shipped file, saved as tokenizer.json)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    made = {}

    def get(name):
        if name in made:
            return made[name]
        src, fname, cfg, template, turn_end = FAMILIES[name]
        if not (FILES / src).is_file():
            pytest.fail(f"{FILES / src} is missing: `make install` installs the tokenizer files")
        d = tmp_path_factory.mktemp(name)
        if fname == "tekken.json":   # transformers' tekken converter, without mistral-common's runtime
            from transformers.integrations.mistral.tokenizer import MistralConverter

            raw = json.loads((FILES / src).read_text())   # an early tekken file: mistral-common's
            raw.setdefault("special_tokens", [            # special tokens of then, written in
                {"rank": r, "token_str": t, "is_control": True}
                for r, t in enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"])])
            (d / fname).write_text(json.dumps(raw))
            tok = PreTrainedTokenizerFast(tokenizer_object=MistralConverter(str(d / fname)).converted(),
                                          bos_token="<s>", eos_token="</s>", unk_token="<unk>")
            tok.add_bos_token = True
        else:
            (d / fname).write_bytes((FILES / src).read_bytes())
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
            tok = AutoTokenizer.from_pretrained(d)
        if name == "llava-1.5":
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        if name == "gemma-turns":
            tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = template
        out = d / "tok"
        tok.save_pretrained(out)
        made[name] = (AutoTokenizer.from_pretrained(out), turn_end)
        return made[name]
    return get


def _conversation():
    return [{"role": "user", "content": "What colour is the square?"}, {"role": "assistant", "content": "Red, mostly."},
            {"role": "user", "content": "And the circle?"}, {"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_real_tokenizers_train_on_the_whole_conversations_ids_and_label_each_answer_to_its_turn_end(build, name):
    tok, turn_end = build(name)
    end_id = tok.convert_tokens_to_ids(turn_end)
    enc = data.Encoder(tok, None, 512, stop_ids=[end_id])
    messages = _conversation()
    ex = enc.encode(data.Record(0, messages, None))
    rendered = enc._render(messages, False)
    whole = tok(rendered)["input_ids"]
    if len(whole) > 1 and whole[0] == whole[1] == tok.bos_token_id:
        whole = whole[1:]
    labelled = [i for i, x in enumerate(ex.labels) if x != data.IGNORE]
    if name == "llava-1.5":
        # its assistant turn has no stop token: the EOS goes after each answer (as LLaVA trained), and
        # everything else is the conversation tokenised at once
        assert [i for k, i in enumerate(ex.input_ids) if not (i == tok.eos_token_id and ex.labels[k] != data.IGNORE)] \
            == whole
    else:
        assert ex.input_ids == whole
    # the prompt before the first answer is what evaluation feeds generate
    assert ex.input_ids[: labelled[0]] == data.prompt_ids(enc, messages[0]["content"])
    # two answers, each from its first real token to its turn end, nothing after it
    runs, run = [], []
    for k in labelled:
        if run and k != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(k)
    runs.append(run)
    assert len(runs) == 2
    for run, answer in zip(runs, ["Red, mostly.", "Blue."]):
        ids = [ex.input_ids[k] for k in run]
        assert ids[-1] == end_id and end_id not in ids[:-1]
        assert tok.decode(ids[:-1]).strip() == answer
        first = tok.convert_ids_to_tokens(ids[0])
        assert first.strip("▁Ġ ") != "", f"a stray prefix-space token {first!r} starts the answer"


def _tiny_causal_lm(tok, path: Path, turn_end_id: int):
    """A 1-layer Llama on the tokenizer's vocabulary, saved with the tokenizer and a generation config
    that stops at the turn end (as the family's checkpoints do)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=sorted({tok.eos_token_id, turn_end_id}))
    return model


@pytest.mark.parametrize("name", ["llama-3", "gemma-turns"])
def test_generation_stops_at_the_turn_end_a_real_tokenizer_and_template_give(build, tmp_path, name):
    """A tiny model taught one answer on the real tokenizer: evaluation's greedy answer stops at the
    template's turn end (not the tokenizer's EOS), and without it would run on."""
    from dowser_cli.models import load_config, load_model, resolve_source

    tok, turn_end = build(name)
    end_id = tok.convert_tokens_to_ids(turn_end)
    assert end_id != tok.eos_token_id
    model = _tiny_causal_lm(tok, tmp_path, end_id)
    enc = data.Encoder(tok, None, 256, stop_ids=[end_id])
    ex = enc.encode(data.Record(0, [{"role": "user", "content": "Capital of France?"},
                                     {"role": "assistant", "content": "Paris is"}], None))
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):           # memorise the one answer and its turn end
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    src = resolve_source(str(tmp_path / "m"))
    lm = load_model(src, load_config(src), torch.float32, "cpu")
    assert end_id in lm.stop_ids()
    task = tasks.Task(name="t", role="held_out", kind="generate", metric="exact_match", prompt="{question}",
                      max_new_tokens=12)
    rec = tasks.EvalRecord("0", "Capital of France?", ["Paris is"])
    seen = []
    decode = lm.tokenizer.decode

    def spy(o, **kw):
        seen.append([int(i) for i in o])
        return decode(o, **kw)

    lm.tokenizer.decode = spy
    assert evaluate.generate_answers(lm, task, [rec], 1, 256, "cpu", torch.float32, lambda k: None) == ["Paris is"]
    assert seen[-1][-1] == end_id and end_id not in seen[-1][:-1]      # stopped at the turn end, kept
    lm.model.generation_config.eos_token_id = tok.eos_token_id         # the tokenizer's EOS alone
    evaluate.generate_answers(lm, task, [rec], 1, 256, "cpu", torch.float32, lambda k: None)
    assert len([i for i in seen[-1] if i != tok.pad_token_id]) > len(seen[0])   # it runs on past the turn end
