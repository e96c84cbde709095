"""Training data: LLaVA conversation records (JSON list or JSONL) turned into token ids, labels that
cover only the assistant's tokens, and image batches through the model's own processor.

A record: ``{"image": "rel/path.jpg" (optional), "conversations": [{"from": "human", "value":
"<image>\\nWhat is shown?"}, {"from": "gpt", "value": "A cat."}, ...]}``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dowser_cli.errors import UserError
from dowser_cli.models.chat import FALLBACK_TEMPLATE, IMAGE_PLACEHOLDER
from dowser_cli.progress import progress_bar

IGNORE = -100  # label of tokens without loss (prompt, system text, image, padding)
CHECKED_SIZES = 4  # image sizes whose run transformers' count must match before it is used alone
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    index: int                      # position in the data file (what error messages name)
    messages: list[dict[str, str]]  # role/content with the "<image>" placeholder kept in the text
    image: Path | None


@dataclass
class Example:
    """One encoded record. The ids hold the image as the single image token of the rendered text; the
    processor's run of image tokens replaces it when a batch is made (``collate``), where the image is
    read, so reading the data opens each image only to check it."""
    index: int
    input_ids: list[int]
    labels: list[int]
    image: Path | None
    image_tokens: int = 0    # the length of the image's run of tokens (what the processor makes of it)

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    @property
    def length(self) -> int:
        """Tokens the model reads: the ids with the image token replaced by its run."""
        return len(self.input_ids) + (self.image_tokens - 1 if self.image is not None else 0)


@dataclass
class Dataset:
    path: Path
    examples: list[Example]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "reason"} of --skip-bad records
    total: int = 0
    format: str = "llava"   # the file's record layout (record_format)


# ---- reading records ---------------------------------------------------------------------------------

def read_records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one record per line); anything else is one clear error."""
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--data {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"--data {path}: not JSON or JSONL (line {n}: {e.msg})") from None
    return records


FORMATS = ("llava", "sharegpt", "messages")


def record_format(raw: list[Any]) -> str:
    """The layout of a training file, decided from its first record (one layout per file):
    ``llava`` (``conversations`` of ``from``/``value`` turns, an ``image``), ``sharegpt``
    (LLaMA-Factory's: the same turns, ``images`` as a list, an optional ``system``) or ``messages``
    (OpenAI-style ``role``/``content`` turns, content a string or a list of ``text``/``image`` parts,
    and ``images``, as TRL's and LLaMA-Factory's openai layout)."""
    first = next((r for r in raw if isinstance(r, dict)), {})
    if "messages" in first:
        return "messages"
    if "conversations" in first and ("images" in first or "system" in first):
        return "sharegpt"
    return "llava"


def _turns_from_conversations(raw: dict) -> list[dict]:
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'conversations' list")
    messages = []
    if isinstance(raw.get("system"), str) and raw["system"]:
        messages.append({"role": "system", "content": raw["system"]})
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise ValueError("a turn without a string 'value'")
        role = ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise ValueError(f"turn from {t.get('from')!r} (expected human or gpt)")
        messages.append({"role": role, "content": t["value"]})
    return messages


def _turns_from_messages(raw: dict) -> list[dict]:
    turns = raw.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no 'messages' list")
    messages = []
    for t in turns:
        role = ROLES.get(str(t.get("role", "")).lower()) if isinstance(t, dict) else None
        if role is None:
            raise ValueError(f"a message with role {(t.get('role') if isinstance(t, dict) else t)!r} "
                             f"(expected system, user or assistant)")
        content = t.get("content")
        if isinstance(content, list):  # typed parts: an image part becomes the <image> placeholder
            text = ""
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind in ("image", "image_url"):
                    text += IMAGE_PLACEHOLDER
                else:
                    raise ValueError(f"a content part of type {kind!r} (expected text or image)")
            content = text
        if not isinstance(content, str):
            raise ValueError("a message without string or list 'content'")
        messages.append({"role": role, "content": content})
    return messages


