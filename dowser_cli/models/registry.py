"""Architecture adapters: where each model family keeps its decoder layers, vision tower, projector,
lm_head and image token, and how to feed it a noise image. One registry entry per family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from dowser_cli.errors import UserError

# CLIP's normalisation, used when a model ships no image processor (e.g. --random-init).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Adapter:
    """Paths are candidates tried in order (transformers moved them between major versions)."""

    name: str
    model_types: tuple[str, ...]
    decoder_layers: tuple[str, ...]
    vision_tower: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    lm_head: str = "lm_head"
    final_norm: tuple[str, ...] = ()  # its output is lm_head's input at every position
    auto_class: str = "AutoModelForImageTextToText"
    # (model, config, n_images, generator, image_mean, image_std) -> (image segment ids [T_img], model kwargs)
    noise_images: Callable | None = field(default=None, compare=False)
    # (config, input_ids [B, T]) -> extra model kwargs that depend on the token layout
    sequence_kwargs: Callable | None = field(default=None, compare=False)
    # config.model_type -> the lmms-eval model wrapper that evaluates it (eval-forgetting --harness lmms-eval)
    lmms_wrappers: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass
class Parts:
    """An adapter resolved against one loaded model: runtime module names."""

    layers_path: str
    num_layers: int
    lm_head: str | None
    final_norm: str | None
    vision_tower: str | None
    projector: str | None


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _REGISTRY[adapter.name] = adapter
    return adapter


def available() -> list[str]:
    return sorted(_REGISTRY)


def lmms_wrappers() -> dict[str, str]:
    """{model_type: lmms-eval wrapper} over every adapter."""
    return {mt: w for a in _REGISTRY.values() for mt, w in a.lmms_wrappers.items()}


def with_noise_images() -> list[str]:
    """Adapters that can feed noise images to a probe (``--images noise``)."""
    return sorted(n for n, a in _REGISTRY.items() if a.noise_images is not None)


def adapter_for_config(config) -> Adapter:
    """Pick the adapter from ``config.model_type``; any ``*ForCausalLM`` falls back to ``causal-lm``."""
    mt = getattr(config, "model_type", None)
    for a in _REGISTRY.values():
        if mt in a.model_types:
            return a
    archs = getattr(config, "architectures", None) or []
    if any(str(x).endswith("ForCausalLM") for x in archs) or _is_causal_lm_type(mt):
        return _REGISTRY["causal-lm"]
    raise UserError(
        f"unsupported architecture {mt!r} ({', '.join(archs) or 'no architectures listed'}); "
        f"supported: {', '.join(available())} (any *ForCausalLM uses causal-lm)"
    )


def _is_causal_lm_type(model_type: str | None) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _first_module(model: nn.Module, paths: tuple[str, ...]) -> str | None:
    for p in paths:
        try:
            model.get_submodule(p)
            return p
        except AttributeError:
            continue
    return None


def resolve_parts(adapter: Adapter, model: nn.Module) -> Parts:
    layers = _first_module(model, adapter.decoder_layers)
    if layers is None:
        raise UserError(f"{adapter.name} adapter: no decoder layers at {' or '.join(adapter.decoder_layers)} "
                        f"in {type(model).__name__}")
    projector = _first_module(model, adapter.projector)
    return Parts(
        layers_path=layers,
        num_layers=len(model.get_submodule(layers)),
        lm_head=adapter.lm_head if _first_module(model, (adapter.lm_head,)) else None,
        final_norm=_first_module(model, adapter.final_norm),
        vision_tower=_first_module(model, adapter.vision_tower),
        projector=projector,
    )


def _noise_pixels(shape: tuple[int, ...], channel_dim: int, generator: torch.Generator, mean, std) -> torch.Tensor:
    """Raw pixels ~ N(0.5, 0.25^2) per channel, then (x - mean_c) / std_c."""
    x = 0.5 + 0.25 * torch.randn(shape, generator=generator)
    view = [1] * len(shape)
    view[channel_dim] = -1
    return (x - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)


def _llava_noise(model, config, n, generator, mean, std):
    vc = config.vision_config
    side, patch = vc.image_size, vc.patch_size
    n_tok = (side // patch) ** 2 + (1 if config.vision_feature_select_strategy == "full" else 0)
    pixels = _noise_pixels((n, 3, side, side), 1, generator, mean, std)
    return torch.full((n_tok,), config.image_token_id, dtype=torch.long), {"pixel_values": pixels}


def _qwen2_vl_noise(model, config, n, generator, mean, std, side: int = 224):
    vc = config.vision_config
    patch, merge, tps = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    grid = side // patch
    # Qwen2-VL flattens each patch as (channel, temporal, ph, pw); a still image repeats over time.
    one = _noise_pixels((n, grid * grid, 3, 1, patch, patch), 2, generator, mean, std).expand(-1, -1, -1, tps, -1, -1)
    pixels = one.reshape(n * grid * grid, 3 * tps * patch * patch)
    thw = torch.tensor([[1, grid, grid]] * n)
    n_tok = grid * grid // (merge * merge)
    ids = [config.vision_start_token_id] + [config.image_token_id] * n_tok + [config.vision_end_token_id]
    return torch.tensor(ids, dtype=torch.long), {"pixel_values": pixels, "image_grid_thw": thw}


def _mm_token_types(config, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen2-VL's M-RoPE needs each position's modality: 1 for image tokens, 0 for text."""
    return {"mm_token_type_ids": (input_ids == config.image_token_id).int()}


