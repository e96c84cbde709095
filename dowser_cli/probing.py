"""The probe's settings and its self-generated text, shared by `dowser probe` and eval-forgetting's
drift (which samples its text exactly as the probe does): a `[BOS] + random prefix` continued by the
model itself, with the authors' sampling, and optional noise images."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dowser_cli.config import option
from dowser_cli.errors import UserError
from dowser_cli.models import LoadedModel
from dowser_cli.models.registry import CLIP_MEAN, CLIP_STD, with_noise_images
from dowser_cli.selection import parse_targets


DEVICE_MAPS = ("", "auto", "balanced", "balanced_low_0", "sequential")


SUPPRESS = ("multimodal", "special")


# config keys of ids whose presence in input_ids makes a multimodal model expect image/video features
MULTIMODAL_ID_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                      "vision_start_token_id", "vision_end_token_id", "vision_token_id", "audio_token_id",
                      "audio_token_index")


@dataclass
class ProbeConfig:
    samples: int = option(64, "K: probe samples in all.")
    batch_size: int = option(4, "B: samples per batch.")
    probes: int = option(8, "M: Rademacher probes per batch.")
    seq_len: int = option(64, "Text tokens per sample, BOS included.")
    prefix_len: str = option("1-5", "Random prefix length L, N or MIN-MAX (uniform in the range).")
    images: str = option("off", "off | noise: add a noise image per sample.")
    texts: str | None = option(None, "File of user texts, one per line, instead of synthetic text.", show="synthetic")
    layers: str = option("all", "Decoder layers: all | last:N | first:N | 0-3,7.")
    targets: str = option("attn,mlp", "Linears inside the layers: attn,mlp.")
    include_lm_head: bool = option(True, "Score lm_head (psi = 1).")
    include_projector: bool = option(False, "Score the vision-language projector.")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16.", show="auto: bf16 on GPU")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    seed: int = option(0, "Seed for probe text and Rademacher vectors.")
    # Sampling of the probe text, as the authors' script: temperature 0.9, top-p 0.9, repetition
    # penalty 1.05 and transformers' default top-k 50 (0 turns top-k off).
    temperature: float = option(0.9, "Sampling temperature of the probe text.")
    top_p: float = option(0.9, "Nucleus (top-p) sampling of the probe text.")
    top_k: int = option(50, "Top-k sampling of the probe text; 0 = off.", show="50, transformers' default, as the authors")
    repetition_penalty: float = option(1.05, "Repetition penalty of the probe text.")
    # Ids generation may never sample. multimodal: only image/video placeholders and the other
    # multimodal ids, which would make the next forward ask for features it was not given (the
    # authors suppress nothing; their LLaVA's image index -200 is not in the vocabulary). special:
    # every special and added token id too (EOS excepted), the behaviour before 0.6.
    suppress: str = option("multimodal", "Ids never sampled: multimodal (image/video placeholders) | special "
                           "(every special and added token).")
    # decoding is weight-bandwidth bound, so one generate() call for many samples costs about as much as
    # for a few
    gen_batch_size: int = option(64, "Samples generated per generate() call.")
    # the M backward passes of a batch as one vmapped pass. Same numbers; on a GPU it saves M-1 sweeps of
    # kernel launches, on a CPU it was no faster overall and its extra live allocations fragmented the
    # host heap (+17% peak), so auto means on for CUDA, off elsewhere.
    batched_probes: str = option("auto", "auto | on | off: a batch's M backward passes as one vmapped pass "
                                 "(same numbers).", show="auto: on for CUDA")
    checkpoint_every: int = option(4, "Batches between resumable partial saves.")
    device_map: str = option("", "auto | balanced | balanced_low_0 | sequential: a model larger than one GPU, its "
                             "layers spread over the GPUs by accelerate (--device ignored).", show="off")

    def batch_sizes(self) -> list[int]:
        full, rest = divmod(self.samples, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    @property
    def total_probes(self) -> int:
        return len(self.batch_sizes()) * self.probes

    def gen_chunk(self) -> int:
        """Samples per generate() call: a multiple of the batch size, so no batch straddles two calls."""
        return max(1, self.gen_batch_size // self.batch_size) * self.batch_size

    def prefix_range(self) -> tuple[int, int]:
        parts = str(self.prefix_len).replace(" ", "").split("-")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
        if not 0 <= lo <= hi:
            raise UserError(f"--prefix-len {self.prefix_len!r}: expected N or MIN-MAX with 0 <= MIN <= MAX")
        return lo, hi

    def digest(self) -> str:
        """What must match for --resume to continue a partial run (everything that shapes the numbers)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("checkpoint_every",)}
        if not keep["device_map"]:
            del keep["device_map"]  # partials from before the option existed still resume
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: ProbeConfig) -> None:
    for name, value in (("--samples", cfg.samples), ("--batch-size", cfg.batch_size), ("--probes", cfg.probes),
                        ("--seq-len", cfg.seq_len), ("--gen-batch-size", cfg.gen_batch_size)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if cfg.batch_size > cfg.samples:
        raise UserError(f"--batch-size {cfg.batch_size}: larger than --samples {cfg.samples}")
    lo, hi = cfg.prefix_range()
    if cfg.texts is None and hi + 1 >= cfg.seq_len:
        raise UserError(f"--seq-len {cfg.seq_len}: must exceed 1 + the longest prefix ({hi})")
    if str(cfg.batched_probes) not in ("auto", "on", "off"):
        raise UserError(f"--batched-probes {cfg.batched_probes!r}: expected auto, on or off")
    if cfg.device_map not in DEVICE_MAPS:
        raise UserError(f"--device-map {cfg.device_map!r}: expected one of {', '.join(m for m in DEVICE_MAPS if m)}")
    if cfg.images not in ("off", "noise"):
        raise UserError(f"--images {cfg.images!r}: expected off or noise")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top-p {cfg.top_p}: must be in (0, 1]")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature {cfg.temperature}: must be > 0")
    if cfg.top_k < 0:
        raise UserError(f"--top-k {cfg.top_k}: must be >= 0 (0 turns top-k off)")
    if cfg.repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty {cfg.repetition_penalty}: must be > 0 (1 = none)")
    if cfg.suppress not in SUPPRESS:
        raise UserError(f"--suppress {cfg.suppress!r}: expected one of {', '.join(SUPPRESS)}")
    parse_targets(cfg.targets)