def parse_record(raw: Any, index: int, image_folder: Path, fmt: str = "llava") -> Record:
    """Check one raw record of layout ``fmt`` (``record_format``); raises ValueError with the reason
    (the caller adds file and index). Every layout becomes the same messages and image."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if fmt == "messages":
        messages = _turns_from_messages(raw)
    else:
        messages = _turns_from_conversations(raw)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant (gpt) turn")
    image = raw.get("images", raw.get("image")) if fmt != "llava" else raw.get("image")
    if isinstance(image, list):  # multi-image records: the LLaVA format allows a list; we take one
        if len(image) > 1:
            raise ValueError("records with several images are not supported")
        image = image[0] if image else None
    if isinstance(image, dict):  # {"path": ...} as some exporters write it
        image = image.get("path")
    if image is not None and not isinstance(image, str):
        raise ValueError("'image' is not a path")
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if image is None:
        if n_placeholders:
            raise ValueError(f"{IMAGE_PLACEHOLDER} in the text but no 'image'")
        return Record(index, messages, None)
    path = Path(image) if Path(image).is_absolute() else image_folder / image
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    if n_placeholders == 0:  # LLaVA's convention: the image goes before the first human turn
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError("an image but no user turn to put it in")
        messages[first] = {**messages[first], "content": f"{IMAGE_PLACEHOLDER}\n{messages[first]['content']}"}
    elif n_placeholders > 1:
        raise ValueError(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders for one image")
    return Record(index, messages, path)


def load_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image file whose pixels decode (a damaged or truncated file raises
    OSError); nothing is kept, and no processor runs."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (OSError, SyntaxError) as e:   # PIL raises SyntaxError for some broken headers
        raise ValueError(f"image {path} cannot be decoded ({e})") from None


# ---- chat rendering and tokenisation -------------------------------------------------------------------

class Encoder:
    """Renders a conversation with the model's chat template and tokenises the whole text at once (as
    the model reads it at inference), so that labels cover exactly the assistant turns: from the
    answer's first token to its turn end (the first stop token: the tokenizer's EOS or one of
    ``stop_ids``, e.g. Gemma's ``<end_of_turn>``), and no template text after it. A template whose
    assistant turn has no stop token (LLaVA-1.5's on the hub) gets the tokenizer's EOS after the
    answer, as LLaVA's own training text had, so that the model learns to stop."""

    def __init__(self, tokenizer, processor, max_len: int, stop_ids: list[int] | None = None):
        self.tokenizer, self.processor, self.max_len = tokenizer, processor, max_len
        owner = processor if getattr(processor, "chat_template", None) else tokenizer
        self._template = None if getattr(owner, "chat_template", None) else FALLBACK_TEMPLATE
        self._render_with = owner
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        eos = tokenizer.eos_token_id
        self.stop_ids = {int(i) for i in (stop_ids or [])} | ({int(eos)} if eos is not None else set())
        self.list_content = self._wants_list_content()
        self._runs: dict[tuple[int, int], int] = {}   # image size -> its run's length
        self._count_ok: bool | None = None             # transformers' count matched the processor so far

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.list_content:
            messages = [{"role": m["role"], "content": _content_list(m["content"])} for m in messages]
        kw = {"chat_template": self._template} if self._template else {}
        text = self._render_with.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=generation_prompt, **kw)
        return text.replace(IMAGE_PLACEHOLDER, self.image_token) if self.image_token != IMAGE_PLACEHOLDER else text

    def _wants_list_content(self) -> bool:
        """Templates differ: some take a string per message, multimodal ones a list of typed parts.
        Render a sentinel the string way; if it comes out intact, strings it is."""
        self.list_content = False
        try:
            out = self._render([{"role": "user", "content": "dowser-sentinel"}], False)
        except Exception:
            return True
        return "dowser-sentinel" not in out or "'type'" in out

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span [start, end) of each assistant turn: from
        where the generation prompt ends to the end of the turn's text, trailing whitespace cut."""
        full = self._render(messages, False)
        spans, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            end = len(self._render(messages[: i + 1], False))
            start = len(prompt)
            if not (pos <= start <= end <= len(full)) or not full.startswith(prompt):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            spans.append((start, start + len(full[start:end].rstrip())))
            pos = end
        return full, spans

    def tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a whole rendered text [T] (the tokenizer's special tokens added, a BOS the
        template wrote already not doubled) and each token's character span."""
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        bos = self.tokenizer.bos_token_id
        if len(ids) > 1 and ids[0] == ids[1] == bos:
            ids, offsets = ids[1:], offsets[1:]
        return ids, offsets

    def encode(self, record: Record) -> Example:
        """The record's ids and labels [T] with its image as one image token, and the length of the run
        of tokens the processor will put there (the image is checked, not processed, where the
        processor can count its tokens from the image's size)."""
        full, spans = self.spans(record.messages)
        ids, offsets = self.tokenize(full)
        labels = [IGNORE] * len(ids)
        eos = self.tokenizer.eos_token_id
        inserts = []   # (position, ) where a turn without a stop token gets the EOS
        for start, end in spans:
            inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and a < b]
            for k in inside:
                labels[k] = ids[k]
                if ids[k] in self.stop_ids:
                    break
            else:
                if inside and eos is not None:
                    inserts.append(inside[-1] + 1)
        for k in reversed(inserts):
            ids.insert(k, int(eos))
            labels.insert(k, int(eos))
        ex = Example(record.index, ids, labels, record.image)
        if record.image is not None:
            if self.processor is None:
                raise ValueError("the model has no image processor (text-only model)")
            if ids.count(image_token_id(self.processor)) != 1:
                raise ValueError("the rendered text does not hold the image token once")
            ex.image_tokens = self.image_tokens(record.image)
        if ex.length > self.max_len:
            raise ValueError(f"{ex.length} tokens, over --max-len {self.max_len}")
        if not any(x != IGNORE for x in labels):
            raise ValueError("no assistant tokens after rendering")
        return ex

    def image_tokens(self, path: Path) -> int:
        """The length of the image's run of tokens, once per image size: the processor's own run on
        the first ``CHECKED_SIZES`` sizes, then transformers' count from the size
        (``_get_num_multimodal_tokens``) where it matched on all of them (a count that ignores the
        checkpoint's own processor settings, as on tiny Qwen2-VL builds, is never used)."""
        size = check_image(path)
        if size in self._runs:
            return self._runs[size]
        counted = self._counted(size) if self._count_ok is not False else None
        if counted is not None and self._count_ok and len(self._runs) >= CHECKED_SIZES:
            n = counted
        else:
            n = len(image_runs(self.processor, [load_image(path)])[0][0])
            self._count_ok = counted == n and self._count_ok is not False
        self._runs[size] = n
        return n

    def _counted(self, size: tuple[int, int]) -> int | None:
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return None
        try:
            return int(count(image_sizes=[(size[1], size[0])])["num_image_tokens"][0])
        except Exception:   # a processor's count is a convenience: any failure means "process it"
            return None