def _side(x) -> int:
    return int(x[0] if isinstance(x, (list, tuple)) else x)


def _gemma3_noise(model, config, n, generator, mean, std):
    side = _side(config.vision_config.image_size)
    ids = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image + [config.eoi_token_index]
    return torch.tensor(ids, dtype=torch.long), {"pixel_values": _noise_pixels((n, 3, side, side), 1, generator, mean,
                                                                                std)}


def _gemma3_token_types(config, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gemma 3 attends bidirectionally within an image and needs each position's type to train: 1 image."""
    return {"token_type_ids": (input_ids == config.image_token_index).long()}


def _internvl_noise(model, config, n, generator, mean, std):
    vc = config.vision_config
    side, patch = _side(vc.image_size), _side(vc.patch_size)
    n_tok = int((side // patch) ** 2 * config.downsample_ratio ** 2)   # pixel shuffle merges patches
    pixels = _noise_pixels((n, 3, side, side), 1, generator, mean, std)
    return torch.full((n_tok,), config.image_token_id, dtype=torch.long), {"pixel_values": pixels}


def _mistral3_noise(model, config, n, generator, mean, std):
    vc = config.vision_config
    side = _side(vc.image_size)
    n_tok = (side // vc.patch_size // config.spatial_merge_size) ** 2
    pixels = _noise_pixels((n, 3, side, side), 1, generator, mean, std)
    return (torch.full((n_tok,), config.image_token_index, dtype=torch.long),
            {"pixel_values": pixels, "image_sizes": torch.tensor([[side, side]] * n)})


def _anyres_noise(model, config, n, generator, mean, std):
    """LLaVA-NeXT / OneVision tile an image (anyres): one square image at the vision tower's size is its
    base view plus one tile; the placeholder count (with the row-end newline tokens) is whatever the
    model's own get_image_features makes of it."""
    side = _side(config.vision_config.image_size)
    pixels = _noise_pixels((n, 2, 3, side, side), 2, generator, mean, std)
    sizes = torch.tensor([[side, side]] * n)
    inner = getattr(model, "model", model)
    with torch.no_grad():
        out = inner.get_image_features(pixel_values=pixels[:1], image_sizes=sizes[:1],
                                       vision_feature_layer=config.vision_feature_layer,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    first = feats[0] if isinstance(feats, (list, tuple)) else feats   # this transformers: a list, [T, D] each
    n_tok = int(first.shape[-2] if first.dim() == 3 else first.shape[0])
    return (torch.full((n_tok,), config.image_token_index, dtype=torch.long),
            {"pixel_values": pixels, "image_sizes": sizes})


register(Adapter(
    name="llava", model_types=("llava",),
    decoder_layers=("model.language_model.layers", "language_model.model.layers"),
    final_norm=("model.language_model.norm", "language_model.model.norm"),
    vision_tower=("model.vision_tower", "vision_tower"),
    projector=("model.multi_modal_projector", "multi_modal_projector"),
    noise_images=_llava_noise, lmms_wrappers={"llava": "llava_hf"},
))
register(Adapter(
    name="llava-next", model_types=("llava_next", "llava_onevision"),
    decoder_layers=("model.language_model.layers", "language_model.model.layers"),
    final_norm=("model.language_model.norm", "language_model.model.norm"),
    vision_tower=("model.vision_tower", "vision_tower"),
    projector=("model.multi_modal_projector", "multi_modal_projector"),
    noise_images=_anyres_noise, lmms_wrappers={"llava_next": "llava_hf", "llava_onevision": "llava_hf"},
))
register(Adapter(
    name="qwen3-vl", model_types=("qwen3_vl", "qwen3_vl_moe"),
    decoder_layers=("model.language_model.layers",),
    final_norm=("model.language_model.norm",),
    vision_tower=("model.visual",),
    projector=("model.visual.merger",),
    noise_images=_qwen2_vl_noise, sequence_kwargs=_mm_token_types,
    lmms_wrappers={"qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"},
))
register(Adapter(
    name="gemma3", model_types=("gemma3",),
    decoder_layers=("model.language_model.layers",),
    final_norm=("model.language_model.norm",),
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    noise_images=_gemma3_noise, sequence_kwargs=_gemma3_token_types, lmms_wrappers={"gemma3": "gemma3"},
))
register(Adapter(
    name="mistral3", model_types=("mistral3",),
    decoder_layers=("model.language_model.layers",),
    final_norm=("model.language_model.norm",),
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    noise_images=_mistral3_noise, lmms_wrappers={"mistral3": "mistral3_vl"},
))
register(Adapter(
    name="qwen2-vl", model_types=("qwen2_vl", "qwen2_5_vl"),
    decoder_layers=("model.language_model.layers", "model.layers"),
    final_norm=("model.language_model.norm", "model.norm"),
    vision_tower=("model.visual", "visual"),
    projector=("model.visual.merger", "visual.merger"),
    noise_images=_qwen2_vl_noise, sequence_kwargs=_mm_token_types,
    lmms_wrappers={"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"},
))
register(Adapter(
    name="idefics3", model_types=("idefics3", "smolvlm"),
    decoder_layers=("model.text_model.layers",),
    final_norm=("model.text_model.norm",),
    vision_tower=("model.vision_model",),
    projector=("model.connector",),
))
register(Adapter(
    name="internvl", model_types=("internvl", "internvl_chat"),
    decoder_layers=("model.language_model.layers", "language_model.model.layers"),
    final_norm=("model.language_model.norm", "language_model.model.norm"),
    vision_tower=("model.vision_tower", "vision_model"),
    projector=("model.multi_modal_projector", "mlp1"),
    noise_images=_internvl_noise, lmms_wrappers={"internvl": "internvl_hf"},
))
register(Adapter(
    name="nvila", model_types=("vila", "nvila", "llava_llama"),
    decoder_layers=("llm.model.layers",),
    final_norm=("llm.model.norm",),
    vision_tower=("vision_tower",),
    projector=("mm_projector",),
    auto_class="AutoModel",
))
register(Adapter(
    name="causal-lm", model_types=(),
    decoder_layers=("model.layers", "transformer.h", "model.decoder.layers"),
    final_norm=("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm"),
    auto_class="AutoModelForCausalLM",
))
