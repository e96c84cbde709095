"""A dowser mask in the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, which is one).

    import dowser_cli as dowser
    from dowser_cli.integrations import hf

    mask = dowser.load_mask("mask.safetensors", model)
    train = hf.read_examples("train.json", tokenizer, processor, image_folder="img")
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=hf.collator(tokenizer, processor),
                      optimizers=(hf.masked_optimizer(model, mask, args), None),
                      callbacks=[hf.DowserCallback(mask, "runs/hf")])
    trainer.train()   # runs/hf: a run directory, written at every save and at the end

What it keeps from `dowser finetune`: the masked AdamW (state for the trainable entries only, frozen
entries bit-identical whatever the weight decay), gradient clipping over the trainable entries only
(the frozen entries' gradients are zeroed as backward writes them, so the Trainer's own clipping sees
what `dowser finetune` clips), the loss over assistant tokens (labels from the same encoder), and the
run directory. What stays the Trainer's: the data order, the lr schedule, logging, checkpoints.
DeepSpeed ZeRO and the Trainer's FSDP are refused: they replace or shard the parameters after the
optimiser is built, so its masks would point at tensors that no longer train."""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Iterable

import torch
from transformers import TrainerCallback

from dowser_cli import api, data
from dowser_cli.api import Mask, save_delta
from dowser_cli.errors import UserError
from dowser_cli.optim import MaskedAdamW


class Examples(torch.utils.data.Dataset):
    """Encoded training records (``dowser_cli.data.Example``: input_ids, labels, image) for a Trainer."""

    def __init__(self, examples: list[data.Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> data.Example:
        return self.examples[i]


def read_examples(path: str | os.PathLike, tokenizer, processor=None, image_folder: str | os.PathLike | None = None,
                  max_len: int = 2048, hf_dataset: bool = False, stop_ids: list[int] | None = None):
    """``dowser_cli.read_examples`` as a torch Dataset for ``Trainer(train_dataset=...)``, or with
    ``hf_dataset`` as a ``datasets.Dataset`` of already-encoded rows (index, input_ids, labels, image_path), which
    TRL's SFTTrainer requires (with ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})``: the
    rows are encoded already). ``stop_ids``: the model's turn ends beside the tokenizer's EOS, where
    labels stop (``model.generation_config.eos_token_id``)."""
    examples = api.read_examples(path, tokenizer, processor, image_folder, max_len, stop_ids)
    if not hf_dataset:
        return Examples(examples)
    import datasets

    return datasets.Dataset.from_list([{"index": e.index, "input_ids": e.input_ids, "labels": e.labels,
                                        "image_path": str(e.image) if e.image is not None else ""} for e in examples])


def _example(x) -> data.Example:
    if isinstance(x, data.Example):
        return x
    return data.Example(x["index"], list(x["input_ids"]), list(x["labels"]), Path(x["image_path"]) if x.get("image_path") else None)


def collator(tokenizer, processor=None):
    """``Trainer(data_collator=...)``: examples (or ``hf_dataset`` rows) -> ``dowser_cli.collate``'s padded batch."""
    return lambda examples: api.collate([_example(x) for x in examples], tokenizer, processor)


def masked_optimizer(model: torch.nn.Module, mask: Mask, args, train: Iterable[str] = ()) -> MaskedAdamW:
    """``MaskedAdamW.for_model`` with the TrainingArguments' lr, betas, eps and weight decay, for
    ``Trainer(optimizers=(opt, None))``. Gradients stay dense in ``.grad`` (the Trainer clips them),
    with the frozen entries zeroed as backward writes them."""
    return MaskedAdamW.for_model(model, mask, lr=args.learning_rate, weight_decay=args.weight_decay,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, train=train,
                                 compact_grads=False, zero_frozen_grads=True)


def _refusal(args) -> str | None:
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return ("DeepSpeed ZeRO partitions the parameters and builds its own optimiser, so a mask cannot hold "
                "frozen entries still; run without DeepSpeed, or use `dowser finetune --strategy fsdp` "
                "(the mask per shard)")
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return ("the Trainer's FSDP wraps the parameters after the optimiser is built, so its masks would point "
                "at tensors that no longer train; use `dowser finetune --strategy fsdp` (the mask per shard), "
                "or DDP (torchrun) with this callback")
    return None


def _resumable_checkpoints(model) -> None:
    """transformers 5 saves a model whose class renames checkpoint keys (LLaVA, Qwen2-VL, ...) under
    the original checkpoint's names, and ``Trainer(resume_from_checkpoint=...)`` reads them back with a
    plain ``load_state_dict(strict=False)`` that matches none of them: the run would go on from the base
    weights with only a warning (transformers issue 43701). The Trainer's checkpoints of this model keep
    its own names instead, which the resume and ``from_pretrained`` both read."""
    save = getattr(model, "save_pretrained", None)
    if save is not None and "save_original_format" in inspect.signature(save).parameters:
        model.save_pretrained = functools.partial(save, save_original_format=False)


class DowserCallback(TrainerCallback):
    """Checks the Trainer trains with a masked optimiser and writes ``out`` as a dowser run directory
    (``save_delta``) at every checkpoint save and at the end of training. ``train``: parameters trained
    densely beside the mask (the same names given to ``masked_optimizer``); ``base``: how `dowser
    export` and the others should load the base model (default: the model the mask was probed on)."""

    def __init__(self, mask: Mask, out: str | os.PathLike, train: Iterable[str] = (), base: str | None = None):
        self.mask, self.out, self.train, self.base = mask, Path(out), list(train), base

    def on_init_end(self, args, state, control, model=None, **kw):
        why = _refusal(args)
        if why:
            raise UserError(f"DowserCallback: {why}")
        _resumable_checkpoints(model)

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        if not isinstance(getattr(optimizer, "optimizer", optimizer), MaskedAdamW):
            raise UserError("DowserCallback: the Trainer's optimiser is not a MaskedAdamW; pass "
                            "optimizers=(dowser_cli.integrations.hf.masked_optimizer(model, mask, args), None)")

    def _write(self, model, state) -> None:
        if not state.is_world_process_zero:
            return
        model = getattr(model, "module", model)   # DDP
        save_delta(model, self.mask, self.out, train=self.train, base=self.base, method="dowser-mask (hf trainer)",
                   steps=state.global_step, overwrite=True,
                   extra={"trainer": {"global_step": state.global_step, "epoch": state.epoch,
                                      "log_history": state.log_history[-50:]}})

    def on_save(self, args, state, control, model=None, **kw):
        self._write(model, state)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._write(model, state)