def prompt_ids(encoder: "Encoder", text: str, image=None) -> list[int]:
    """Token ids of one user turn plus the template's generation prompt (what evaluation feeds
    ``generate``), tokenised as training tokenises a conversation; an image goes through the
    processor, placed where ``<image>`` is (or first)."""
    if image is not None and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    ids, _ = encoder.tokenize(encoder._render([{"role": "user", "content": text}], True))
    if image is not None:
        if encoder.processor is None:
            raise ValueError("the model has no image processor (text-only model)")
        (run,), _ = image_runs(encoder.processor, [image])
        ids, _ = splice(ids, [IGNORE] * len(ids), image_token_id(encoder.processor), run)
    return ids


def _content_list(text: str) -> list[dict]:
    parts: list[dict] = []
    for n, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if n:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def load_dataset(path: Path, image_folder: Path | None, encoder: Encoder, skip_bad: bool,
                 on_record: Callable[[], None] | None = None, on_total: Callable[[int], None] | None = None) -> Dataset:
    """Parse, check and tokenise every record. Each image is decoded once here, to find damaged files
    before training starts, and counted, not processed (that happens per batch, ``collate``)."""
    raw = read_records(path)
    if not isinstance(raw, list):
        raise UserError(f"--data {path}: expected a list of records (JSON list or JSONL)")
    folder = image_folder if image_folder is not None else path.parent
    ds = Dataset(path, [], total=len(raw), format=record_format(raw))
    if on_total:
        on_total(len(raw))
    for i, r in enumerate(raw):
        try:
            rec = parse_record(r, i, folder, ds.format)
            ds.examples.append(encoder.encode(rec))
        except (ValueError, OSError) as e:
            if not skip_bad:
                raise UserError(f"--data {path}: record {i}: {e} (--skip-bad skips such records)") from None
            ds.skipped.append({"index": i, "reason": str(e)})
        if on_record:
            on_record()
    if not ds.examples:
        why = f"all {len(raw)} records were bad" if raw else "no records"
        raise UserError(f"--data {path}: empty dataset ({why})")
    return ds


# ---- batches ----------------------------------------------------------------------------------------------