def use_batched_probes(cfg: ProbeConfig, device: str) -> bool:
    mode = str(cfg.batched_probes)
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


@dataclass
class TokenIds:
    bos: int
    eos: list[int]
    pad: int
    vocab: int          # random prefix ids are drawn from [0, vocab)
    special: set[int]   # replaced by BOS when drawn into a random prefix (the authors' --avoid-special)
    multimodal: set[int]  # image/video placeholders and other multimodal ids (a subset of special)

    def suppressed(self, mode: str) -> list[int]:
        """Ids generation never samples under ``--suppress mode`` (EOS never: it ends a sample)."""
        ids = self.multimodal if mode == "multimodal" else self.special
        return sorted(ids - set(self.eos))


def token_ids(lm: LoadedModel) -> TokenIds:
    tc, tok = lm.text_config, lm.tokenizer

    def first(*xs):
        for x in xs:
            if isinstance(x, (list, tuple)):
                x = x[0] if x else None
            if x is not None:
                return int(x)
        return None

    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    eos = eos if eos is not None else first(getattr(lm.config, "eos_token_id", None), tc.eos_token_id)
    bos = first(getattr(tok, "bos_token_id", None) if tok is not None else None,
                getattr(lm.config, "bos_token_id", None), tc.bos_token_id, eos)
    pad = first(getattr(tok, "pad_token_id", None) if tok is not None else None,
                getattr(lm.config, "pad_token_id", None), tc.pad_token_id, eos, 0)
    eos_list = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    multimodal = set()
    for owner in (lm.config, tok):
        for key in MULTIMODAL_ID_KEYS:
            value = getattr(owner, key, None) if owner is not None else None
            if isinstance(value, int) and value >= 0:  # LLaVA's original code uses -200, outside the vocabulary
                multimodal.add(int(value))
    special = {bos, pad, *eos_list, *multimodal}
    vocab = int(tc.vocab_size)
    if tok is not None:
        special.update(int(i) for i in tok.all_special_ids)
        special.update(int(i) for i in getattr(tok, "added_tokens_decoder", {}))
        vocab = min(vocab, len(tok))
    return TokenIds(bos=bos, eos=eos_list, pad=pad, vocab=vocab, special=special, multimodal=multimodal)


