"""Model loading: aliases (configs/models.yaml), local save_pretrained dirs, hub ids, the embedded
SmolLM2 models and tiny test models; each resolved to an architecture adapter."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dowser_cli.config import config_dirs, load_yaml_file
from dowser_cli.errors import UserError, first_line
from dowser_cli.models import embedded
from dowser_cli.models.registry import Adapter, Parts, adapter_for_config, resolve_parts

RANDOM_INIT_SEED = 0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """Where a model comes from, resolved without loading anything heavy."""

    spec: str               # what the user typed
    kind: str               # hub | local | embedded | tiny
    location: str           # hub id, directory, or embedded/tiny name
    trust_remote_code: bool = False
    revision: str | None = None
    random_init: bool = False
    config_dir: Path | None = None  # shipped config for --random-init


@dataclass
class LoadedModel:
    source: ModelSource
    model: nn.Module
    config: Any
    adapter: Adapter
    parts: Parts
    tokenizer: Any | None
    processor: Any | None

    @property
    def text_config(self):
        return self.config.get_text_config()

    def stop_ids(self) -> list[int]:
        """Token ids that end an answer: the union of the checkpoint's generation config (a chat model's
        turn end, e.g. Gemma 3's ``<end_of_turn>`` 106 beside ``<eos>`` 1) and the tokenizer's EOS.
        Passing the tokenizer's EOS alone to ``generate`` would override the generation config's list."""
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        for x in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            for i in (x if isinstance(x, (list, tuple)) else [x]):
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        return ids


def aliases() -> dict[str, dict]:
    """Every config directory's ``models.yaml`` aliases, a user's directory overriding the shipped one;
    an entry's ``config`` is made the absolute path of its config.json directory (``models/NAME`` beside
    the models.yaml that names it)."""
    table: dict[str, dict] = {}
    for d in reversed(config_dirs()):
        if not (d / "models.yaml").is_file():
            continue
        for name, entry in (load_yaml_file(d / "models.yaml").get("aliases") or {}).items():
            if not isinstance(entry, dict):
                raise UserError(f"{d / 'models.yaml'}: alias {name!r}: expected a mapping")
            table[name] = {**entry, "config": str(d / "models" / entry["config"])} if entry.get("config") else entry
    return table


_REMOTE_CODE = {"trusted": False}


def allow_remote_code(trusted: bool) -> None:
    """Whether models may run code from their own repository (``trust_remote_code``) in this process:
    only when the user asks (`--trust-remote-code`); no alias or config turns it on by itself."""
    _REMOTE_CODE["trusted"] = bool(trusted)


def resolve_source(spec: str, random_init: bool = False, revision: str | None = None,
                   trust_remote_code: bool | None = None) -> ModelSource:
    """``trust_remote_code`` None: what allow_remote_code() set (off unless the user asked)."""
    trusted = _REMOTE_CODE["trusted"] if trust_remote_code is None else bool(trust_remote_code)
    table = aliases()
    if spec in table:
        entry = table[spec]
        cfg_dir = Path(entry["config"]) if entry.get("config") else None
        kind = next((k for k in ("embedded", "tiny", "hub") if k in entry), None)
        if kind is None:
            raise UserError(f"models.yaml: alias {spec!r} needs one of hub, embedded or tiny")
        if entry.get("remote_code") and not trusted:
            raise UserError(f"model {spec}: runs code from its repository ({entry.get(kind)}); pass "
                            f"--trust-remote-code to allow it")
        src = ModelSource(spec, kind, entry[kind], trusted, revision, random_init, cfg_dir)
        if random_init and kind == "hub" and cfg_dir is None:
            raise UserError(f"--random-init: no shipped config for {spec!r} (a config.json under models/ of a config directory); "
                            f"those with one: {', '.join(k for k, v in table.items() if v.get('config'))}")
        return src
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec}: no config.json (expected a save_pretrained directory)")
        return ModelSource(spec, "local", str(path), trusted, revision=revision, random_init=random_init,
                           config_dir=path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and not _HUB_ID.match(spec):
        raise UserError(f"model directory {spec} does not exist")
    if _HUB_ID.match(spec):
        if random_init:
            raise UserError(f"--random-init needs a shipped config; {spec!r} is a hub id (download its config.json "
                            f"into a directory and pass that directory)")
        return ModelSource(spec, "hub", spec, trusted, revision=revision)
    raise UserError(f"unknown model {spec!r}: not an alias, a local directory or a hub id (org/name); "
                    f"aliases: {', '.join(sorted(table))}")


def _location(source: ModelSource) -> str:
    if source.kind == "embedded":
        return str(embedded.smollm2_dir() if source.location == "smollm2-135m" else embedded.smol_llava_dir())
    return source.location


def load_config(source: ModelSource):
    """The model's config (cheap: no weights). Hub/network problems surface here as one line."""
    from transformers import AutoConfig

    if source.kind == "tiny":
        return embedded.build_tiny(source.location)[0].config
    where = str(source.config_dir) if source.random_init else _location(source)
    if source.kind == "hub" and not source.random_init:
        with _hub_errors(source.spec, "config"):
            return AutoConfig.from_pretrained(where, revision=source.revision,
                                              trust_remote_code=source.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(where, revision=source.revision, trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e) and not source.trust_remote_code:
            raise _needs_remote_code(source.spec) from None
        raise UserError(f"model {source.spec}: cannot read config from {where}: {first_line(e)}") from None


def _needs_remote_code(spec: str) -> UserError:
    return UserError(f"model {spec}: its config needs code from its repository; pass --trust-remote-code to allow it")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def _hub_errors(spec: str, what: str):
    """The hub client's own handling (HF_HUB_OFFLINE, HTTP(S)_PROXY, its cache, timeouts and retries),
    its per-retry warnings kept quiet and its final error turned into one line."""
    from huggingface_hub.utils import logging as hub_logging

    log = hub_logging.get_logger()
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise _needs_remote_code(spec) from None
        hint = "HF_HUB_OFFLINE is set and it is not in the local cache" if _hub_offline() else \
            "no network, a proxy not set in HTTPS_PROXY, or no such repo?"
        raise UserError(f"model {spec}: cannot reach the hub for its {what} ({hint}): {first_line(e)}") from None
    finally:
        log.setLevel(level)


def num_decoder_layers(config) -> int:
    return int(config.get_text_config().num_hidden_layers)


def _auto_class(adapter: Adapter):
    import transformers

    return getattr(transformers, adapter.auto_class)


def load_model(source: ModelSource, config, dtype: torch.dtype, device: str, tokenizer: bool = True,
               device_map: str | None = None, empty: bool = False) -> LoadedModel:
    """Load weights (or random-init from the config) in ``dtype`` on ``device``, in eval mode; the
    tokenizer/processor too unless ``tokenizer`` is False (stages that only read weights).
    ``device_map`` ("auto", "balanced", ...): accelerate places whole decoder layers over the visible
    GPUs (then the host) for a model larger than one device; ``device`` is then ignored.
    ``empty``: the module tree on device "meta", no weights read (an FSDP rank > 0, whose shards come
    from rank 0); tokenizer and processor are loaded as usual."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        hf_logging.disable_progress_bar()
    adapter = adapter_for_config(config)
    want_tokenizer = tokenizer
    where = None  # where weights and tokenizer are read from (none for tiny / --random-init)
    if source.kind != "tiny" and not source.random_init:
        where = _location(source)
    if empty:
        with torch.device("meta"):
            model = _auto_class(adapter).from_config(config, dtype=dtype, trust_remote_code=source.trust_remote_code)
    elif source.kind == "tiny":
        model = embedded.build_tiny(source.location, dtype)[0]
        model = _dispatch(model, device_map) if device_map else model.to(device)
    elif source.random_init:
        torch.manual_seed(RANDOM_INIT_SEED)  # the same "random" weights every time: artifacts stay checkable
        with torch.device("cpu" if device_map else device):
            model = _auto_class(adapter).from_config(config, dtype=dtype,
                                                     trust_remote_code=source.trust_remote_code)
        if device_map:
            model = _dispatch(model, device_map)
    else:
        hub = source.kind == "hub"
        try:
            with _hub_errors(source.spec, "weights") if hub else contextlib.nullcontext():
                model = _auto_class(adapter).from_pretrained(where, dtype=dtype, revision=source.revision,
                                                             trust_remote_code=source.trust_remote_code,
                                                             device_map=device_map or (device if device != "cpu" else None))
        except (OSError, ValueError) as e:
            raise UserError(f"model {source.spec}: cannot load weights: {first_line(e)}") from None
    tokenizer = processor = None
    if want_tokenizer and source.kind == "tiny":
        tokenizer = embedded.tiny_tokenizer(source.location)
        processor = embedded.tiny_processor(source.location, tokenizer)
    elif want_tokenizer and where is not None:
        with _hub_errors(source.spec, "tokenizer") if source.kind == "hub" else contextlib.nullcontext():
            tokenizer, processor = _load_tokenizer(where, source)
    model.eval()
    return LoadedModel(source, model, model.config, adapter, resolve_parts(adapter, model), tokenizer, processor)


def _dispatch(model: nn.Module, device_map: str) -> nn.Module:
    """A model built on the host, placed by accelerate as from_pretrained(device_map=...) would place it
    (whole no-split blocks, e.g. decoder layers, per device)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                     low_zero=device_map == "balanced_low_0") if device_map != "sequential" else None
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return dispatch_model(model, placement)