def collate(examples: list[Example], pad_id: int, processor, images: list | None = None,
            keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels [B, T], each image token replaced by its image's
    run, and the image kwargs of the examples that have an image, in order (``image_runs``; only
    ``keys`` among them where given: the model forward's arguments). ``images``: the examples'
    images, decoded (read here when None; a DataLoader worker reads them ahead)."""
    if images is None:
        images = [load_image(e.image) if e.image is not None else None for e in examples]
    seqs = [(e.input_ids, e.labels) for e in examples]
    kwargs: dict[str, torch.Tensor] = {}
    with_image = [b for b, im in enumerate(images) if im is not None]
    if with_image:
        runs, kwargs = image_runs(processor, [images[b] for b in with_image], keys)
        token = image_token_id(processor)
        for b, run in zip(with_image, runs):
            seqs[b] = splice(*seqs[b], token, run)
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, (x, y) in enumerate(seqs):
        ids[b, :len(x)] = torch.tensor(x)
        labels[b, :len(x)] = torch.tensor(y)
        mask[b, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **kwargs}


class Examples(torch.utils.data.Dataset):
    """The encoded examples for a DataLoader: item i is (example, its image decoded or None), read in
    the loader's worker processes."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        e = self.examples[i]
        return e, (load_image(e.image) if e.image is not None else None)


class Collator:
    """``collate`` for a DataLoader of ``Examples`` (a class, so worker processes can take it)."""

    def __init__(self, pad_id: int, processor, keys: set[str] | None = None):
        self.pad_id, self.processor, self.keys = pad_id, processor, keys

    def __call__(self, items) -> dict[str, torch.Tensor]:
        return collate([e for e, _ in items], self.pad_id, self.processor, [im for _, im in items], self.keys)


# per-token outputs of a processor call: what image_runs returns as runs, not as image kwargs
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# the image kwargs passed on when the model's forward is not known (the Trainer's collator)
IMAGE_KEYS = frozenset({"pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask"})


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER)


def image_runs(processor, images: list, keys: set[str] | None = None) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """What the processor makes of each image: its run of tokens (the image tokens with the model's
    wrappers, e.g. Idefics3's rows and columns, which replace the one image token of the rendered
    text) and the batch's image kwargs (pixel values, and grids, sizes or pixel masks where the
    processor gives them; ``keys`` keeps the ones named, else ``IMAGE_KEYS``). One processor call
    for the batch: the images are processed once."""
    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    out = processor(text=[token] * len(images), images=[[im] for im in images], return_tensors="pt", padding=True)
    alone = processor.tokenizer(token)["input_ids"]
    j = alone.index(image_token_id(processor))
    head, tail = alone[:j], alone[j + 1:]
    runs = []
    for row, m in zip(out["input_ids"], out["attention_mask"]):
        ids = row[m.bool()].tolist()
        if ids[:len(head)] != head or ids[len(ids) - len(tail):] != tail:
            raise ValueError("the processor changed the tokens around the image token")
        runs.append(ids[len(head): len(ids) - len(tail)])
    wanted = IMAGE_KEYS if keys is None else keys
    kwargs = {k: v for k, v in out.items() if k not in TOKEN_KEYS and k in wanted and isinstance(v, torch.Tensor)}
    return runs, kwargs


def splice(ids: list[int], labels: list[int], token: int, run: list[int]) -> tuple[list[int], list[int]]:
    """ids and labels [T] with the image token replaced by ``run`` (labels IGNORE there) [T - 1 + len(run)]."""
    k = ids.index(token)
    return ids[:k] + run + ids[k + 1:], labels[:k] + [IGNORE] * len(run) + labels[k + 1:]


def image_inputs(processor, images: list) -> dict[str, torch.Tensor]:
    """The model's image kwargs (pixel values, and grid, size or pixel-mask tensors where the model
    takes them) for the images of one batch, through the processor's image processor; {} without
    images."""
    if not images:
        return {}
    pixels = processor.image_processor(images, return_tensors="pt")
    return {k: v for k, v in pixels.items() if k in IMAGE_KEYS}


def pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else its EOS, else 0 (padding is masked out anyway)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def pack_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences: ids [n, T] and a bool mask [n, T] of real positions."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def read_dataset(tokenizer, processor, path: Path, image_folder: Path | None, max_len: int, skip_bad: bool,
                 console, stop_ids: list[int] | None = None) -> Dataset:
    """A training file read and encoded as `finetune` (and `merge`'s calibration) read it, with a
    progress line; skipped records (``skip_bad``) are reported in one line. ``stop_ids``: the model's
    turn ends beside the tokenizer's EOS (``LoadedModel.stop_ids()``), where labels stop."""

    if image_folder is not None and not image_folder.is_dir():
        raise UserError(f"--image-folder {image_folder}: no such directory")
    encoder = Encoder(tokenizer, processor, max_len, stop_ids)
    with progress_bar(console) as bar:
        task = bar.add_task(f"reading {path.name}", total=None)
        ds = load_dataset(path, image_folder, encoder, skip_bad, lambda: bar.advance(task),
                          lambda n: bar.update(task, total=n))
    if ds.skipped:
        console.print(f"[yellow]skipped {len(ds.skipped)} bad record(s) of {ds.total} (first: record "
                      f"{ds.skipped[0]['index']}: {ds.skipped[0]['reason']})[/yellow]")
    return ds