def image_segment(lm: LoadedModel, gen: torch.Generator) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Image placeholder ids and model kwargs (batch dim 0 = this sample) for one noise image."""
    fn = lm.adapter.noise_images
    if fn is None:
        raise UserError(f"--images noise is not supported for the {lm.adapter.name} architecture yet "
                        f"(supported: {', '.join(with_noise_images())})")
    ip = getattr(lm.processor, "image_processor", None)
    mean = tuple(getattr(ip, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(ip, "image_std", None) or CLIP_STD)
    seg, kwargs = fn(lm.model, lm.config, 1, gen, mean, std)
    return seg.tolist(), kwargs


def random_prefix(ids: TokenIds, lo: int, hi: int, gen: torch.Generator) -> list[int]:
    """[BOS] + L random ids, L uniform in lo..hi, special ids replaced by BOS."""
    length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    draw = torch.randint(0, ids.vocab, (length,), generator=gen).tolist()
    return [ids.bos] + [ids.bos if t in ids.special else t for t in draw]


@dataclass
class Sample:
    tokens: list[int]                       # real tokens: BOS, image segment, text
    images: dict[str, torch.Tensor]         # model kwargs of this sample's image (batch dim 0), or {}


def collate_images(samples: list[Sample]) -> dict[str, torch.Tensor]:
    # Each kwarg's dim 0 is per image (LLaVA pixel_values [1, 3, H, W]; Qwen2-VL patches and grid_thw).
    if not samples[0].images:
        return {}
    return {k: torch.cat([s.images[k] for s in samples]) for k in samples[0].images}


@torch.no_grad()
def generate_batch(lm: LoadedModel, prompts: list[list[int]], n_text_prefix: list[int], cfg: ProbeConfig,
                   ids: TokenIds, image_kwargs: dict, seed: int, device: str) -> list[list[int]]:
    """Continue each prompt with the model's own sampling until it holds ``seq_len`` text tokens (or
    stops at EOS). Prompts are left-padded for batched generation; returns the real tokens only."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), ids.pad, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    new = cfg.seq_len - min(n_text_prefix)
    gcfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            repetition_penalty=cfg.repetition_penalty, max_new_tokens=new, min_new_tokens=0,
                            pad_token_id=ids.pad, eos_token_id=ids.eos, bos_token_id=ids.bos,
                            # a sampled image/video placeholder would ask the model for image features it
                            # was not given (--suppress multimodal); the prefixes hold no special ids
                            suppress_tokens=ids.suppressed(cfg.suppress) or None)
    torch.manual_seed(seed)  # generate() samples from the global RNG
    kwargs = {**image_kwargs, **sequence_kwargs(lm, input_ids, bool(image_kwargs))}
    out = lm.model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                            generation_config=gcfg, **{k: v.to(device) for k, v in kwargs.items()})
    out = out[:, width:].cpu()
    eos = set(ids.eos)
    seqs = []
    for i, p in enumerate(prompts):
        cont: list[int] = []
        for t in out[i].tolist():
            if len(cont) >= cfg.seq_len - n_text_prefix[i]:
                break
            cont.append(t)
            if t in eos:  # what follows EOS is padding, not text
                break
        seqs.append(p + cont)
    return seqs


def sequence_kwargs(lm: LoadedModel, input_ids: torch.Tensor, with_images: bool) -> dict[str, torch.Tensor]:
    fn = lm.adapter.sequence_kwargs
    return fn(lm.config, input_ids) if fn is not None and with_images else {}


def read_texts(path: Path, samples: int) -> list[str]:
    if not path.is_file():
        raise UserError(f"--texts {path}: no such file")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise UserError(f"--texts {path}: not UTF-8 text") from None
    if len(lines) < samples:
        raise UserError(f"--texts {path}: {len(lines)} non-empty lines but --samples is {samples}")
    return lines[:samples]


def sample_seed(seed: int, index: int, what: str) -> int:
    """Independent, reproducible seed per sample (or per generate call), so any batch can be rebuilt
    on its own: resuming and splitting work never changes the numbers."""
    return int.from_bytes(hashlib.sha256(f"dowser-probe:{what}:{seed}:{index}".encode()).digest()[:7], "little")


def make_samples(lm: LoadedModel, cfg: ProbeConfig, ids: TokenIds, start: int, n: int, texts: list[str] | None,
                 device: str) -> list[Sample]:
    """Samples start..start+n-1: user texts, or random prefixes continued by the model in one call."""
    heads = []
    for i in range(start, start + n):
        gen = torch.Generator().manual_seed(sample_seed(cfg.seed, i, "sample"))
        img, kwargs = image_segment(lm, gen) if cfg.images == "noise" else ([], {})
        heads.append((gen, img, kwargs))
    if texts is not None:
        return [Sample([ids.bos] + img + lm.tokenizer(texts[i], add_special_tokens=False)["input_ids"][: cfg.seq_len - 1],
                       kwargs) for i, (_, img, kwargs) in zip(range(start, start + n), heads)]
    lo, hi = cfg.prefix_range()
    pre = [random_prefix(ids, lo, hi, gen) for gen, _, _ in heads]
    prompts = [[p[0]] + img + p[1:] for p, (_, img, _) in zip(pre, heads)]
    image_kwargs = collate_images([Sample([], k) for _, _, k in heads])
    seqs = generate_batch(lm, prompts, [len(p) for p in pre], cfg, ids, image_kwargs,
                          sample_seed(cfg.seed, start, "generate"), device)
    return [Sample(sq, k) for sq, (_, _, k) in zip(seqs, heads)]