def input_device(model: nn.Module) -> torch.device:
    """Where a (possibly device-mapped) model takes its inputs: its input embeddings' device."""
    return model.get_input_embeddings().weight.device


def meta_model(source: ModelSource, config, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with no storage (device "meta"): names, shapes, dtypes, for cheap checks
    before loading weights. Tiny models are small enough to build for real."""
    if source.kind == "tiny":
        return embedded.build_tiny(source.location, dtype)[0]
    adapter = adapter_for_config(config)
    with torch.device("meta"):
        return _auto_class(adapter).from_config(config, dtype=dtype, trust_remote_code=source.trust_remote_code)


def _load_tokenizer(where: str, source: ModelSource):
    from transformers import AutoProcessor, AutoTokenizer

    kw = dict(revision=source.revision, trust_remote_code=source.trust_remote_code)
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(where, **kw)
    except Exception:  # text-only models have no processor; the tokenizer is enough
        pass
    tokenizer = getattr(processor, "tokenizer", None) or processor
    if tokenizer is None or not hasattr(tokenizer, "convert_tokens_to_ids"):
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    if processor is tokenizer:
        processor = None
    return tokenizer, processor


def ensure_tokenizer(lm: LoadedModel, console) -> None:
    """A config-only model (benchmarks at real shape) has no tokenizer: bytes as token ids keep every
    id inside the vocabulary; the numbers mean nothing, the costs are the real ones."""
    if lm.tokenizer is not None:
        return
    if not lm.source.random_init:
        raise UserError(f"model {lm.source.spec}: no tokenizer found")
    lm.tokenizer = embedded.byte_tokenizer()
    console.print("[yellow]--random-init: no tokenizer with the config; using a byte-level one[/yellow]")
